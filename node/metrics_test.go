package node

import (
	"encoding/json"
	"fmt"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/gpumesh/gpumesh/internal/poll"
)

func TestMetricsScrapeDevCluster(t *testing.T) {
	dc, f, c := startGPUCluster(t)
	id := submitSleeper(t, c, 2)
	// A job that cannot be placed stays pending.
	submitJob(t, c, `
name: too-big
ranks: 2
gpus_per_rank: 8
exec:
  command: ["true"]
`)
	waitRanksRunning(t, c, id, 2)

	type want struct {
		name   string
		labels map[string]string
		check  func(v float64) bool
		what   string
	}
	eq := func(x float64) func(float64) bool { return func(v float64) bool { return v == x } }
	ge := func(x float64) func(float64) bool { return func(v float64) bool { return v >= x } }
	checks := func(a *Agent, ws []want) error {
		mfs := scrape(t, a)
		for _, w := range ws {
			v, ok := metricValue(mfs, w.name, w.labels)
			if !ok {
				return fmt.Errorf("%s: no series %s%v", a.Name(), w.name, w.labels)
			}
			if !w.check(v) {
				return fmt.Errorf("%s: %s%v = %v, want %s", a.Name(), w.name, w.labels, v, w.what)
			}
		}
		return nil
	}
	common := []want{
		{"gpumesh_members", map[string]string{"state": "alive"}, eq(3), "3"},
		{"gpumesh_raft_term", nil, ge(1), ">= 1"},
		{"gpumesh_raft_commit_index", nil, ge(1), ">= 1"},
		{"gpumesh_raft_applied_index", nil, ge(1), ">= 1"},
		{"gpumesh_raft_voters", nil, eq(3), "3"},
		{"gpumesh_raft_has_leader", nil, eq(1), "1"},
		{"gpumesh_jobs", map[string]string{"state": "running"}, eq(1), "1"},
		{"gpumesh_jobs", map[string]string{"state": "pending"}, eq(1), "1"},
		{"gpumesh_jobs_pending", nil, eq(1), "1 (with a reason)"},
		{"gpumesh_allocations", map[string]string{"status": "running"}, eq(2), "2"},
		{"gpumesh_nodes", map[string]string{"status": "ready"}, eq(3), "3"},
		{"gpumesh_job_generation", map[string]string{"job_id": id}, eq(1), "1"},
		{"gpumesh_gpu_utilization_ratio", map[string]string{"gpu": "1"}, eq(0.97), "0.97"},
		{"gpumesh_gpu_memory_used_bytes", map[string]string{"gpu": "0"}, eq(30 << 30), "30 GiB"},
		{"gpumesh_gpu_temperature_celsius", map[string]string{"gpu": "1"}, eq(83), "83"},
		{"gpumesh_gpu_power_watts", map[string]string{"gpu": "0"}, eq(350), "350"},
		{"gpumesh_gpu_ecc_errors_total", map[string]string{"gpu": "1", "type": "uncorrected"}, eq(1), "1"},
		{"go_goroutines", nil, ge(1), ">= 1"},
		{"go_gc_heap_live_bytes", nil, ge(1), ">= 1 (live heap after the last GC, for soaks)"},
		{"gpumesh_collective_lanes_accepted_total", nil, ge(0), "present (lanes accepted by the RPC port)"},
	}
	poll.Until(t, 10*time.Second, func() error {
		leader := dc.Leader()
		if leader == nil {
			return fmt.Errorf("no leader")
		}
		return checks(leader, append(common,
			want{"gpumesh_raft_state", map[string]string{"state": "Leader"}, eq(1), "1 on the leader"},
			want{"gpumesh_agent_role", map[string]string{"role": "leader"}, eq(1), "1 on the leader"},
			want{"gpumesh_raft_leader_changes_total", nil, ge(1), ">= 1"},
			want{"gpumesh_raft_last_contact_seconds", nil, eq(0), "0 on the leader"},
		))
	})
	// Whichever agent led when the job was placed observed the placement.
	poll.Until(t, 10*time.Second, func() error {
		n := 0.0
		for _, a := range dc.Agents {
			v, _ := metricValue(scrape(t, a), "gpumesh_scheduler_placement_latency_seconds", nil)
			n += v
		}
		if n < 1 {
			return fmt.Errorf("no placement observed on any agent")
		}
		return nil
	})
	poll.Until(t, 10*time.Second, func() error {
		if f.IsLeader() {
			f = follower(dc)
		}
		return checks(f, append(common,
			want{"gpumesh_raft_state", map[string]string{"state": "Follower"}, eq(1), "1 on a follower"},
			want{"gpumesh_agent_role", map[string]string{"role": "voter"}, eq(1), "1 on a voter"},
			want{"gpumesh_raft_last_contact_seconds", nil, ge(0), ">= 0"},
		))
	})
	// The ranks run somewhere: that node counts them.
	poll.Until(t, 10*time.Second, func() error {
		total := 0.0
		for _, a := range dc.Agents {
			v, _ := metricValue(scrape(t, a), "gpumesh_local_tasks", nil)
			total += v
		}
		if total != 2 {
			return fmt.Errorf("gpumesh_local_tasks summed over the nodes = %v, want 2", total)
		}
		return nil
	})

	// The whole exposition, GPU families included, passes the client
	// library's linter (promtool's rules), and no label is one Prometheus
	// sets on every target (it would rename ours to exported_job).
	for _, a := range dc.Agents {
		lintExposition(t, a.Name(), scrape(t, a))
	}

	// Health still answers for load balancers.
	var h struct{ Status, Role string }
	if err := json.Unmarshal([]byte(httpGet(t, "http://"+f.HTTPAddr()+"/v1/health")), &h); err != nil || h.Status != "ok" || h.Role == "" {
		t.Fatalf("health: %+v %v", h, err)
	}
}

// lintExposition fails the test on any promlint problem in mfs or any
// label named job or instance.
func lintExposition(t *testing.T, who string, mfs map[string]*dto.MetricFamily) {
	t.Helper()
	if mfs["gpumesh_gpu_utilization_ratio"] == nil {
		t.Fatalf("%s: no GPU families to lint", who)
	}
	list := make([]*dto.MetricFamily, 0, len(mfs))
	for _, mf := range mfs {
		list = append(list, mf)
		for _, m := range mf.Metric {
			for _, l := range m.Label {
				if l.GetName() == "job" || l.GetName() == "instance" {
					t.Errorf("%s: %s has a label %q, which Prometheus renames to exported_%s on scrape", who, mf.GetName(), l.GetName(), l.GetName())
				}
			}
		}
	}
	problems, err := promlint.NewWithMetricFamilies(list).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("%s: promlint: %s: %s", who, p.Metric, p.Text)
	}
}

func TestMetricsDriverResults(t *testing.T) {
	rep, err := structpb.NewStruct(map[string]any{"sizes": []any{
		map[string]any{"size": "1MiB", "busbw_gbps": "1.50", "algbw_gbps": "1.00"},
		map[string]any{"size": "64MiB", "busbw_gbps": "3.00", "algbw_gbps": "2.00"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	bus, alg, ok := lastBandwidth(rep)
	if !ok || bus != 3e9 || alg != 2e9 {
		t.Fatalf("lastBandwidth = %v %v %v, want 3e9 2e9 true", bus, alg, ok)
	}
	empty, _ := structpb.NewStruct(map[string]any{"ok": true})
	if _, _, ok := lastBandwidth(empty); ok {
		t.Fatal("a report without sizes has no bandwidth")
	}
	for in, want := range map[string]string{
		"waiting for capacity: needs 8 GPUs (2 ranks × 4); 0 free on 3 eligible nodes": "waiting for capacity: needs N GPUs (N ranks × N)",
		"":                   "unknown",
		"restarting in 4.5s": "restarting in Ns",
	} {
		if got := normalizeReason(in); got != want {
			t.Errorf("normalizeReason(%q) = %q, want %q", in, got, want)
		}
	}
}
