package node

import (
	"bytes"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/http/httputil"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Routing limits.
const (
	// svcPrefix is the path under which every agent's HTTP port routes to
	// services: /svc/NAME/rest goes to a replica of NAME as /rest.
	svcPrefix = "/svc/"
	// maxRetryBody is the largest request body kept for a retry on another
	// replica; a larger one is streamed and not retried.
	maxRetryBody = 1 << 20
	// MaxHeaderBytes bounds the request headers the agent's HTTP port
	// reads (the proxy included); larger ones get 431.
	MaxHeaderBytes = 64 << 10
)

// backend is one replica as a router sees it.
type backend struct {
	allocID  string
	jobID    string
	nodeID   string
	nodeName string
	rank     int32
	addr     string                 // host:port of the route port
	prefix   string                 // "/svc/NAME": what the replica does not see of the path
	proxy    *httputil.ReverseProxy // the general path
	pool     *replicaConns          // the fast path's connections (service_upstream.go)
	health   string
	// near ranks the replica's distance from this router, preferred on a
	// tie of requests in flight: nearNode, nearAZ or nearFar.
	near int
	st   *replicaStats
}

// Distances of a replica from a router.
const (
	nearNode = iota // on this node
	nearAZ          // in this node's availability zone
	nearFar         // elsewhere (or a zone unknown)
)

// replicaStats are a router's counters of one replica, kept across table
// updates by allocation ID.
type replicaStats struct {
	inflight atomic.Int64 // requests now on the replica
	requests atomic.Int64 // requests sent to it
}

// serviceRoute is one service: every replica of its live jobs. It and its
// backends are immutable once built (update builds new ones), but for the
// counters.
type serviceRoute struct {
	name     string
	replicas []*backend
	counters *serviceCounters // service_metrics.go
	next     atomic.Uint64    // rotates the start of pick's scan
}

// routeTable is the router's view of every service, replaced whole by
// update and read without a lock.
type routeTable struct {
	services map[string]*serviceRoute
	byAlloc  map[string]*replicaStats
	pools    map[string]*replicaConns // by allocation ID
	scaled   []string                 // IDs of the live jobs scaled by load (service_load.go)
}

// router proxies /svc/NAME/... to a healthy replica of NAME: the one with
// the fewest of this router's requests in flight; on a tie this node's
// first, then one in this node's availability zone, then the next in a
// rotation. Its table is rebuilt from the cluster state (jobs, allocations
// with their health, the nodes that hold them) by update and swapped in
// whole, so that a request takes no lock; it owns nothing else.
type router struct {
	nodeID string
	az     string // this node's availability zone ("" unknown)
	logger hclog.Logger
	// transport holds the kept-alive connections to every replica.
	transport http.RoundTripper
	errorLog  *log.Logger
	// general sends every request through httputil.ReverseProxy, none by
	// the fast path (service_upstream.go); set before serving.
	general bool

	updateMu sync.Mutex // serialises update
	table    atomic.Pointer[routeTable]
	stats    routerStats // service_metrics.go
}

// attempt is one try of a request on one replica. It wraps the client's
// ResponseWriter for that try, so that the replica's proxy can hand back
// an error it met before answering anything.
type attempt struct {
	http.ResponseWriter
	err error
	// written is set once the whole request was written to the replica's
	// connection (from then on it may have acted on it); the general path
	// follows it only for methods that are not idempotent.
	written atomic.Bool
}

// Unwrap lets http.ResponseController (flushes, hijacks) reach the
// client's ResponseWriter.
func (at *attempt) Unwrap() http.ResponseWriter { return at.ResponseWriter }

// WriteHeader passes the replica's status on, interim ones included, but
// for 100 Continue: the router answers Expect: 100-continue itself (the
// HTTP port's net/http server, which the serve port hands such requests
// to, sends one when the proxy starts reading the body) and the replica
// never sees the expectation (newProxy drops it), so a 100 from the
// replica would be the client's second.
func (at *attempt) WriteHeader(code int) {
	if code == http.StatusContinue {
		return
	}
	at.ResponseWriter.WriteHeader(code)
}

func (at *attempt) wroteRequest(info httptrace.WroteRequestInfo) {
	if info.Err == nil {
		at.written.Store(true)
	}
}

func newRouter(nodeID, az string, logger hclog.Logger) *router {
	rt := &router{nodeID: nodeID, az: az, logger: logger}
	rt.table.Store(&routeTable{services: map[string]*serviceRoute{}, byAlloc: map[string]*replicaStats{}, pools: map[string]*replicaConns{}})
	rt.transport = &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
		// A proxy passes the client's Accept-Encoding on and the answer
		// back as it is: the transport must not ask for gzip and unpack it.
		DisableCompression: true,
	}
	rt.errorLog = logger.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})
	return rt
}

// copyBuffers lend the proxies their 32 KiB copy buffers (without a pool
// every request would allocate one).
var copyBuffers httputil.BufferPool = &bufferPool{}

type bufferPool struct{ p sync.Pool }

func (b *bufferPool) Get() []byte {
	if buf, ok := b.p.Get().(*[]byte); ok {
		return *buf
	}
	return make([]byte, 32<<10)
}

func (b *bufferPool) Put(buf []byte) { b.p.Put(&buf) }

// newProxy returns the reverse proxy to one replica at addr, for the
// service whose requests arrive under prefix ("/svc/NAME").
func (rt *router) newProxy(addr, prefix string) *httputil.ReverseProxy {
	return &httputil.ReverseProxy{
		Transport:  rt.transport,
		BufferPool: copyBuffers,
		// FlushInterval 0: an answer of known length goes out in one
		// write; one streamed (server-sent events, or of unknown length:
		// chunked) the proxy flushes as it comes by itself.
		Rewrite: func(pr *httputil.ProxyRequest) {
			path := pr.In.URL.Path[len(prefix):]
			if path == "" {
				path = "/"
			}
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = addr
			// RawPath keeps the client's escaping (URL drops it when it
			// does not match Path).
			pr.Out.URL.Path, pr.Out.URL.RawPath = path, upstreamPath(pr.In.URL, prefix)
			pr.Out.Host = pr.In.Host
			// The router answers Expect: 100-continue (see
			// attempt.WriteHeader), as Envoy does by default: the body
			// goes on at once, and the replica sends no 100 of its own.
			pr.Out.Header.Del("Expect")
			pr.SetXForwarded()
		},
		// Called only before anything was written to the client: record
		// the error so that ServeHTTP may retry elsewhere.
		ErrorHandler: func(w http.ResponseWriter, _ *http.Request, err error) {
			w.(*attempt).err = err
		},
		ErrorLog: rt.errorLog,
	}
}

// update rebuilds the table from the cluster state: the jobs, their
// allocations, and the nodes that hold them (for their zones; a node not
// given counts as far).
func (rt *router) update(jobs []*pb.Job, allocs []*pb.Allocation, nodes ...*pb.Node) {
	zone := make(map[string]string, len(nodes))
	for _, n := range nodes {
		zone[n.Id] = n.Az
	}
	names := map[string]string{} // job ID → service name
	var scaled []string
	for _, j := range jobs {
		if j.GetSpec().GetType() == jobspec.TypeService && !consensus.JobTerminal(j.Status) {
			names[j.Id] = j.Spec.Name
			if j.Spec.GetService().GetMaxReplicas() > 0 {
				scaled = append(scaled, j.Id)
			}
		}
	}
	routePort := map[string]string{}
	for _, j := range jobs {
		if _, ok := names[j.Id]; ok {
			routePort[j.Id] = j.Spec.GetService().GetRoutePort()
		}
	}
	rt.updateMu.Lock()
	defer rt.updateMu.Unlock()
	old := rt.table.Load()
	services := map[string]*serviceRoute{}
	for _, name := range names {
		services[name] = &serviceRoute{name: name, counters: rt.stats.of(name)}
	}
	byAlloc := map[string]*replicaStats{}
	pools := map[string]*replicaConns{}
	for _, al := range allocs {
		name, ok := names[al.JobId]
		if !ok || al.DesiredStatus != consensus.DesiredRun || al.ClientStatus != consensus.AllocRunning {
			continue
		}
		port := al.Ports[routePort[al.JobId]]
		if port == 0 {
			continue // not yet reported
		}
		st := old.byAlloc[al.Id]
		if st == nil {
			st = &replicaStats{}
		}
		b := &backend{allocID: al.Id, jobID: al.JobId, st: st}
		b.nodeID, b.nodeName, b.rank = al.NodeId, al.NodeName, al.Rank
		b.addr = net.JoinHostPort(hostOf(al.RankAddr), strconv.Itoa(int(port)))
		b.prefix = svcPrefix + name
		b.proxy = rt.newProxy(b.addr, b.prefix)
		b.pool = old.pools[al.Id]
		if b.pool == nil || b.pool.addr != b.addr {
			b.pool = &replicaConns{addr: b.addr}
		}
		pools[al.Id] = b.pool
		b.health = al.Health
		if b.health == "" {
			b.health = HealthStarting
		}
		switch {
		case al.NodeId == rt.nodeID:
			b.near = nearNode
		case rt.az != "" && zone[al.NodeId] == rt.az:
			b.near = nearAZ
		default:
			b.near = nearFar
		}
		byAlloc[al.Id] = st
		s := services[name]
		s.replicas = append(s.replicas, b)
	}
	for _, s := range services {
		sort.Slice(s.replicas, func(i, j int) bool { return s.replicas[i].allocID < s.replicas[j].allocID })
	}
	rt.table.Store(&routeTable{services: services, byAlloc: byAlloc, pools: pools, scaled: scaled})
	// Requests still on a replica that left finish on their connection,
	// which is then closed.
	for id, p := range old.pools {
		if pools[id] != p {
			p.close()
		}
	}
}

// closeConns closes the router's idle connections to replicas (on
// shutdown, once no request is being served).
func (rt *router) closeConns() {
	rt.updateMu.Lock()
	defer rt.updateMu.Unlock()
	for _, p := range rt.table.Load().pools {
		p.close()
	}
}

// pick returns a healthy replica of s other than the allocation skip, or
// nil: the fewest requests in flight, then the nearest, then the first
// after a rotating start.
func (rt *router) pick(s *serviceRoute, skip string) *backend {
	var best *backend
	var bestN int64
	n := len(s.replicas)
	if n == 0 {
		return nil
	}
	start := int(s.next.Add(1) % uint64(n))
	for i := 0; i < n; i++ {
		b := s.replicas[(start+i)%n]
		if b.health != HealthHealthy || b.allocID == skip {
			continue
		}
		in := b.st.inflight.Load()
		if best == nil || in < bestN || (in == bestN && b.near < best.near) {
			best, bestN = b, in
		}
	}
	return best
}

// whyNone says why s has no replica to send to.
func whyNone(s *serviceRoute) string {
	if len(s.replicas) == 0 {
		return fmt.Sprintf("service %q has no running replica (it may be waiting to be placed: gpumesh job status shows why)", s.name)
	}
	count := map[string]int{}
	for _, b := range s.replicas {
		count[b.health]++
	}
	var parts []string
	for _, h := range []string{HealthStarting, HealthUnhealthy, HealthDraining, HealthHealthy} {
		if count[h] > 0 {
			parts = append(parts, fmt.Sprintf("%d %s", count[h], h))
		}
	}
	return fmt.Sprintf("service %q has %d replicas and none is healthy (%s); retry later", s.name, len(s.replicas), strings.Join(parts, ", "))
}

func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodOptions, http.MethodTrace, http.MethodPut, http.MethodDelete:
		return true
	}
	return false
}

// serviceHost is the service a Host header names in the Host form of
// routing: NAME.svc or NAME.svc.ANY.DOMAIN, with any port (a DNS wildcard
// such as *.svc.example.internal pointing at the agents makes every
// service reachable by name, for clients that cannot add a path prefix).
func serviceHost(host string) (string, bool) {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	name, rest, ok := strings.Cut(host, ".svc")
	if !ok || name == "" || (rest != "" && rest[0] != '.') {
		return "", false
	}
	return name, true
}

// hostRouted sends requests whose Host names a service (serviceHost) to the
// router, with their path unchanged for the replica, and the rest to next.
func hostRouted(rt http.Handler, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		name, ok := serviceHost(req.Host)
		if !ok {
			next.ServeHTTP(w, req)
			return
		}
		// The router reads the service from the path and its proxy strips
		// /svc/NAME again before the replica sees it.
		u := *req.URL
		u.Path = svcPrefix + name + req.URL.Path
		if req.URL.RawPath != "" {
			u.RawPath = svcPrefix + name + req.URL.RawPath
		}
		out := req.WithContext(req.Context())
		out.URL = &u
		rt.ServeHTTP(w, out)
	})
}

func (rt *router) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	name, _, _ := strings.Cut(strings.TrimPrefix(req.URL.Path, svcPrefix), "/")
	s := rt.table.Load().services[name]
	if s == nil {
		http.Error(w, fmt.Sprintf("no service named %q in this cluster; gpumesh service list shows the services", name), http.StatusNotFound)
		return
	}
	sc := s.counters
	sc.requests.Add(1)
	// Keep a small body so that the request can be retried elsewhere.
	var body []byte
	replayable := req.Body == nil || req.Body == http.NoBody || req.ContentLength == 0
	if !replayable && req.ContentLength > 0 && req.ContentLength <= maxRetryBody {
		b, err := io.ReadAll(io.LimitReader(req.Body, maxRetryBody+1))
		if err != nil {
			http.Error(w, "reading the request body: "+err.Error(), http.StatusBadRequest)
			return
		}
		body, replayable = b, true
	}
	// For a method that is not idempotent, follow whether the request was
	// wholly written: until then a failed try may go elsewhere.
	safe := idempotent(req.Method)
	fast := !rt.general && fastForwardable(req, body != nil)
	var tried *backend
	for {
		b := rt.pick(s, allocOf(tried))
		if b == nil {
			w.Header().Set("Retry-After", "1")
			msg := whyNone(s)
			if tried != nil {
				msg = fmt.Sprintf("service %q: replica %d on node %s failed before it got the request, and no other healthy replica is left; retry later", name, tried.rank, tried.nodeName)
			}
			sc.failed.Add(1)
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		at := &attempt{ResponseWriter: w}
		b.st.requests.Add(1)
		if fast {
			func() {
				// A failure mid-answer panics (http.ErrAbortHandler):
				// count the request out all the same.
				b.st.inflight.Add(1)
				defer b.st.inflight.Add(-1)
				at.err = fastForward(at, req, b.pool, upstreamPath(req.URL, b.prefix), body)
			}()
		} else {
			rt.forwardGeneral(at, req, b, safe, body)
		}
		if at.err == nil {
			return
		}
		if req.Context().Err() != nil {
			return // the client went away
		}
		rt.logger.Warn("request to a replica failed", "service", name, "replica", b.allocID, "node", b.nodeName, "error", at.err)
		// Retry once, elsewhere, when the replica cannot have acted on the
		// request: the method is idempotent, or the replica never got all
		// of it (the connection was refused, or reset before the request
		// was written).
		why := ""
		switch {
		case tried != nil:
			why = "it was the second replica tried"
		case !replayable:
			why = fmt.Sprintf("its body (over %d bytes) was streamed and is gone", maxRetryBody)
		case !safe && at.written.Load():
			why = fmt.Sprintf("the replica had the whole request and %s is not idempotent, so it may have acted on it", req.Method)
		}
		if why != "" {
			sc.failed.Add(1)
			http.Error(w, fmt.Sprintf("service %q: replica %d on node %s failed: %v; not retried: %s", name, b.rank, b.nodeName, at.err, why), http.StatusBadGateway)
			return
		}
		sc.retries.Add(1)
		tried = b
	}
}

// forwardGeneral sends req to b through httputil.ReverseProxy, recording
// in at an error met before anything was written to the client.
func (rt *router) forwardGeneral(at *attempt, req *http.Request, b *backend, safe bool, body []byte) {
	out := req
	if !safe {
		out = req.WithContext(httptrace.WithClientTrace(req.Context(), &httptrace.ClientTrace{WroteRequest: at.wroteRequest}))
	}
	if body != nil {
		out.Body = io.NopCloser(bytes.NewReader(body))
		// The transport may then resend it itself on a fresh connection
		// when a kept-alive one was closed under it.
		out.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}
	// The proxy panics (http.ErrAbortHandler) when the replica fails
	// mid-answer: count the request out all the same.
	b.st.inflight.Add(1)
	defer b.st.inflight.Add(-1)
	b.proxy.ServeHTTP(at, out)
}

// allocOf returns b's allocation ID, "" for nil.
func allocOf(b *backend) string {
	if b == nil {
		return ""
	}
	return b.allocID
}

// ReplicaRoute is a replica as one router sees it.
type ReplicaRoute struct {
	AllocID  string `json:"alloc_id"`
	JobID    string `json:"job_id"`
	Rank     int32  `json:"rank"`
	Node     string `json:"node"`
	Addr     string `json:"addr"`
	Health   string `json:"health"`
	InFlight int64  `json:"in_flight"`
	Requests int64  `json:"requests"`
}

// ServiceRoute is a service as one router sees it.
type ServiceRoute struct {
	Name     string         `json:"name"`
	Healthy  int            `json:"healthy"`
	Replicas []ReplicaRoute `json:"replicas"`
}

// snapshot returns the table, sorted by service name.
func (rt *router) snapshot() []ServiceRoute {
	tbl := rt.table.Load()
	out := make([]ServiceRoute, 0, len(tbl.services))
	for _, s := range tbl.services {
		sr := ServiceRoute{Name: s.name, Replicas: []ReplicaRoute{}}
		for _, b := range s.replicas {
			if b.health == HealthHealthy {
				sr.Healthy++
			}
			sr.Replicas = append(sr.Replicas, ReplicaRoute{AllocID: b.allocID, JobID: b.jobID, Rank: b.rank, Node: b.nodeName, Addr: b.addr, Health: b.health, InFlight: b.st.inflight.Load(), Requests: b.st.requests.Load()})
		}
		out = append(out, sr)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out
}

// NewStaticRouter returns the /svc/ router over a fixed set of healthy
// replicas of one service (name, at addrs "host:port"): the routing path
// without the cluster, for benchmarks and tests. general sends every
// request through httputil.ReverseProxy (the path the router keeps for
// upgrades and streamed bodies) instead of the fast path.
func NewStaticRouter(name string, addrs []string, general bool) http.Handler {
	rt := newRouter("", "", hclog.NewNullLogger())
	rt.general = general
	job := &pb.Job{Id: name, Status: consensus.JobRunning, Spec: &pb.JobSpec{Name: name, Type: jobspec.TypeService,
		Service: &pb.ServiceSpec{Ports: []string{jobspec.DefaultServicePort}, RoutePort: jobspec.DefaultServicePort}}}
	var allocs []*pb.Allocation
	for i, addr := range addrs {
		host, port, err := net.SplitHostPort(addr)
		p, perr := strconv.Atoi(port)
		if err != nil || perr != nil {
			continue
		}
		allocs = append(allocs, &pb.Allocation{Id: fmt.Sprintf("%s.%d", name, i), JobId: name, Rank: int32(i), RankAddr: net.JoinHostPort(host, "0"),
			DesiredStatus: consensus.DesiredRun, ClientStatus: consensus.AllocRunning, Health: HealthHealthy,
			Ports: map[string]int32{jobspec.DefaultServicePort: int32(p)}})
	}
	rt.update([]*pb.Job{job}, allocs)
	return rt
}
