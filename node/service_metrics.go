package node

import (
	"sync"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
)

// serviceCounters are one router's counters of one service. They outlive
// the service's replicas (Prometheus counters never go back).
type serviceCounters struct {
	requests atomic.Int64 // requests routed (each counted once, retries not)
	retries  atomic.Int64 // requests sent again to another replica
	failed   atomic.Int64 // requests answered 502 or 503 by the router
}

// routerStats holds the router's per-service counters.
type routerStats struct {
	mu sync.Mutex
	m  map[string]*serviceCounters
}

func (s *routerStats) of(name string) *serviceCounters {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string]*serviceCounters{}
	}
	c := s.m[name]
	if c == nil {
		c = &serviceCounters{}
		s.m[name] = c
	}
	return c
}

var (
	descSvcReplicas = prometheus.NewDesc("gpumesh_service_replicas", "Running replicas of a service as this node's router sees them, by health (starting, healthy, unhealthy, draining).", []string{"service", "health"}, nil)
	descSvcInFlight = prometheus.NewDesc("gpumesh_service_in_flight_requests", "Requests this node's router has open on a service's replicas.", []string{"service"}, nil)
	descSvcRequests = prometheus.NewDesc("gpumesh_service_requests_total", "Requests this node's router received for a service.", []string{"service"}, nil)
	descSvcRetries  = prometheus.NewDesc("gpumesh_service_retries_total", "Requests this node's router sent to a second replica after the first failed.", []string{"service"}, nil)
	descSvcFailed   = prometheus.NewDesc("gpumesh_service_failed_requests_total", "Requests this node's router answered itself with 502 or 503 (no healthy replica, or the replica failed).", []string{"service"}, nil)
)

// Describe implements prometheus.Collector.
func (rt *router) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descSvcReplicas, descSvcInFlight, descSvcRequests, descSvcRetries, descSvcFailed} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (rt *router) Collect(ch chan<- prometheus.Metric) {
	for _, s := range rt.snapshot() {
		count := map[string]int{HealthStarting: 0, HealthHealthy: 0, HealthUnhealthy: 0, HealthDraining: 0}
		var inflight int64
		for _, r := range s.Replicas {
			count[r.Health]++
			inflight += r.InFlight
		}
		for h, n := range count {
			ch <- prometheus.MustNewConstMetric(descSvcReplicas, prometheus.GaugeValue, float64(n), s.Name, h)
		}
		ch <- prometheus.MustNewConstMetric(descSvcInFlight, prometheus.GaugeValue, float64(inflight), s.Name)
	}
	rt.stats.mu.Lock()
	defer rt.stats.mu.Unlock()
	for name, c := range rt.stats.m {
		ch <- prometheus.MustNewConstMetric(descSvcRequests, prometheus.CounterValue, float64(c.requests.Load()), name)
		ch <- prometheus.MustNewConstMetric(descSvcRetries, prometheus.CounterValue, float64(c.retries.Load()), name)
		ch <- prometheus.MustNewConstMetric(descSvcFailed, prometheus.CounterValue, float64(c.failed.Load()), name)
	}
}

var _ prometheus.Collector = (*router)(nil)

var (
	descServeRequests = prometheus.NewDesc("gpumesh_service_port_requests_total", "Requests the serve port's front end (--serve) read and handed to the router itself.", nil, nil)
	descServeHandoffs = prometheus.NewDesc("gpumesh_service_port_handoffs_total", "Connections the serve port's front end handed to net/http's server, for a request it does not take whole (Upgrade, Expect, a body streamed or over 1 MiB, a head over 8 KiB, HTTP/1.0, a malformed request).", nil, nil)
)

// serveCollector exports the serve port's counters; nothing when the agent
// has no serve port.
type serveCollector struct{ a *Agent }

// Describe implements prometheus.Collector.
func (c serveCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descServeRequests
	ch <- descServeHandoffs
}

// Collect implements prometheus.Collector.
func (c serveCollector) Collect(ch chan<- prometheus.Metric) {
	f := c.a.serveS
	if f == nil {
		return
	}
	ch <- prometheus.MustNewConstMetric(descServeRequests, prometheus.CounterValue, float64(f.served.Load()))
	ch <- prometheus.MustNewConstMetric(descServeHandoffs, prometheus.CounterValue, float64(f.handed.Load()))
}
