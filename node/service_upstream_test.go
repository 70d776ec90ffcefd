package node

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// seen is what a client of the router gets back, and what the replica got.
type seen struct {
	Status  int
	Header  http.Header
	Body    string
	Trailer http.Header
}

// The fast path sends the replica, and the client, what the general path
// (httputil.ReverseProxy) does: hop-by-hop headers and those Connection
// names dropped both ways, X-Forwarded-* of this hop, the path below
// /svc/NAME as sent, Host, bodies, HEAD, trailers.
func TestRouterFastPathForwardsAsTheGeneralPathDoes(t *testing.T) {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var lines []string
		for k, vv := range r.Header {
			lines = append(lines, k+": "+strings.Join(vv, " | "))
		}
		sort.Strings(lines)
		h := w.Header()
		h.Set("Connection", "X-Hop")
		h.Set("X-Hop", "dropped")
		h.Set("Keep-Alive", "timeout=5")
		h.Add("X-Answer", "a")
		h.Add("X-Answer", "b")
		if r.URL.Query().Get("trailer") != "" {
			h.Set("Trailer", "X-Sum")
		}
		_, _ = fmt.Fprintf(w, "%s %s host=%s len=%d body=%q\n%s", r.Method, r.RequestURI, r.Host, r.ContentLength, body, strings.Join(lines, "\n"))
		if r.URL.Query().Get("trailer") != "" {
			w.(http.Flusher).Flush() // chunked, so that the trailer follows
			h.Set("X-Sum", "42")
			h.Set(http.TrailerPrefix+"X-Late", "unannounced")
		}
	}))
	t.Cleanup(s.Close)
	client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
	t.Cleanup(client.CloseIdleConnections)
	do := func(front, method, path, body string, header http.Header) seen {
		t.Helper()
		var rd io.Reader
		if body != "" {
			rd = strings.NewReader(body)
		}
		req, err := http.NewRequest(method, front+path, rd)
		if err != nil {
			t.Fatal(err)
		}
		req.Header = header.Clone()
		req.Host = "echo.example:8080"
		resp, err := client.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		resp.Header.Del("Date")
		return seen{Status: resp.StatusCode, Header: resp.Header, Body: string(b), Trailer: resp.Trailer}
	}
	hdr := http.Header{
		"Connection":          {"X-Drop, Keep-Alive"},
		"X-Drop":              {"dropped"},
		"Keep-Alive":          {"timeout=5"},
		"Te":                  {"trailers"},
		"X-Forwarded-For":     {"192.0.2.1"},
		"X-Forwarded-Host":    {"spoofed"},
		"Forwarded":           {"for=192.0.2.1"},
		"Proxy-Authorization": {"Basic eA=="},
		"X-Keep":              {"one", "two"},
		"Accept":              {"*/*"},
	}
	cases := []struct{ method, path, body string }{
		{http.MethodGet, "/svc/echo/a/b%2Fc?q=1&r=%20", ""},
		{http.MethodGet, "/svc/echo", ""},
		{http.MethodPost, "/svc/echo/gen", `{"x":[1,2,3,4]}`},
		{http.MethodPost, "/svc/echo/empty", ""},
		{http.MethodPut, "/svc/echo/put", "v"},
		{http.MethodHead, "/svc/echo/head", ""},
		{http.MethodGet, "/svc/echo/t?trailer=1", ""},
	}
	got := map[routePath][]seen{}
	for _, p := range []routePath{pathFast, pathGeneral, pathServe} {
		rt, front := newTestRouter(t, p)
		rt.update(svcState(t, "echo", []string{s.Listener.Addr().String()}, []string{HealthHealthy}))
		for _, c := range cases {
			got[p] = append(got[p], do(front.URL, c.method, c.path, c.body, hdr))
		}
	}
	for i, c := range cases {
		general := got[pathGeneral][i]
		for _, p := range []routePath{pathFast, pathServe} {
			this := got[p][i]
			if this.Status != http.StatusOK {
				t.Errorf("%s %s: %s path %d %q", c.method, c.path, p, this.Status, this.Body)
			}
			if !reflect.DeepEqual(this, general) {
				t.Errorf("%s %s:\n%s path: %+v\ngeneral path: %+v", c.method, c.path, p, this, general)
			}
		}
	}
	// What the general path does, checked once so that the comparison above
	// means something.
	first := got[pathFast][0]
	for _, want := range []string{"GET /a/b%2Fc?q=1&r=%20 host=echo.example:8080", "X-Forwarded-For: 127.0.0.1\n", "X-Forwarded-Host: echo.example:8080", "X-Keep: one | two", "Te: trailers"} {
		if !strings.Contains(first.Body, want) {
			t.Errorf("the replica saw %q; want %q in it", first.Body, want)
		}
	}
	for _, not := range []string{"X-Drop", "Keep-Alive", "Proxy-Authorization", "spoofed", "Forwarded: "} {
		if strings.Contains(first.Body, not) {
			t.Errorf("the replica saw %q; want no %q", first.Body, not)
		}
	}
	if first.Header.Get("X-Hop") != "" || first.Header.Get("Keep-Alive") != "" || len(first.Header["X-Answer"]) != 2 {
		t.Errorf("the client got headers %v; want X-Answer twice, no X-Hop or Keep-Alive", first.Header)
	}
	if tr := got[pathServe][len(cases)-1].Trailer; tr.Get("X-Sum") != "42" || tr.Get("X-Late") != "unannounced" {
		t.Errorf("trailers %v; want X-Sum 42 and X-Late", tr)
	}
}

// rawReplica is a replica written at the byte level: it records each
// request's head as it came and answers "ok" with keep-alive, then, if
// hangUp, closes the connection (as a replica's idle timeout would) and
// says so on closed.
type rawReplica struct {
	ln     net.Listener
	hangUp bool
	closed chan struct{}
	mu     sync.Mutex
	heads  []string
	// accepted counts the connections it accepted.
	accepted func() int
}

func newRawReplica(t *testing.T, hangUp bool) *rawReplica {
	r := &rawReplica{hangUp: hangUp, closed: make(chan struct{}, 16)}
	r.ln, r.accepted = serveRawConns(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			head, body, err := readRawRequest(br)
			if err != nil {
				return
			}
			r.mu.Lock()
			r.heads = append(r.heads, head+string(body))
			r.mu.Unlock()
			if _, err := io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"); err != nil {
				return
			}
			if r.hangUp {
				c.Close()
				r.closed <- struct{}{}
				return
			}
		}
	})
	return r
}

// serveRawConns listens on a loopback port and runs serve on each
// connection it accepts (closing it after); it counts the connections.
// Everything is closed and waited for at the test's end.
func serveRawConns(t *testing.T, serve func(net.Conn)) (net.Listener, func() int) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var open []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return ln, func() int {
		mu.Lock()
		defer mu.Unlock()
		return len(open)
	}
}

// readRawRequest reads a request's head as it came, and its body as the
// head frames it (chunked first, as a server must).
func readRawRequest(br *bufio.Reader) (head string, body []byte, err error) {
	var b strings.Builder
	length, chunked := int64(0), false
	for {
		line, err := br.ReadString('\n')
		if err != nil {
			return "", nil, err
		}
		b.WriteString(line)
		if line == "\r\n" {
			break
		}
		k, v, _ := strings.Cut(strings.TrimSpace(line), ":")
		switch strings.ToLower(k) {
		case "content-length":
			length, _ = strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		case "transfer-encoding":
			chunked = strings.EqualFold(strings.TrimSpace(v), "chunked")
		}
	}
	var rd io.Reader = io.LimitReader(br, length)
	if chunked {
		rd = httputil.NewChunkedReader(br)
	}
	body, err = io.ReadAll(rd)
	if chunked && err == nil {
		_, err = br.ReadString('\n') // the chunked body's last CRLF
	}
	return b.String(), body, err
}

func (r *rawReplica) got() ([]string, int) {
	r.mu.Lock()
	heads := append([]string(nil), r.heads...)
	r.mu.Unlock()
	return heads, r.accepted()
}

// A connection the replica closed while it sat in the pool (it exited, or
// timed the connection out) costs no request: a GET is sent again on a
// fresh one, and before a POST is written on a kept-alive connection, the
// router checks that the replica has not closed it.
func TestRouterFastPathSurvivesConnectionsClosedWhileIdle(t *testing.T) {
	rep := newRawReplica(t, true)
	rt, front := newTestRouter(t, pathFast)
	rt.update(svcState(t, "echo", []string{rep.ln.Addr().String()}, []string{HealthHealthy}))
	for i, method := range []string{http.MethodGet, http.MethodGet, http.MethodPost, http.MethodPost} {
		req, err := http.NewRequest(method, front.URL+"/svc/echo/x", strings.NewReader("p"))
		if err != nil {
			t.Fatal(err)
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(b) != "ok" {
			t.Fatalf("request %d (%s): %d %q; want the replica's ok on a fresh connection", i, method, resp.StatusCode, b)
		}
		select { // the replica hung up: the pooled connection is dead now
		case <-rep.closed:
		case <-time.After(10 * time.Second):
			t.Fatal("the replica never closed its connection")
		}
	}
	if heads, conns := rep.got(); len(heads) != 4 || conns < 4 {
		t.Fatalf("the replica got %d requests on %d connections; want 4 on 4", len(heads), conns)
	}
}

// The replica never sees both Content-Length and Transfer-Encoding, nor a
// body other than the one the router's server read: a request carrying
// both (a smuggling attempt) is forwarded chunked with its chunked body, and
// one with two different lengths is refused before routing.
func TestRouterForwardsNoAmbiguousLength(t *testing.T) {
	for _, general := range []routePath{pathFast, pathGeneral, pathServe} {
		rep := newRawReplica(t, false)
		rt, front := newTestRouter(t, general)
		rt.update(svcState(t, "echo", []string{rep.ln.Addr().String()}, []string{HealthHealthy}))
		send := func(raw string) string {
			t.Helper()
			c, err := net.Dial("tcp", front.Listener.Addr().String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, raw); err != nil {
				t.Fatal(err)
			}
			resp, err := http.ReadResponse(bufio.NewReader(c), nil)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			return fmt.Sprintf("%d %s", resp.StatusCode, b)
		}
		got := send("POST /svc/echo/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
		if got != "200 ok" {
			t.Fatalf("%s path: CL+TE request: %s", general, got)
		}
		if got := send("POST /svc/echo/b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nhello"); !strings.HasPrefix(got, "400 ") {
			t.Fatalf("%s path: two Content-Lengths: %s, want 400", general, got)
		}
		if got := send("POST /svc/echo/c HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"); got != "200 ok" {
			t.Fatalf("%s path: plain POST: %s", general, got)
		}
		heads, _ := rep.got()
		if len(heads) != 2 {
			t.Fatalf("%s path: the replica got %d requests, want 2: %q", general, len(heads), heads)
		}
		for _, h := range heads {
			if cl, te := strings.Contains(h, "Content-Length:"), strings.Contains(h, "Transfer-Encoding:"); cl == te {
				t.Fatalf("%s path: the replica got %q: want exactly one of Content-Length and Transfer-Encoding", general, h)
			}
			if !strings.HasSuffix(h, "\r\n\r\nhello") {
				t.Fatalf("%s path: the replica got %q, want the body hello", general, h)
			}
		}
	}
}

// cannedReplica answers each request with the raw answer its path names
// (closing the connection after those that say Connection: close), and
// counts the connections it accepted.
func cannedReplica(t *testing.T, answers map[string]string) (addr string, conns func() int) {
	t.Helper()
	ln, conns := serveRawConns(t, func(c net.Conn) {
		br := bufio.NewReader(c)
		for {
			head, _, err := readRawRequest(br)
			if err != nil {
				return
			}
			path := strings.Fields(head)[1]
			answer, ok := answers[path]
			if !ok {
				answer = "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
			}
			if _, err := io.WriteString(c, answer); err != nil || strings.Contains(answer, "Connection: close") {
				return
			}
		}
	})
	return ln.Addr().String(), conns
}

// Answers the fast path passes on from their buffered head
// (passPlainAnswer) reach the client as through the general path:
// status, headers (hop-by-hop ones dropped, repeated ones kept in order,
// names canonical), bodies longer than the connection's buffer; and a
// connection the replica closes is not reused. Answers that are not plain
// take the general answer code of the fast path, and arrive the same.
func TestRouterPlainAnswersAsTheGeneralPathDoes(t *testing.T) {
	big := strings.Repeat("0123456789abcdef", 10<<10) // 160 KiB: beyond the 4 KiB buffer
	answers := map[string]string{
		"/plain": "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{\"y\":[1,2]}",
		"/headers": "HTTP/1.1 201 Created\r\ncontent-type: text/plain\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nKeep-Alive: timeout=5\r\n" +
			"Proxy-Authenticate: Basic\r\nX-Spaced:   v  \r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok",
		"/big":   "HTTP/1.1 200 OK\r\nContent-Length: " + strconv.Itoa(len(big)) + "\r\n\r\n" + big,
		"/close": "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nbye\r\n",
		"/error": "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 4\r\n\r\noops",
		"/empty": "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
		// Not plain: passed on by readFinal and copyAnswer.
		"/named": "HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nX-Hop: dropped\r\nContent-Length: 2\r\n\r\nok",
		// (With a Content-Type: the general path lets net/http sniff one
		// where there is none, the fast path sends a stream's headers
		// before its first byte and so adds none.)
		"/chunked":   "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
		"/nocontent": "HTTP/1.1 204 No Content\r\n\r\n",
		"/early":     "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
		"/http10":    "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
		"/bighead":   "HTTP/1.1 200 OK\r\nX-Big: " + strings.Repeat("h", 6<<10) + "\r\nContent-Length: 2\r\n\r\nok", // beyond the buffer
	}
	paths := []string{"/plain", "/headers", "/big", "/close", "/plain", "/error", "/empty", "/named", "/chunked", "/nocontent", "/early", "/http10", "/bighead", "/plain"}
	got := map[routePath][]seen{}
	for _, general := range []routePath{pathFast, pathGeneral, pathServe} {
		addr, conns := cannedReplica(t, answers)
		rt, front := newTestRouter(t, general)
		rt.update(svcState(t, "canned", []string{addr}, []string{HealthHealthy}))
		client := &http.Client{Transport: &http.Transport{DisableCompression: true}}
		t.Cleanup(client.CloseIdleConnections)
		for _, p := range paths {
			resp, err := client.Get(front.URL + "/svc/canned" + p)
			if err != nil {
				t.Fatal(err)
			}
			b, err := io.ReadAll(resp.Body)
			resp.Body.Close()
			if err != nil {
				t.Fatalf("%s path %s: %v", general, p, err)
			}
			resp.Header.Del("Date")
			got[general] = append(got[general], seen{Status: resp.StatusCode, Header: resp.Header, Body: string(b), Trailer: resp.Trailer})
		}
		// One connection for the whole sequence, but for those the
		// replica closed (/close; /http10, an HTTP/1.0 answer without
		// keep-alive).
		if n := conns(); general != pathGeneral && n != 3 {
			t.Errorf("%s path: the replica accepted %d connections, want 3", general, n)
		}
	}
	for i, p := range paths {
		for _, rp := range []routePath{pathFast, pathServe} {
			if !reflect.DeepEqual(got[rp][i], got[pathGeneral][i]) {
				t.Errorf("%s:\n%s path:    %+v\ngeneral path: %+v", p, rp, got[rp][i], got[pathGeneral][i])
			}
		}
	}
	h := got[pathServe][1]
	if h.Status != http.StatusCreated || h.Header.Get("Content-Type") != "text/plain" || len(h.Header["Set-Cookie"]) != 2 ||
		h.Header.Get("X-Spaced") != "v" || h.Header.Get("Keep-Alive") != "" || h.Header.Get("Proxy-Authenticate") != "" || h.Body != "ok" {
		t.Errorf("/headers: got %+v", h)
	}
	if got[pathServe][2].Body != big {
		t.Errorf("/big: got %d bytes, want %d", len(got[pathServe][2].Body), len(big))
	}
}

// parsePlainHead takes only what passPlainAnswer can pass on as it is.
func TestParsePlainHead(t *testing.T) {
	for _, c := range []struct {
		head  string
		plain bool
	}{
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", true},
		{"HTTP/1.1 200\r\nContent-Length: 3\r\n", true},
		{"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nX-A: b\r\n", true},
		{"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n", true},
		{"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, close\r\nContent-Length: 3\r\n", true},
		{"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 100 Continue\r\n", false},
		{"HTTP/1.1 101 Switching Protocols\r\nContent-Length: 0\r\n", false},
		{"HTTP/1.1 204 No Content\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 304 Not Modified\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 200 OK\r\n", false}, // no length: read to EOF
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: +3\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: \r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTrailer: X-Sum\r\n", false},
		{"HTTP/1.1 200 OK\r\nConnection: X-Hop\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Folded: a\r\n b\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Bare: a\nX-Other: b\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nBad Name: v\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nNo-Colon\r\n", false},
		{"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-Ctl: a\x00b\r\n", false},
		{"HTTP/1.1 2000 OK\r\nContent-Length: 3\r\n", false},
		{"HTTP/1.1 200 OK\r\n" + strings.Repeat("X-Many: v\r\n", maxPlainHeaders) + "Content-Length: 3\r\n", false},
	} {
		var arr [maxPlainHeaders]plainField
		_, _, _, _, ok := parsePlainHead([]byte(c.head), arr[:0])
		if ok != c.plain {
			t.Errorf("%q: plain %v, want %v", c.head, ok, c.plain)
		}
	}
	var arr [maxPlainHeaders]plainField
	status, fields, length, closeAfter, ok := parsePlainHead([]byte("HTTP/1.1 201 Created\r\ncontent-type: a/b\r\nKeep-Alive: x\r\nConnection: close\r\nContent-Length: 12\r\n"), arr[:0])
	want := []plainField{{"Content-Type", "a/b", false}, {"Keep-Alive", "x", true}, {"Connection", "close", true}, {"Content-Length", "12", false}}
	if !ok || status != 201 || length != 12 || !closeAfter || !reflect.DeepEqual(fields, want) {
		t.Errorf("got %d %+v %d %v %v", status, fields, length, closeAfter, ok)
	}
}

// A client that goes away while the replica works on its request ends the
// request on the replica too (the router closes its connection there), on
// both paths: a model server stops generating for nobody.
func TestRouterClientGoneEndsTheReplicasRequest(t *testing.T) {
	bothPaths(t, func(t *testing.T, general routePath) {
		got, ended := make(chan struct{}, 1), make(chan struct{}, 1)
		s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			got <- struct{}{}
			select {
			case <-r.Context().Done():
				ended <- struct{}{}
			case <-time.After(30 * time.Second):
			}
		}))
		t.Cleanup(s.Close)
		rt, front := newTestRouter(t, general)
		rt.update(svcState(t, "slow", []string{s.Listener.Addr().String()}, []string{HealthHealthy}))
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, front.URL+"/svc/slow/generate", nil)
		if err != nil {
			t.Fatal(err)
		}
		client := &http.Client{Transport: &http.Transport{}}
		t.Cleanup(client.CloseIdleConnections)
		errc := make(chan error, 1)
		go func() {
			resp, err := client.Do(req)
			if err == nil {
				resp.Body.Close()
			}
			errc <- err
		}()
		select {
		case <-got:
		case <-time.After(10 * time.Second):
			t.Fatal("the request never reached the replica")
		}
		cancel() // the client goes away
		if err := <-errc; err == nil {
			t.Fatal("the cancelled request got an answer")
		}
		select {
		case <-ended:
		case <-time.After(10 * time.Second):
			t.Fatal("the replica still works on the request of a client that went away")
		}
	})
}
