package node

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// serveTestFront starts a router over one healthy replica of service
// "echo" at addr, behind a serve port front end.
func serveTestFront(t *testing.T, addr string) (*serveFront, string) {
	t.Helper()
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.update(svcState(t, "echo", []string{addr}, []string{HealthHealthy}))
	f := startServeFront(t, rt)
	return f, f.ln.Addr().String()
}

// rawExchange writes raw on a new connection to addr and reads n answers.
func rawExchange(t *testing.T, addr, raw string, n int) []string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, raw); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	var out []string
	for i := 0; i < n; i++ {
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			t.Fatalf("answer %d: %v", i, err)
		}
		out = append(out, fmt.Sprintf("%d %s", resp.StatusCode, b))
	}
	return out
}

// Requests pipelined on one connection are answered in order, plain ones
// by the front end itself; one that is not plain (a chunked body) hands the
// connection to net/http's server, which answers it and those after it.
func TestServePortPipelinedRequestsStayInOrder(t *testing.T) {
	a := replica(t, "A")
	f, addr := serveTestFront(t, a.Listener.Addr().String())
	plain := "GET /svc/echo/1 HTTP/1.1\r\nHost: x\r\n\r\n" +
		"POST /svc/echo/2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc" +
		"GET /svc/echo/3 HTTP/1.1\r\nHost: x\r\n\r\n"
	got := rawExchange(t, addr, plain, 3)
	want := []string{"200 A GET /1 ", "200 A POST /2 abc", "200 A GET /3 "}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("got %q, want %q", got, want)
	}
	if s, h := f.served.Load(), f.handed.Load(); s != 3 || h != 0 {
		t.Fatalf("the front end answered %d and handed %d connections; want 3 answered, none handed", s, h)
	}
	mixed := "GET /svc/echo/1 HTTP/1.1\r\nHost: x\r\n\r\n" +
		"POST /svc/echo/2 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nxyz\r\n0\r\n\r\n" +
		"GET /svc/echo/3 HTTP/1.1\r\nHost: x\r\n\r\n"
	got = rawExchange(t, addr, mixed, 3)
	want = []string{"200 A GET /1 ", "200 A POST /2 xyz", "200 A GET /3 "}
	if strings.Join(got, "|") != strings.Join(want, "|") {
		t.Fatalf("got %q, want %q", got, want)
	}
	if s, h := f.served.Load(), f.handed.Load(); s != 4 || h != 1 {
		t.Fatalf("the front end answered %d and handed %d connections; want 4 answered, 1 handed", s, h)
	}
}

// An Upgrade request passes through net/http's server and the general path:
// the client and the replica then talk over the upgraded connection.
func TestServePortUpgrade(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("Upgrade") != "echo" {
			http.Error(w, "want Upgrade: echo", http.StatusBadRequest)
			return
		}
		c, brw, err := w.(http.Hijacker).Hijack()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
		_ = brw.Flush()
		line, _ := brw.ReadString('\n')
		_, _ = brw.WriteString("echo: " + line)
		_ = brw.Flush()
	}))
	t.Cleanup(s.Close)
	f, addr := serveTestFront(t, s.Listener.Addr().String())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, "GET /svc/echo/ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, nil)
	if err != nil || resp.StatusCode != http.StatusSwitchingProtocols {
		t.Fatalf("upgrade: %v %v", resp, err)
	}
	_, _ = io.WriteString(c, "ping\n")
	if line, err := br.ReadString('\n'); err != nil || line != "echo: ping\n" {
		t.Fatalf("over the upgraded connection: %q %v", line, err)
	}
	if f.handed.Load() != 1 {
		t.Fatalf("handed %d connections to net/http, want 1", f.handed.Load())
	}
}

// Expect: 100-continue goes through net/http's server: the client gets 100
// Continue before it sends the body, then the answer.
func TestServePortExpectContinue(t *testing.T) {
	a := replica(t, "A")
	_, addr := serveTestFront(t, a.Listener.Addr().String())
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, "POST /svc/echo/gen HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n")
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil || line != "HTTP/1.1 100 Continue\r\n" {
		t.Fatalf("want 100 Continue first, got %q %v", line, err)
	}
	if blank, _ := br.ReadString('\n'); blank != "\r\n" {
		t.Fatalf("after 100 Continue: %q", blank)
	}
	_, _ = io.WriteString(c, "prompt")
	resp, err := http.ReadResponse(br, nil) // no second 100 (TestRouterOneContinueForExpect)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK || string(b) != "A POST /gen prompt" {
		t.Fatalf("got %d %q", resp.StatusCode, b)
	}
}

// Garbage gets 400, headers over MaxHeaderBytes get 431 (as on the HTTP
// port), a request for something else than a service gets a 404 that says
// where the agent's API is, and the port goes on serving.
func TestServePortBadInput(t *testing.T) {
	a := replica(t, "A")
	_, addr := serveTestFront(t, a.Listener.Addr().String())
	for _, c := range []struct{ raw, want string }{
		{"hello there\r\n\r\n", "400 "},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n", "400 "},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab", "400 "},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: x\r\nX-Big: " + strings.Repeat("b", MaxHeaderBytes+8<<10) + "\r\n\r\n", "431 "},
		{"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", "404 this is the agent's service port"},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: x\r\n\r\n", "200 A GET /x "},
	} {
		if got := rawExchange(t, addr, c.raw, 1)[0]; !strings.HasPrefix(got, c.want) {
			t.Errorf("%.60q: got %.80q, want %q", c.raw, got, c.want)
		}
	}
}

// A client whose request head never ends is cut off after the header
// timeout; meanwhile the port serves others.
func TestServePortSlowHeadDoesNotBlockOthers(t *testing.T) {
	a := replica(t, "A")
	_, addr := serveTestFront(t, a.Listener.Addr().String())
	slow, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer slow.Close()
	_, _ = io.WriteString(slow, "GET /svc/echo/x HTTP/1.1\r\nHost: x\r\n")
	if got := rawExchange(t, addr, "GET /svc/echo/y HTTP/1.1\r\nHost: x\r\n\r\n", 1)[0]; got != "200 A GET /y " {
		t.Fatalf("got %q", got)
	}
}

// At shutdown an idle connection is closed at once and a request in flight
// finishes before the deadline.
func TestServePortShutdownLetsRequestsFinish(t *testing.T) {
	release, got := make(chan struct{}), make(chan struct{}, 1)
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got <- struct{}{}
		<-release
		_, _ = io.WriteString(w, "done")
	}))
	t.Cleanup(s.Close)
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.update(svcState(t, "echo", []string{s.Listener.Addr().String()}, []string{HealthHealthy}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := newServeFront(ln, rt, nil, hclog.NewNullLogger())
	served := make(chan error, 1)
	go func() { served <- f.serve() }()
	t.Cleanup(rt.closeConns)
	idle, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	// The idle connection served one request first.
	_, _ = io.WriteString(idle, "GET /svc/echo/a HTTP/1.1\r\nHost: x\r\n\r\n")
	<-got
	release <- struct{}{}
	ibr := bufio.NewReader(idle)
	if resp, err := http.ReadResponse(ibr, nil); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("first request: %v %v", resp, err)
	} else {
		_, _ = io.ReadAll(resp.Body)
	}
	answer := make(chan string, 1)
	go func() {
		resp, err := http.Get("http://" + ln.Addr().String() + "/svc/echo/slow")
		if err != nil {
			answer <- err.Error()
			return
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		answer <- fmt.Sprintf("%d %s", resp.StatusCode, b)
	}()
	<-got // in flight
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	shut := make(chan error, 1)
	go func() { shut <- f.shutdown(ctx) }()
	_ = idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := ibr.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("the idle connection: %v, want it closed", err)
	}
	select {
	case err := <-shut:
		t.Fatalf("shutdown returned (%v) with a request in flight", err)
	default:
	}
	close(release)
	if a := <-answer; a != "200 done" {
		t.Fatalf("the request in flight got %q", a)
	}
	if err := <-shut; err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	if err := <-served; !errors.Is(err, errServeClosed) {
		t.Fatalf("serve: %v", err)
	}
}

// With TLS the front end answers HTTPS, plain requests itself, and tells
// the replica the request came over https (X-Forwarded-Proto), handed-off
// connections included.
func TestServePortTLS(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		_, _ = io.WriteString(w, r.Header.Get("X-Forwarded-Proto"))
	}))
	t.Cleanup(s.Close)
	certs := httptest.NewUnstartedServer(nil)
	certs.StartTLS() // for its certificate and a client that trusts it
	client := certs.Client()
	certs.Close()
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.update(svcState(t, "echo", []string{s.Listener.Addr().String()}, []string{HealthHealthy}))
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := newServeFront(ln, rt, certs.TLS, hclog.NewNullLogger())
	served := make(chan error, 1)
	go func() { served <- f.serve() }()
	t.Cleanup(func() {
		_ = f.shutdown(context.Background())
		<-served
		rt.closeConns()
	})
	url := "https://" + ln.Addr().String() + "/svc/echo/x"
	for _, body := range []io.Reader{nil, io.MultiReader(strings.NewReader("chunked"))} { // the second: unknown length, handed off
		req, _ := http.NewRequest(http.MethodPost, url, body)
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != "https" || resp.TLS == nil {
			t.Fatalf("got %d %q (TLS %v)", resp.StatusCode, b, resp.TLS != nil)
		}
	}
	if s, h := f.served.Load(), f.handed.Load(); s != 1 || h != 1 {
		t.Fatalf("answered %d, handed %d; want 1 and 1", s, h)
	}
}

// An interim answer (103 Early Hints) reaches the client before the final
// one, with its own headers.
func TestServePortPassesInterimAnswers(t *testing.T) {
	addr, _ := cannedReplica(t, map[string]string{
		"/early": "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
	})
	_, front := serveTestFront(t, addr)
	c, err := net.Dial("tcp", front)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	_, _ = io.WriteString(c, "GET /svc/echo/early HTTP/1.1\r\nHost: x\r\n\r\n")
	br := bufio.NewReader(c)
	var got []string
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("after %q: %v", got, err)
		}
		got = append(got, strings.TrimRight(line, "\r\n"))
		if strings.HasPrefix(line, "HTTP/1.1 200") {
			break
		}
	}
	if len(got) != 4 || got[0] != "HTTP/1.1 103 Early Hints" || got[1] != "Link: </a.css>" || got[2] != "" {
		t.Fatalf("the client got %q before the final answer; want 103 with its Link header", got)
	}
}

// parsePlainRequest takes only what the front end can pass on as it is,
// and request routes only a service's target.
func TestParsePlainRequest(t *testing.T) {
	for _, c := range []struct {
		head  string
		plain bool
		route string // the router's URL path, "" for none (net/http's server answers)
	}{
		{"GET /svc/echo/x?q=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n", true, "/svc/echo/x"},
		{"POST /svc/echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n", true, "/svc/echo/x"},
		{"GET /x HTTP/1.1\r\nHost: echo.svc:80\r\n\r\n", true, "/svc/echo/x"},
		{"GET /svc/echo/a/../b HTTP/1.1\r\nHost: a\r\n\r\n", true, ""}, // ServeMux would redirect
		{"GET /v1/health HTTP/1.1\r\nHost: a\r\n\r\n", true, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000000\r\n\r\n", false, ""}, // over maxRetryBody
		{"POST /svc/echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n", false, ""},
		{"POST /svc/echo/x HTTP/1.1\r\nHost: a\r\nContent-Length: +5\r\n\r\n", false, ""},
		{"POST /svc/echo/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n", false, ""},
		{"POST /svc/echo/x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.0\r\nHost: a\r\n\r\n", false, ""},
		{"CONNECT /svc/echo/x HTTP/1.1\r\nHost: a\r\n\r\n", false, ""},
		{"GET http://a/svc/echo/x HTTP/1.1\r\nHost: a\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nX-F: a\r\n b\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nBad Name: v\r\n\r\n", false, ""},
		{"GET /svc/echo/x HTTP/1.1\r\nHost: a\r\nX-A: a\nX-B: b\r\n\r\n", false, ""},
		{"G(T /svc/echo/x HTTP/1.1\r\nHost: a\r\n\r\n", false, ""},
	} {
		pr := plainRequest{header: http.Header{}}
		plain, complete := parsePlainRequest([]byte(c.head), &pr)
		if !complete || plain != c.plain {
			t.Errorf("%q: plain %v (complete %v), want %v", c.head, plain, complete, c.plain)
			continue
		}
		if !plain {
			continue
		}
		route := ""
		if req := pr.request(&http.Request{}, "192.0.2.1:5"); req != nil {
			route = req.URL.Path
		}
		if route != c.route {
			t.Errorf("%q: routed as %q, want %q", c.head, route, c.route)
		}
	}
	pr := plainRequest{header: http.Header{}}
	if _, complete := parsePlainRequest([]byte("GET /svc/echo/x HTTP/1.1\r\nHost: a\r\n"), &pr); complete {
		t.Errorf("a head without its blank line counts as whole")
	}
	if plain, _ := parsePlainRequest([]byte("GET /svc/e/x HTTP/1.1\r\nhost: a\r\nconnection: close\r\nx-k: 1\r\nX-K: 2\r\n\r\n"), &pr); !plain ||
		!pr.closeAfter || pr.host != "a" || strings.Join(pr.header["X-K"], ",") != "1,2" || pr.header["Host"] != nil {
		t.Errorf("got %+v", pr)
	}
}

// A client that sends Expect: 100-continue gets exactly one 100 Continue,
// through the HTTP port and the serve port (which hands such a request to
// net/http's server), whether the replica answers the expectation itself
// (Go's server does) or sends a 100 it was not asked for: the router
// answers the expectation, and no replica's 100 reaches the client.
func TestRouterOneContinueForExpect(t *testing.T) { bothPaths(t, testRouterOneContinueForExpect) }

func testRouterOneContinueForExpect(t *testing.T, p routePath) {
	unasked, _ := cannedReplica(t, map[string]string{
		"/gen": "HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nB generated",
	})
	for _, c := range []struct{ name, replica, want string }{
		{"replica answers Expect", replica(t, "A").Listener.Addr().String(), "A POST /gen prompt"},
		{"replica sends 100 unasked", unasked, "B generated"},
	} {
		t.Run(c.name, func(t *testing.T) {
			rt, front := newTestRouter(t, p)
			rt.update(svcState(t, "echo", []string{c.replica}, []string{HealthHealthy}))
			conn, err := net.Dial("tcp", front.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
			_, _ = io.WriteString(conn, "POST /svc/echo/gen HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nExpect: 100-continue\r\n\r\n")
			br := bufio.NewReader(conn)
			// The body goes once the first 100 Continue came, as a client
			// that waits for it sends it.
			continues, sent := 0, false
			var final *http.Response
			for final == nil {
				resp, err := http.ReadResponse(br, nil)
				if err != nil {
					t.Fatalf("after %d 100 Continue: %v", continues, err)
				}
				switch {
				case resp.StatusCode == http.StatusContinue:
					continues++
					if !sent {
						_, _ = io.WriteString(conn, "prompt")
						sent = true
					}
				case resp.StatusCode >= 200:
					final = resp
				}
			}
			b, _ := io.ReadAll(final.Body)
			if final.StatusCode != http.StatusOK || string(b) != c.want {
				t.Fatalf("got %d %q, want 200 %q", final.StatusCode, b, c.want)
			}
			// A stray 100 after the final answer would show as the next
			// answer on the connection: ask once more, without Expect.
			_, _ = io.WriteString(conn, "GET /svc/echo/gen HTTP/1.1\r\nHost: x\r\n\r\n")
			next, err := http.ReadResponse(br, nil)
			if err != nil {
				t.Fatal(err)
			}
			next.Body.Close()
			if next.StatusCode == http.StatusContinue {
				continues++
			}
			if continues != 1 {
				t.Fatalf("the client got %d 100 Continue answers, want 1", continues)
			}
		})
	}
}

// requestURL gives what url.ParseRequestURI gives for every target a plain
// request may carry.
func TestRequestURLAsParseRequestURI(t *testing.T) {
	for _, target := range []string{
		"/", "/svc/echo/x", "/svc/echo/a-b_c.d~e/$&+,:;=@", "/svc/e/x?", "/svc/e/x??", "/svc/e/x?a=1&b=%20",
		"/svc/e/x?a b", "/svc/e/%2F", "/svc/e/a b", "/svc/e/a!b", "/svc/e/a#b", "//host/x", "/svc/e/ü", "/svc/e/x?ü",
		"/svc/e/x?a=\x01", "/svc/e/\x7f", "/svc/e/x?#f",
	} {
		want, werr := url.ParseRequestURI(target)
		got, err := requestURL(target)
		if (err == nil) != (werr == nil) || (err == nil && *got != *want) {
			t.Errorf("%q: got %#v (%v), want %#v (%v)", target, got, err, want, werr)
		}
	}
}
