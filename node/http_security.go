package node

import (
	"crypto/subtle"
	"crypto/tls"
	"fmt"
	"net/http"
	"strings"
)

// Who may read the HTTP port (SecurityConfig.HTTPAuth).
const (
	// HTTPAuthOpen serves the dashboard, its feed, /metrics and /v1/health
	// to anyone who reaches the port; anything but GET and HEAD needs the
	// ACL token. The default.
	HTTPAuthOpen = "open"
	// HTTPAuthToken asks for the ACL token ("Authorization: Bearer TOKEN")
	// on every path but /v1/health (load balancers) and the dashboard's
	// static files; the dashboard page sends the token given in its URL
	// fragment (http://host:7949/#token=TOKEN).
	HTTPAuthToken = "token"
)

// httpTLSConfig is the HTTP port's TLS: the agent's certificate, client
// certificates verified when given but not required (a browser or
// Prometheus need only trust the CA). Nil when TLS is off or HTTPPlain.
func (s *security) httpTLSConfig() *tls.Config {
	if s == nil || s.server == nil || s.httpPlain {
		return nil
	}
	c := s.server.Clone()
	c.ClientAuth = tls.VerifyClientCertIfGiven
	return c
}

// httpScheme is how agents call each other's HTTP ports.
func (s *security) httpScheme() string {
	if s.httpTLSConfig() != nil {
		return "https"
	}
	return "http"
}

// httpClientTLS is what an agent presents to another agent's HTTP port.
func (s *security) httpClientTLS() *tls.Config {
	if s.httpTLSConfig() == nil {
		return nil
	}
	return s.client
}

// httpToken is the token to send to another agent's HTTP port, or "".
func (s *security) httpToken() string {
	if s == nil {
		return ""
	}
	return s.token
}

// publicPaths answer without a token in HTTPAuthToken mode: health for
// load balancers, and the dashboard's static files (the data behind them
// is not).
func publicPath(p string) bool {
	switch p {
	case "/v1/health", "/", "/index.html", "/app.js", "/style.css":
		return true
	}
	return false
}

// httpAuth wraps the HTTP handler with the token rule of SecurityConfig.
func (s *security) httpAuth(next http.Handler) http.Handler {
	if s == nil {
		return next
	}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		read := r.Method == http.MethodGet || r.Method == http.MethodHead
		need := !read || (s.httpAuthMode == HTTPAuthToken && !publicPath(r.URL.Path))
		if need {
			if s.token == "" {
				if !read {
					w.Header().Set("Allow", "GET, HEAD")
					http.Error(w, "the HTTP port is read-only", http.StatusMethodNotAllowed)
					return
				}
			} else if err := checkHTTPToken(r, s.token); err != "" {
				w.Header().Set("WWW-Authenticate", `Bearer realm="gpumesh"`)
				http.Error(w, err, http.StatusUnauthorized)
				return
			}
		}
		next.ServeHTTP(w, r)
	})
}

func checkHTTPToken(r *http.Request, token string) string {
	got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
	if !ok || got == "" {
		return fmt.Sprintf("this agent requires the cluster's ACL token for %s: send Authorization: Bearer TOKEN", r.URL.Path)
	}
	if subtle.ConstantTimeCompare([]byte(strings.TrimSpace(got)), []byte(token)) != 1 {
		return "the ACL token given is not valid for this cluster"
	}
	return ""
}
