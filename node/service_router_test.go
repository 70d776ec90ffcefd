package node

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httptrace"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// svcState builds a service job and one running allocation per replica
// address, each with the given health.
func svcState(t testing.TB, name string, addrs []string, health []string) ([]*pb.Job, []*pb.Allocation) {
	t.Helper()
	spec, err := jobspec.Parse([]byte("name: " + name + "\ntype: service\nreplicas: " + strconv.Itoa(max(1, len(addrs))) + "\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	job := &pb.Job{Id: "job-" + name, Spec: spec, Status: consensus.JobRunning}
	var allocs []*pb.Allocation
	for i, a := range addrs {
		host, port, _ := net.SplitHostPort(a)
		p, _ := strconv.Atoi(port)
		allocs = append(allocs, &pb.Allocation{
			Id: name + "-a" + strconv.Itoa(i), JobId: job.Id, Rank: int32(i), NodeId: "n" + strconv.Itoa(i), NodeName: "node" + strconv.Itoa(i),
			RankAddr: net.JoinHostPort(host, "7947"), DesiredStatus: consensus.DesiredRun, ClientStatus: consensus.AllocRunning,
			Ports: map[string]int32{"http": int32(p)}, Health: health[i],
		})
	}
	return []*pb.Job{job}, allocs
}

func replica(t *testing.T, id string) *httptest.Server {
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		_, _ = io.WriteString(w, id+" "+r.Method+" "+r.URL.Path+" "+string(body))
	}))
	t.Cleanup(s.Close)
	return s
}

// routePath is a way a request reaches the router in tests.
type routePath string

const (
	pathFast    routePath = "fast"    // the HTTP port's server, the router's fast path
	pathGeneral routePath = "general" // the HTTP port's server, httputil.ReverseProxy only
	pathServe   routePath = "serve"   // the serve port's front end, the fast path
)

// testFront is where a test sends its requests.
type testFront struct {
	URL      string
	Listener net.Listener
}

// newTestRouter returns a router and a front end serving it by path p.
func newTestRouter(t *testing.T, p routePath) (*router, *testFront) {
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.general = p == pathGeneral
	if p == pathServe {
		f := startServeFront(t, rt)
		return rt, &testFront{URL: "http://" + f.ln.Addr().String(), Listener: f.ln}
	}
	front := httptest.NewServer(rt)
	t.Cleanup(func() { front.Close(); rt.closeConns() })
	return rt, &testFront{URL: front.URL, Listener: front.Listener}
}

// startServeFront serves rt on a serve port front end until the test ends.
func startServeFront(t *testing.T, rt *router) *serveFront {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := newServeFront(ln, rt, nil, hclog.NewNullLogger())
	done := make(chan error, 1)
	go func() { done <- f.serve() }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := f.shutdown(ctx); err != nil {
			t.Errorf("serve port shutdown: %v", err)
		}
		if err := <-done; !errors.Is(err, errServeClosed) {
			t.Errorf("serve port: %v", err)
		}
		rt.closeConns()
	})
	return f
}

// bothPaths runs test on the router's fast path and on its general one
// through the HTTP port's server, and on the fast path through the serve
// port's front end.
func bothPaths(t *testing.T, test func(t *testing.T, p routePath)) {
	for _, p := range []routePath{pathFast, pathGeneral, pathServe} {
		t.Run(string(p), func(t *testing.T) { test(t, p) })
	}
}

func get(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

func TestRouterRoutesToHealthyReplicas(t *testing.T) { bothPaths(t, testRouterRoutesToHealthyReplicas) }

func testRouterRoutesToHealthyReplicas(t *testing.T, p routePath) {
	a, b, c := replica(t, "A"), replica(t, "B"), replica(t, "C")
	rt, front := newTestRouter(t, p)
	rt.update(svcState(t, "echo", []string{a.Listener.Addr().String(), b.Listener.Addr().String(), c.Listener.Addr().String()},
		[]string{HealthHealthy, HealthHealthy, HealthUnhealthy}))
	seen := map[string]int{}
	for i := 0; i < 20; i++ {
		code, body := get(t, front.URL+"/svc/echo/v1/predict")
		if code != http.StatusOK {
			t.Fatalf("status %d: %s", code, body)
		}
		if !strings.HasSuffix(body, " GET /v1/predict ") {
			t.Fatalf("the replica saw %q; want the path without /svc/echo", body)
		}
		seen[body[:1]]++
	}
	if seen["C"] != 0 || seen["A"] == 0 || seen["B"] == 0 {
		t.Fatalf("requests per replica %v: want A and B, never the unhealthy C", seen)
	}
	if code, body := get(t, front.URL+"/svc/echo"); code != http.StatusOK || !strings.Contains(body, " GET / ") {
		t.Fatalf("/svc/echo: %d %q, want the replica's /", code, body)
	}
}

func TestRouterBadInput(t *testing.T) { bothPaths(t, testRouterBadInput) }

func testRouterBadInput(t *testing.T, p routePath) {
	a := replica(t, "A")
	rt, front := newTestRouter(t, p)
	jobs, allocs := svcState(t, "echo", []string{a.Listener.Addr().String()}, []string{HealthStarting})
	rt.update(jobs, allocs)
	code, body := get(t, front.URL+"/svc/nosuch/x")
	if code != http.StatusNotFound || !strings.Contains(body, `no service named "nosuch"`) {
		t.Fatalf("unknown service: %d %q", code, body)
	}
	code, body = get(t, front.URL+"/svc/echo/x")
	if code != http.StatusServiceUnavailable || !strings.Contains(body, "none is healthy (1 starting)") {
		t.Fatalf("no healthy replica: %d %q", code, body)
	}
	rt.update(jobs, nil)
	if code, body = get(t, front.URL+"/svc/echo/x"); code != http.StatusServiceUnavailable || !strings.Contains(body, "no running replica") {
		t.Fatalf("no replica: %d %q", code, body)
	}
}

// A replica that cannot be reached (it died without notice) costs no
// request: the router retries once on another one, POSTs included, since
// nothing reached the dead one.
func TestRouterRetriesOnDeadReplica(t *testing.T) { bothPaths(t, testRouterRetriesOnDeadReplica) }

func testRouterRetriesOnDeadReplica(t *testing.T, p routePath) {
	b := replica(t, "B")
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := ln.Addr().String()
	ln.Close()
	rt, front := newTestRouter(t, p)
	rt.update(svcState(t, "echo", []string{dead, b.Listener.Addr().String()}, []string{HealthHealthy, HealthHealthy}))
	for i := 0; i < 6; i++ {
		resp, err := http.Post(front.URL+"/svc/echo/gen", "text/plain", strings.NewReader("prompt"))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK || string(body) != "B POST /gen prompt" {
			t.Fatalf("try %d: %d %q", i, resp.StatusCode, body)
		}
	}
}

// A streamed answer passes unbuffered: the first event reaches the client
// while the replica still holds the rest back.
func TestRouterStreamsUnbuffered(t *testing.T) { bothPaths(t, testRouterStreamsUnbuffered) }

func testRouterStreamsUnbuffered(t *testing.T, p routePath) {
	release := make(chan struct{})
	s := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/event-stream")
		_, _ = io.WriteString(w, "data: first\n\n")
		w.(http.Flusher).Flush()
		select {
		case <-release:
		case <-r.Context().Done():
		}
		_, _ = io.WriteString(w, "data: last\n\n")
	}))
	t.Cleanup(s.Close)
	defer close(release)
	rt, front := newTestRouter(t, p)
	rt.update(svcState(t, "llm", []string{s.Listener.Addr().String()}, []string{HealthHealthy}))
	// The whole exchange must end in time: a buffered first event never
	// comes.
	client := &http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get(front.URL + "/svc/llm/stream")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	line, err := bufio.NewReader(resp.Body).ReadString('\n')
	if err != nil || line != "data: first\n" {
		t.Fatalf("first line %q, %v", line, err)
	}
}

func TestHealthState(t *testing.T) {
	t0 := time.Unix(1000, 0)
	h := newHealthState(t0, 2, 10*time.Second)
	steps := []struct {
		ok   bool
		at   time.Duration
		want string
	}{
		{false, time.Second, HealthStarting},     // loading: within grace
		{false, 5 * time.Second, HealthStarting}, // still
		{true, 6 * time.Second, HealthHealthy},   // first pass ends the grace
		{false, 7 * time.Second, HealthHealthy},  // one failure of two
		{true, 8 * time.Second, HealthHealthy},   // resets the count
		{false, 9 * time.Second, HealthHealthy},
		{false, 10 * time.Second, HealthUnhealthy}, // threshold reached
		{true, 11 * time.Second, HealthHealthy},
	}
	for i, s := range steps {
		if got := h.observe(s.ok, t0.Add(s.at)); got != s.want {
			t.Fatalf("step %d: %s, want %s", i, got, s.want)
		}
	}
	late := newHealthState(t0, 1, time.Second)
	if got := late.observe(false, t0.Add(2*time.Second)); got != HealthUnhealthy {
		t.Fatalf("a replica failing after its grace: %s, want unhealthy", got)
	}
}

// On a tie of requests in flight a router prefers a replica in its own
// availability zone (after one on its own node).
func TestRouterPrefersItsZoneOnATie(t *testing.T) {
	a, b, c := replica(t, "A"), replica(t, "B"), replica(t, "C")
	rt := newRouter("n-router", "us-east-1a", hclog.NewNullLogger())
	front := httptest.NewServer(rt)
	t.Cleanup(front.Close)
	jobs, allocs := svcState(t, "echo", []string{a.Listener.Addr().String(), b.Listener.Addr().String(), c.Listener.Addr().String()},
		[]string{HealthHealthy, HealthHealthy, HealthHealthy})
	rt.update(jobs, allocs, &pb.Node{Id: "n0", Az: "us-east-1b"}, &pb.Node{Id: "n1", Az: "us-east-1a"}, &pb.Node{Id: "n2", Az: "us-east-1c"})
	for i := 0; i < 10; i++ {
		if code, body := get(t, front.URL+"/svc/echo/x"); code != http.StatusOK || body[:1] != "B" {
			t.Fatalf("request %d went to %q (%d); want B, the one replica in us-east-1a", i, body, code)
		}
	}
	// Its own node comes first.
	allocs[2].NodeId = "n-router"
	rt.update(jobs, allocs, &pb.Node{Id: "n0", Az: "us-east-1b"}, &pb.Node{Id: "n1", Az: "us-east-1a"})
	if code, body := get(t, front.URL+"/svc/echo/x"); code != http.StatusOK || body[:1] != "C" {
		t.Fatalf("went to %q (%d); want C, on the router's node", body, code)
	}
}

// A replica that dies holding a whole request (it read it, then closed the
// connection without an answer) may have acted on it: a POST is not sent
// again, and its 502 says why; a GET goes to another replica.
func TestRouterRetriesOnlyWhatIsSafe(t *testing.T) { bothPaths(t, testRouterRetriesOnlyWhatIsSafe) }

func testRouterRetriesOnlyWhatIsSafe(t *testing.T, p routePath) {
	dying := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.ReadAll(r.Body)
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	}))
	t.Cleanup(dying.Close)
	b := replica(t, "B")
	rt, front := newTestRouter(t, p)
	rt.update(svcState(t, "echo", []string{dying.Listener.Addr().String(), b.Listener.Addr().String()}, []string{HealthHealthy, HealthHealthy}))
	refused := 0
	for i := 0; i < 4; i++ {
		resp, err := http.Post(front.URL+"/svc/echo/gen", "text/plain", strings.NewReader("prompt"))
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusOK && string(body) == "B POST /gen prompt":
		case resp.StatusCode == http.StatusBadGateway && strings.Contains(string(body), "not retried: the replica had the whole request and POST is not idempotent"):
			refused++
		default:
			t.Fatalf("POST %d: %d %q", i, resp.StatusCode, body)
		}
	}
	if refused == 0 {
		t.Fatalf("no POST reached the dying replica; the test proves nothing")
	}
	for i := 0; i < 4; i++ {
		if code, body := get(t, front.URL+"/svc/echo/gen"); code != http.StatusOK || body != "B GET /gen " {
			t.Fatalf("GET %d: %d %q; want it answered by B", i, code, body)
		}
	}
}

// roundTripFunc is an http.RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// A POST whose connection was reset before the request was written is
// retried on another replica (the first never had it); once it was written
// it is not.
func TestRouterRetriesAPostResetBeforeItWasWritten(t *testing.T) {
	b := replica(t, "B")
	const dead = "127.0.0.1:1" // never dialled: the transport below fails it
	for _, c := range []struct {
		name    string
		written bool
		want    int
	}{{"reset before the write", false, http.StatusOK}, {"reset after the write", true, http.StatusBadGateway}} {
		t.Run(c.name, func(t *testing.T) {
			rt, front := newTestRouter(t, pathGeneral) // fakes the general path's transport
			real := rt.transport
			rt.transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
				if r.URL.Host != dead {
					return real.RoundTrip(r)
				}
				if c.written {
					httptrace.ContextClientTrace(r.Context()).WroteRequest(httptrace.WroteRequestInfo{})
				}
				return nil, &net.OpError{Op: "read", Net: "tcp", Err: syscall.ECONNRESET}
			})
			rt.update(svcState(t, "echo", []string{dead, b.Listener.Addr().String()}, []string{HealthHealthy, HealthHealthy}))
			for i := 0; i < 2; i++ { // one of them is sent to the dead replica first
				resp, err := http.Post(front.URL+"/svc/echo/gen", "text/plain", strings.NewReader("prompt"))
				if err != nil {
					t.Fatal(err)
				}
				body, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode == c.want && resp.StatusCode != http.StatusOK {
					return
				}
				if resp.StatusCode != http.StatusOK || string(body) != "B POST /gen prompt" {
					t.Fatalf("POST %d: %d %q, want %d", i, resp.StatusCode, body, c.want)
				}
			}
			if c.want != http.StatusOK {
				t.Fatalf("no POST went to the dead replica")
			}
		})
	}
}

// The Host form: NAME.svc[.domain][:port] reaches the service with the path
// as the client sent it; other hosts reach the agent's own handlers.
func TestRouterHostForm(t *testing.T) { bothPaths(t, testRouterHostForm) }

func testRouterHostForm(t *testing.T, p routePath) {
	a := replica(t, "A")
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.general = p == pathGeneral
	rt.update(svcState(t, "echo", []string{a.Listener.Addr().String()}, []string{HealthHealthy}))
	// Other hosts reach the agent's own handlers on the HTTP port, and a
	// 404 that says so on the serve port.
	other := "agent /v1/predict"
	url := ""
	if p == pathServe {
		other = "this is the agent's service port"
		url = "http://" + startServeFront(t, rt).ln.Addr().String()
	} else {
		agentAPI := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { _, _ = io.WriteString(w, "agent "+r.URL.Path) })
		front := httptest.NewServer(hostRouted(rt, agentAPI))
		t.Cleanup(front.Close)
		url = front.URL
	}
	for host, want := range map[string]string{
		"echo.svc":                     "A GET /v1/predict ",
		"echo.svc:8080":                "A GET /v1/predict ",
		"echo.svc.cluster.example:443": "A GET /v1/predict ",
		"echo.svcx":                    other,
		"svc.example":                  other,
		"127.0.0.1":                    other,
		"nosuch.svc":                   `no service named "nosuch"`,
	} {
		req, err := http.NewRequest(http.MethodGet, url+"/v1/predict", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !strings.Contains(string(b), want) {
			t.Errorf("Host %s: got %d %q, want %q", host, resp.StatusCode, b, want)
		}
	}
}
