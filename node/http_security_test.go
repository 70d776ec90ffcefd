package node

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// With TLS files the HTTP port serves HTTPS with the same certificate; with
// --http-auth token every read but health and the dashboard's files needs
// the token; anything but a read always does. Agents' dashboards read each
// other's GPUs over it.
func TestHTTPPortTLSAndToken(t *testing.T) {
	pki, _ := testPKI(t, "node-1", "node-2", "cli")
	tokenFile := writeToken(t, "s3cret")
	dc := startCluster(t, 2, func(i int, c *Config) {
		c.Security = pki[fmt.Sprintf("node-%d", i+1)]
		c.Security.ACLTokenFile = tokenFile
		c.Security.HTTPAuth = HTTPAuthToken
		c.GPUSampler = fakeGPUs(c.NodeName)
		c.ServeAddr = "127.0.0.1:0"
	})
	a := dc.Agents[0]
	// Trusts the CA, presents no certificate (a browser, Prometheus).
	caOnly, _, err := TLSFiles(pki["cli"].CAFile, "", "", "")
	if err != nil {
		t.Fatal(err)
	}
	hc := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: caOnly}}
	t.Cleanup(hc.CloseIdleConnections)
	getAt := func(addr, method, path, token string) (int, string) {
		t.Helper()
		req, _ := http.NewRequest(method, "https://"+addr+path, nil)
		if token != "" {
			req.Header.Set("Authorization", "Bearer "+token)
		}
		resp, err := hc.Do(req)
		if err != nil {
			t.Fatalf("%s %s: %v", method, path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	get := func(method, path, token string) (int, string) { return getAt(a.HTTPAddr(), method, path, token) }
	for _, c := range []struct {
		method, path, token string
		want                int
	}{
		{"GET", "/v1/health", "", 200},
		{"GET", "/", "", 200},
		{"GET", "/metrics", "", 401},
		{"GET", "/metrics", "wrong", 401},
		{"GET", "/metrics", "s3cret", 200},
		{"GET", "/v1/dashboard", "", 401},
		{"POST", "/v1/dashboard", "", 401},
		// Service traffic is the service's: no cluster token, any method.
		{"POST", "/svc/nosuch/x", "", 404},
	} {
		if code, body := get(c.method, c.path, c.token); code != c.want {
			t.Errorf("%s %s (token %q): %d, want %d: %s", c.method, c.path, c.token, code, c.want, body)
		}
	}
	// The serve port is HTTPS too, with service traffic only.
	if code, body := getAt(a.ServeAddr(), "POST", "/svc/nosuch/x", ""); code != 404 || !strings.Contains(body, `no service named "nosuch"`) {
		t.Errorf("serve port, POST /svc/nosuch/x: %d %s", code, body)
	}
	if code, body := getAt(a.ServeAddr(), "GET", "/metrics", "s3cret"); code != 404 || !strings.Contains(body, "service port") {
		t.Errorf("serve port, GET /metrics: %d %s", code, body)
	}
	// Plain HTTP gets no data.
	if resp, err := http.Get("http://" + a.HTTPAddr() + "/metrics"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == 200 || strings.Contains(string(b), "gpumesh_") {
			t.Fatalf("plain HTTP answered: %d %s", resp.StatusCode, b)
		}
	}
	// The dashboard fetches the other node's GPUs over HTTPS with the token.
	poll.Until(t, 20*time.Second, func() error {
		code, body := get("GET", "/v1/dashboard", "s3cret")
		var v dashView
		if err := json.Unmarshal([]byte(body), &v); err != nil || code != 200 {
			return fmt.Errorf("dashboard %d: %v", code, err)
		}
		for _, g := range v.GPUs {
			if g.Node == dc.Agents[1].Name() && len(g.GPUs) == 2 && g.Error == "" {
				return nil
			}
		}
		return fmt.Errorf("no GPUs of %s in %+v", dc.Agents[1].Name(), v.GPUs)
	})
}

// Without --http-auth token reads are open and anything else is refused.
func TestHTTPPortReadOnlyWithoutToken(t *testing.T) {
	dc := startCluster(t, 1, nil)
	a := dc.Agents[0]
	resp, err := http.Get("http://" + a.HTTPAddr() + "/v1/dashboard")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("GET dashboard: %v %v", resp, err)
	}
	resp.Body.Close()
	resp, err = http.Post("http://"+a.HTTPAddr()+"/v1/dashboard", "text/plain", strings.NewReader("x"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusMethodNotAllowed {
		t.Fatalf("POST without a cluster token: %d, want 405", resp.StatusCode)
	}
}
