package node

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
	addr     string // host:port of the route port
	health   string
	local    bool
	st       *replicaStats
}

// replicaStats are a router's counters of one replica, kept across table
// updates by allocation ID.
type replicaStats struct {
	inflight atomic.Int64 // requests now on the replica
	requests atomic.Int64 // requests sent to it
}

// serviceRoute is one service: every replica of its live jobs. It and its
// backends are immutable once built (update builds new ones).
type serviceRoute struct {
	name     string
	replicas []*backend
}

// router proxies /svc/NAME/... to a healthy replica of NAME: the one with
// the fewest of this router's requests in flight, this node's first on a
// tie, then the one least recently picked. Its table is rebuilt from the
// cluster state (jobs and allocations, health included) by update; it owns
// nothing else.
type router struct {
	nodeID string
	logger hclog.Logger
	proxy  *httputil.ReverseProxy

	mu       sync.RWMutex
	services map[string]*serviceRoute
	byAlloc  map[string]*replicaStats
	scaled   []string // IDs of the live jobs scaled by load (service_load.go)
	next     atomic.Uint64
	stats    routerStats // service_metrics.go
}

type ctxKey int

const attemptKey ctxKey = 0

// attempt is one try of a request on one replica.
type attempt struct {
	b    *backend
	path string
	err  error
}

func newRouter(nodeID string, logger hclog.Logger) *router {
	rt := &router{nodeID: nodeID, logger: logger, services: map[string]*serviceRoute{}, byAlloc: map[string]*replicaStats{}}
	tr := &http.Transport{
		DialContext:         (&net.Dialer{Timeout: 2 * time.Second, KeepAlive: 30 * time.Second}).DialContext,
		MaxIdleConns:        1024,
		MaxIdleConnsPerHost: 256,
		IdleConnTimeout:     90 * time.Second,
	}
	rt.proxy = &httputil.ReverseProxy{
		Transport: tr,
		// Tokens of a streamed answer (SSE, chunked) go out as they come.
		FlushInterval: -1,
		Rewrite: func(pr *httputil.ProxyRequest) {
			at := pr.In.Context().Value(attemptKey).(*attempt)
			pr.Out.URL.Scheme = "http"
			pr.Out.URL.Host = at.b.addr
			pr.Out.URL.Path, pr.Out.URL.RawPath = at.path, ""
			pr.Out.Host = pr.In.Host
			pr.SetXForwarded()
		},
		// Called only before anything was written to the client: record
		// the error so that ServeHTTP may retry elsewhere.
		ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
			r.Context().Value(attemptKey).(*attempt).err = err
		},
		ErrorLog: logger.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
	}
	return rt
}

// update rebuilds the table from the cluster state.
func (rt *router) update(jobs []*pb.Job, allocs []*pb.Allocation) {
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
	rt.mu.Lock()
	defer rt.mu.Unlock()
	services := map[string]*serviceRoute{}
	for _, name := range names {
		services[name] = &serviceRoute{name: name}
	}
	byAlloc := map[string]*replicaStats{}
	for _, al := range allocs {
		name, ok := names[al.JobId]
		if !ok || al.DesiredStatus != consensus.DesiredRun || al.ClientStatus != consensus.AllocRunning {
			continue
		}
		port := al.Ports[routePort[al.JobId]]
		if port == 0 {
			continue // not yet reported
		}
		st := rt.byAlloc[al.Id]
		if st == nil {
			st = &replicaStats{}
		}
		b := &backend{allocID: al.Id, jobID: al.JobId, st: st}
		b.nodeID, b.nodeName, b.rank = al.NodeId, al.NodeName, al.Rank
		b.addr = net.JoinHostPort(hostOf(al.RankAddr), strconv.Itoa(int(port)))
		b.health = al.Health
		if b.health == "" {
			b.health = HealthStarting
		}
		b.local = al.NodeId == rt.nodeID
		byAlloc[al.Id] = st
		s := services[name]
		s.replicas = append(s.replicas, b)
	}
	for _, s := range services {
		sort.Slice(s.replicas, func(i, j int) bool { return s.replicas[i].allocID < s.replicas[j].allocID })
	}
	rt.services, rt.byAlloc, rt.scaled = services, byAlloc, scaled
}

// pick returns a healthy replica of s not in tried, or nil.
func (rt *router) pick(s *serviceRoute, tried map[string]bool) *backend {
	var best *backend
	var bestN int64
	n := len(s.replicas)
	start := int(rt.next.Add(1) % uint64(max(n, 1)))
	for i := 0; i < n; i++ {
		b := s.replicas[(start+i)%n]
		if b.health != HealthHealthy || tried[b.allocID] {
			continue
		}
		in := b.st.inflight.Load()
		if best == nil || in < bestN || (in == bestN && b.local && !best.local) {
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

// noByteSent reports whether err shows the request never reached the
// replica (the connection could not be made).
func noByteSent(err error) bool {
	var op *net.OpError
	return errors.As(err, &op) && op.Op == "dial"
}

func (rt *router) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	name, rest, _ := strings.Cut(strings.TrimPrefix(req.URL.Path, svcPrefix), "/")
	rt.mu.RLock()
	s := rt.services[name]
	rt.mu.RUnlock()
	if s == nil {
		http.Error(w, fmt.Sprintf("no service named %q in this cluster; gpumesh service list shows the services", name), http.StatusNotFound)
		return
	}
	sc := rt.stats.of(name)
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
	tried := map[string]bool{}
	for try := 0; ; try++ {
		b := rt.pick(s, tried)
		if b == nil {
			w.Header().Set("Retry-After", "1")
			msg := whyNone(s)
			if try > 0 {
				msg = fmt.Sprintf("service %q: the replica tried failed and no other healthy replica is left; retry later", name)
			}
			sc.failed.Add(1)
			http.Error(w, msg, http.StatusServiceUnavailable)
			return
		}
		tried[b.allocID] = true
		at := &attempt{b: b, path: "/" + rest}
		out := req.WithContext(context.WithValue(req.Context(), attemptKey, at))
		if body != nil {
			out.Body = io.NopCloser(bytes.NewReader(body))
		}
		b.st.requests.Add(1)
		func() {
			// The proxy panics (http.ErrAbortHandler) when the replica
			// fails mid-answer: count the request out all the same.
			b.st.inflight.Add(1)
			defer b.st.inflight.Add(-1)
			rt.proxy.ServeHTTP(w, out)
		}()
		if at.err == nil {
			return
		}
		if req.Context().Err() != nil {
			return // the client went away
		}
		rt.logger.Warn("request to a replica failed", "service", name, "replica", b.allocID, "node", b.nodeName, "error", at.err)
		if try > 0 || !replayable || !(idempotent(req.Method) || noByteSent(at.err)) {
			sc.failed.Add(1)
			http.Error(w, fmt.Sprintf("service %q: replica %d on node %s failed: %v", name, b.rank, b.nodeName, at.err), http.StatusBadGateway)
			return
		}
		sc.retries.Add(1)
	}
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
	rt.mu.RLock()
	defer rt.mu.RUnlock()
	out := make([]ServiceRoute, 0, len(rt.services))
	for _, s := range rt.services {
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
// without the cluster, for benchmarks and tests.
func NewStaticRouter(name string, addrs []string) http.Handler {
	rt := newRouter("", hclog.NewNullLogger())
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
