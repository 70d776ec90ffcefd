package node

import (
	"sort"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// localAPICollector exports the local API's per-rank statistics: the
// collectives that exec ranks (the PyTorch backend) ran through this agent.
type localAPICollector struct {
	a                         *Agent
	ops, bytes, latency, errs *prometheus.Desc
}

func newLocalAPICollector(a *Agent) *localAPICollector {
	labels := []string{"job_id", "generation", "rank", "op"}
	return &localAPICollector{
		a:       a,
		ops:     prometheus.NewDesc("gpumesh_client_collective_operations_total", "Operations exec ranks (the PyTorch backend) ran through this agent, by job, generation, rank and operation.", labels, nil),
		bytes:   prometheus.NewDesc("gpumesh_client_collective_bytes_total", "Bytes of the ranks' buffers in those operations.", labels, nil),
		latency: prometheus.NewDesc("gpumesh_client_collective_latency_seconds_total", "Sum of request-to-reply times of those operations (divide by the operations for the mean).", labels, nil),
		errs:    prometheus.NewDesc("gpumesh_client_collective_errors_total", "Operations that failed, by job, generation and rank.", labels[:3], nil),
	}
}

// Describe implements prometheus.Collector.
func (c *localAPICollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.ops
	ch <- c.bytes
	ch <- c.latency
	ch <- c.errs
}

// Collect implements prometheus.Collector. Statistics of several process
// groups of one rank add up.
func (c *localAPICollector) Collect(ch chan<- prometheus.Metric) {
	if c.a.local == nil {
		return
	}
	type key struct{ job, gen, rank, op string }
	ops, bytes, lat := map[key]float64{}, map[key]float64{}, map[key]float64{}
	errs := map[key]float64{}
	for _, st := range c.a.local.srv.Snapshot() {
		gen, rank := strconv.FormatUint(st.Generation, 10), strconv.Itoa(st.Rank)
		for op, n := range st.Ops {
			k := key{st.Job, gen, rank, op}
			ops[k] += float64(n)
			bytes[k] += float64(st.Bytes[op])
			lat[k] += st.LatencySeconds[op]
		}
		errs[key{st.Job, gen, rank, ""}] += float64(st.Errors)
	}
	for k, v := range ops {
		ch <- prometheus.MustNewConstMetric(c.ops, prometheus.CounterValue, v, k.job, k.gen, k.rank, k.op)
		ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.CounterValue, bytes[k], k.job, k.gen, k.rank, k.op)
		ch <- prometheus.MustNewConstMetric(c.latency, prometheus.CounterValue, lat[k], k.job, k.gen, k.rank, k.op)
	}
	for k, v := range errs {
		ch <- prometheus.MustNewConstMetric(c.errs, prometheus.CounterValue, v, k.job, k.gen, k.rank)
	}
}

// clientCollectivesReport summarises the collectives rank al ran through
// this agent, for its allocation's result (`gpumesh job status`): one row
// per operation kind, or nil when it ran none.
func (a *Agent) clientCollectivesReport(al *pb.Allocation) map[string]any {
	if a.local == nil {
		return nil
	}
	type agg struct {
		ops, bytes  uint64
		lat, maxLat float64
	}
	by := map[string]*agg{}
	for _, st := range a.local.srv.Snapshot() {
		if st.Job != al.JobId || st.Generation != al.Generation || st.Rank != int(al.Rank) {
			continue
		}
		for op, n := range st.Ops {
			g := by[op]
			if g == nil {
				g = &agg{}
				by[op] = g
			}
			g.ops += n
			g.bytes += st.Bytes[op]
			g.lat += st.LatencySeconds[op]
			g.maxLat = max(g.maxLat, st.MaxLatencySeconds[op])
		}
	}
	if len(by) == 0 {
		return nil
	}
	names := make([]string, 0, len(by))
	for op := range by {
		names = append(names, op)
	}
	sort.Strings(names)
	rows := make([]any, 0, len(names))
	for _, op := range names {
		g := by[op]
		rows = append(rows, map[string]any{
			"op": op, "ops": float64(g.ops), "bytes": float64(g.bytes),
			"mean_latency_ms": strconv.FormatFloat(1e3*g.lat/float64(g.ops), 'f', 2, 64),
			"max_latency_ms":  strconv.FormatFloat(1e3*g.maxLat, 'f', 2, 64),
		})
	}
	return map[string]any{"collectives": rows}
}

var _ prometheus.Collector = (*localAPICollector)(nil)
