package node

import (
	"bufio"
	"bytes"
	"crypto/tls"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"path"
	"strings"

	"golang.org/x/net/http/httpguts"
)

// The serve port's front end (service_serve.go) takes a request itself only
// when it is "plain"; anything else goes, with the bytes already read, to
// net/http's server, which handles every request as the HTTP port does.
// A plain request is:
//
//   - its whole head in the connection's buffer (serveBufSize), a request
//     line "METHOD /origin-form-target HTTP/1.1" with a token method other
//     than CONNECT and a target url.ParseRequestURI accepts;
//   - header lines of a valid name, a colon and a valid value, none folded,
//     no bare LF, at most maxPlainRequestHeaders of them;
//   - exactly one Host, valid; no Transfer-Encoding, Upgrade or Expect; at
//     most one Content-Length, of digits only, up to maxRetryBody (the
//     router reads such a body whole before routing anyway);
//   - for the service: a clean path under /svc/ (one net/http's ServeMux
//     would not redirect), or a Host naming a service (serviceHost).
//
// The head is parsed where it lies in the buffer: one string for all of it,
// keys and values pieces of it.

// maxPlainRequestHeaders bounds the header lines of a plain request.
const maxPlainRequestHeaders = 64

// plainRequest is a parsed plain head.
type plainRequest struct {
	method, target, host string
	header               http.Header
	length               int64 // Content-Length, 0 without one
	closeAfter           bool  // Connection: close
	headLen              int   // bytes of the head, blank line included
	hostForm             string
	// values holds every header value of the head: header's slices are
	// pieces of it, reused by the next head (its request is done by then).
	values []string
}

// parsePlainRequest parses the head at the start of buf (the bytes buffered
// so far) into pr, reusing pr.header, and says whether the request is plain.
// headComplete is false when buf holds no whole head yet.
func parsePlainRequest(buf []byte, pr *plainRequest) (ok, headComplete bool) {
	end := bytes.Index(buf, []byte("\r\n\r\n"))
	if end < 0 {
		return false, false
	}
	clear(pr.header)
	clear(pr.values)
	pr.values = pr.values[:0]
	pr.length, pr.closeAfter, pr.host, pr.hostForm = 0, false, "", ""
	pr.headLen = end + 4
	s := string(buf[:end+2])
	line, s, _ := strings.Cut(s, "\r\n")
	method, rest, ok1 := strings.Cut(line, " ")
	target, proto, ok2 := strings.Cut(rest, " ")
	if !ok1 || !ok2 || proto != "HTTP/1.1" || !validMethod(method) || method == http.MethodConnect || target == "" || target[0] != '/' || strings.IndexByte(line, '\n') >= 0 {
		return false, true
	}
	pr.method, pr.target = method, target
	n, hosts, lengths := 0, 0, 0
	for s != "" {
		var l string
		l, s, _ = strings.Cut(s, "\r\n")
		if n++; n > maxPlainRequestHeaders || l == "" || l[0] == ' ' || l[0] == '\t' || strings.IndexByte(l, '\n') >= 0 {
			return false, true
		}
		k, v, found := strings.Cut(l, ":")
		v = textproto.TrimString(v)
		if !found || !httpguts.ValidHeaderFieldName(k) || !httpguts.ValidHeaderFieldValue(v) {
			return false, true
		}
		k = textproto.CanonicalMIMEHeaderKey(k)
		switch k {
		case "Host":
			hosts++
			pr.host = v
			continue // as net/http: Host is req.Host, not a header
		case "Content-Length":
			if lengths++; lengths > 1 || v == "" || len(v) > 18 {
				return false, true
			}
			for i := 0; i < len(v); i++ {
				if !isDigit(v[i]) {
					return false, true
				}
				pr.length = pr.length*10 + int64(v[i]-'0')
			}
		case "Transfer-Encoding", "Upgrade", "Expect":
			return false, true
		case "Connection":
			for _, tok := range strings.Split(v, ",") {
				if strings.EqualFold(textproto.TrimString(tok), "close") {
					pr.closeAfter = true
				}
			}
		}
		if vv, dup := pr.header[k]; dup {
			pr.header[k] = append(vv, v)
			continue
		}
		pr.values = append(pr.values, v)
		n := len(pr.values)
		pr.header[k] = pr.values[n-1 : n : n]
	}
	if hosts != 1 || !httpguts.ValidHostHeader(pr.host) || pr.length > maxRetryBody {
		return false, true
	}
	if name, ok := serviceHost(pr.host); ok {
		pr.hostForm = name
	}
	return true, true
}

// validMethod says whether m is an HTTP token (as net/http checks).
func validMethod(m string) bool {
	if m == "" {
		return false
	}
	for i := 0; i < len(m); i++ {
		if !httpguts.IsTokenRune(rune(m[i])) {
			return false
		}
	}
	return true
}

// request returns pr as the *http.Request the router takes (its URL under
// /svc/NAME for the Host form, as hostRouted makes it), with base's
// context, or nil when the target is not a service's (net/http's server
// then answers it).
func (pr *plainRequest) request(base *http.Request, remote string) *http.Request {
	u, err := requestURL(pr.target)
	if err != nil || u.Host != "" {
		return nil
	}
	switch {
	case pr.hostForm != "":
		u.Path = svcPrefix + pr.hostForm + u.Path
		if u.RawPath != "" {
			u.RawPath = svcPrefix + pr.hostForm + u.RawPath
		}
	case !strings.HasPrefix(u.Path, svcPrefix) || cleanPath(u.Path) != u.Path:
		return nil
	}
	req := new(http.Request)
	*req = *base // its context (Request.WithContext would allocate a second copy)
	req.Method, req.URL, req.Proto, req.ProtoMajor, req.ProtoMinor = pr.method, u, "HTTP/1.1", 1, 1
	req.Header, req.Host, req.RemoteAddr, req.RequestURI = pr.header, pr.host, remote, pr.target
	req.ContentLength, req.Body, req.Close = pr.length, http.NoBody, pr.closeAfter
	return req
}

// requestURL is url.ParseRequestURI(target) for a target that starts
// with "/", without its general parse for the common target: a path of
// letters, digits and "-._~/$&+,:;=@" (none of which is escaped, so that
// the URL's Path is the target's and RawPath is empty) and a query of
// printable ASCII; any other goes through url.ParseRequestURI.
func requestURL(target string) (*url.URL, error) {
	path, query, hasQuery := strings.Cut(target, "?")
	for i := 0; i < len(path); i++ {
		if !plainPathByte(path[i]) {
			return url.ParseRequestURI(target)
		}
	}
	for i := 0; i < len(query); i++ {
		if query[i] <= ' ' || query[i] >= 0x7f {
			return url.ParseRequestURI(target)
		}
	}
	return &url.URL{Path: path, RawQuery: query, ForceQuery: hasQuery && query == ""}, nil
}

func plainPathByte(c byte) bool {
	switch {
	case 'a' <= c && c <= 'z', 'A' <= c && c <= 'Z', '0' <= c && c <= '9':
		return true
	}
	return strings.IndexByte("-._~/$&+,:;=@", c) >= 0
}

// cleanPath is the path net/http's ServeMux serves p as (it redirects to it
// when it differs).
func cleanPath(p string) string {
	np := path.Clean(p)
	if p[len(p)-1] == '/' && np != "/" {
		np += "/"
	}
	return np
}

// bufferedConn is a connection handed to net/http's server with what was
// already read from it: reads drain br first.
type bufferedConn struct {
	net.Conn
	br  *bufio.Reader
	tls *tls.ConnectionState // the TLS connection's state, nil without TLS
}

func (c *bufferedConn) Read(p []byte) (int, error) { return c.br.Read(p) }

// CloseWrite half-closes the connection (net/http does before closing one
// it did not read to the end, so that the client reads the answer).
func (c *bufferedConn) CloseWrite() error {
	if cw, ok := c.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}
