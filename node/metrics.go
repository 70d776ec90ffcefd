package node

import (
	"context"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/cuda"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// GPUSampler reads this host's GPU health (utilisation, memory,
// temperature, power, ECC). cuda.Sample is the real one (NVML); tests
// pass a fake.
type GPUSampler func() ([]cuda.GPUMetrics, error)

// opsState is the observability side of one agent: its own Prometheus
// registry (several agents share a process in dev clusters and tests, so
// nothing is registered globally), the counters the data plane fills, and
// the GPU sampler.
type opsState struct {
	a        *Agent
	reg      *prometheus.Registry
	counters *collective.Counters
	sampler  GPUSampler
	leaders  *consensus.LeaderChangeCounter

	placement prometheus.Histogram

	gpuMu   sync.Mutex
	gpuAt   time.Time
	gpuLast []cuda.GPUMetrics
	gpuErr  error

	dash dashCache
}

// newOpsState returns the agent's observability state (the data plane
// counts into it before the HTTP handler is built).
func newOpsState(a *Agent) *opsState {
	o := &opsState{a: a, counters: &collective.Counters{}, sampler: a.cfg.GPUSampler}
	if o.sampler == nil {
		o.sampler = cuda.Sample
	}
	return o
}

// newMetrics builds the agent's registry and starts the placement-latency
// follower. It is called once, from the HTTP handler's construction.
func newMetrics(a *Agent) *opsState {
	o := a.ops
	o.reg = prometheus.NewRegistry()
	o.placement = prometheus.NewHistogram(prometheus.HistogramOpts{
		Name:    "gpumesh_scheduler_placement_latency_seconds",
		Help:    "Time from a job becoming placeable (submitted, or due for its next generation) to its plan being committed, observed on the leader.",
		Buckets: []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60},
	})
	if a.raft != nil {
		o.leaders = a.raft.CountLeaderChanges()
	}
	o.reg.MustRegister(
		// The defaults plus the live heap after the last GC (go_gc_heap_live_bytes)
		// and the GC's goal: unlike heap-in-use they do not depend on when in
		// the GC cycle a scrape lands, so a soak can compare them across hours.
		collectors.NewGoCollector(collectors.WithGoCollectorRuntimeMetrics(
			collectors.GoRuntimeMetricsRule{Matcher: regexp.MustCompile(`^/gc/heap/(live|goal):bytes$`)},
		)),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
		o.placement,
		newAgentCollector(o),
		newLocalAPICollector(a), // localapi_metrics.go
		cuda.NewCollector(o.sampleGPUs),
		a.router,
		serveCollector{a}, // service_metrics.go
	)
	a.goFunc(o.followPlacements)
	return o
}

// sampleGPUs reads the GPUs at most once a second (scrapes and the
// dashboard share the sample).
func (o *opsState) sampleGPUs() ([]cuda.GPUMetrics, error) {
	o.gpuMu.Lock()
	defer o.gpuMu.Unlock()
	if time.Since(o.gpuAt) < time.Second && !o.gpuAt.IsZero() {
		return o.gpuLast, o.gpuErr
	}
	o.gpuLast, o.gpuErr = o.sampler()
	o.gpuAt = time.Now()
	return o.gpuLast, o.gpuErr
}

// followPlacements observes placement latency on the leader. While this
// agent leads it follows the replicated state and, for every job
// whose generation grew, observes the time between the job becoming
// placeable and the plan's commit, both taken from replicated timestamps.
func (o *opsState) followPlacements() {
	a := o.a
	defer func() {
		if o.leaders != nil {
			o.leaders.Close()
		}
	}()
	if a.raft == nil {
		<-a.ctx.Done()
		return
	}
	type seen struct {
		gen          uint64
		pendingSince time.Time
	}
	jobs := map[string]seen{}
	var after uint64
	first := true
	var pause time.Duration
	for {
		if pause > 0 {
			t := time.NewTimer(pause)
			select {
			case <-a.ctx.Done():
				t.Stop()
				return
			case <-t.C:
			}
		}
		if !a.raft.HasState() || !a.raft.IsLeader() {
			// Only the leader observes; a new leader starts from a
			// baseline pass.
			clear(jobs)
			first = true
			pause = 50 * time.Millisecond
			continue
		}
		st := a.raft.State()
		waitCtx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
		idx, err := st.WaitIndex(waitCtx, after)
		cancel()
		if a.ctx.Err() != nil {
			return
		}
		if err != nil || idx == after {
			pause = 0
			continue
		}
		after = idx
		began := time.Now()
		// The first pass after gaining leadership only learns the jobs
		// there are, except those placed since: older placements are
		// history (and were observed by the leader of their time).
		baseline := first
		first = false
		var leaderSince time.Time
		if o.leaders != nil {
			leaderSince = o.leaders.LastChange()
		}
		live := make(map[string]bool, len(jobs))
		for _, j := range st.Jobs() {
			live[j.Id] = true
			prev, known := jobs[j.Id]
			cur := prev
			cur.gen = j.Generation
			if j.Status == consensus.JobPending {
				since := j.GetStatusTime().AsTime()
				if j.Generation == 0 {
					since = j.GetSubmitTime().AsTime()
				}
				if na := j.GetNextAttemptTime(); na != nil && na.AsTime().After(since) {
					since = na.AsTime()
				}
				cur.pendingSince = since
			}
			placedSince := !leaderSince.IsZero() && j.Status == consensus.JobRunning && j.GetStatusTime().AsTime().After(leaderSince)
			if j.Generation > prev.gen && (!baseline || placedSince) {
				start := prev.pendingSince
				if !known || start.IsZero() {
					start = j.GetSubmitTime().AsTime()
					if j.Generation > 1 {
						start = time.Time{}
					}
				}
				placed := j.GetStatusTime().AsTime()
				if j.Status != consensus.JobRunning {
					// Placed and already ended: the first rank's start
					// bounds the placement from above.
					placed = firstStart(st.Allocations(j.Id), j.Generation, placed)
				}
				if !start.IsZero() {
					if d := placed.Sub(start); d >= 0 {
						o.placement.Observe(d.Seconds())
					}
				}
				cur.pendingSince = time.Time{}
			}
			jobs[j.Id] = cur
		}
		for id := range jobs {
			if !live[id] {
				delete(jobs, id)
			}
		}
		// Scanning every job costs O(jobs): keep it under a tenth of a
		// core by resting ten times as long as the scan took (a job placed
		// and finished within that rest is seen through its submit time).
		pause = min(10*time.Since(began), 250*time.Millisecond)
	}
}

// firstStart is the earliest start of generation gen's ranks, or def.
func firstStart(allocs []*pb.Allocation, gen uint64, def time.Time) time.Time {
	out := def
	for _, al := range allocs {
		if al.Generation == gen && al.StartTime != nil && al.StartTime.AsTime().Before(out) {
			out = al.StartTime.AsTime()
		}
	}
	return out
}

// agentCollector reads everything else at scrape time: gossip, Raft, the
// replicated state, the data plane counters and this node's tasks.
type agentCollector struct {
	o *opsState

	members, role                                               *prometheus.Desc
	raftState, term, commit, applied, lastLog, fsmPending       *prometheus.Desc
	lastContact, leaderChanges, voters, nonVoters, hasLeader    *prometheus.Desc
	nodes, jobs, pending, allocs, localTasks                    *prometheus.Desc
	sentBytes, recvBytes, sentFrames, recvFrames, ops, lanes    *prometheus.Desc
	busbw, algbw, pipeStages, stageSamples, stageBubble, jobGen *prometheus.Desc
	svcFailures                                                 *prometheus.Desc
}

func newAgentCollector(o *opsState) *agentCollector {
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("gpumesh_"+name, help, labels, nil)
	}
	return &agentCollector{
		o:             o,
		members:       d("members", "Gossip members this node knows, by state (alive, suspect, dead, left).", "state"),
		role:          d("agent_role", "1 for this agent's current duty (leader, voter, standby, client), 0 for the others.", "role"),
		raftState:     d("raft_state", "1 for this server's Raft state (Leader, Follower, Candidate, Shutdown), 0 for the others.", "state"),
		term:          d("raft_term", "Current Raft term."),
		commit:        d("raft_commit_index", "Last committed Raft log index known to this server."),
		applied:       d("raft_applied_index", "Last Raft log index applied to this server's state."),
		lastLog:       d("raft_last_log_index", "Last index in this server's Raft log."),
		fsmPending:    d("raft_fsm_pending", "Committed entries waiting to be applied."),
		lastContact:   d("raft_last_contact_seconds", "Time since this follower last heard from the leader (0 on the leader, -1 if never)."),
		leaderChanges: d("raft_leader_changes_total", "Leader changes this server has observed since the agent started."),
		voters:        d("raft_voters", "Voters in the latest Raft configuration."),
		nonVoters:     d("raft_nonvoters", "Non-voters (standbys) in the latest Raft configuration."),
		hasLeader:     d("raft_has_leader", "1 when this server knows a leader."),
		nodes:         d("nodes", "Nodes in the replicated state, by status (ready, draining, down, left).", "status"),
		jobs:          d("jobs", "Jobs in the replicated state, by state (pending, running, complete, failed, stopped).", "state"),
		pending:       d("jobs_pending", "Pending jobs by the scheduler's reason (numbers in the reason replaced by N).", "reason"),
		allocs:        d("allocations", "Allocations (ranks) in the replicated state, by client status.", "status"),
		localTasks:    d("local_tasks", "Ranks running on this node."),
		sentBytes:     d("collective_sent_bytes_total", "Payload bytes this node's ranks sent on the data plane, by operation.", "op"),
		recvBytes:     d("collective_received_bytes_total", "Payload bytes this node's ranks received on the data plane, by operation.", "op"),
		sentFrames:    d("collective_sent_frames_total", "Data frames (chunks) sent, by operation.", "op"),
		recvFrames:    d("collective_received_frames_total", "Data frames (chunks) received, by operation.", "op"),
		ops:           d("collective_operations_total", "Collective operations this node's ranks took part in (once per rank and operation), by operation.", "op"),
		lanes:         d("collective_lanes_accepted_total", "Data-plane lanes this node's RPC port (or its same-host Unix lane socket) accepted (one per sending rank, receiving rank and channel of a link that uses lanes)."),
		busbw:         d("collective_last_busbw_bytes_per_second", "Bus bandwidth of the last all-reduce size measured by a job (rank 0 of its latest reported generation), as nccl-tests defines it.", "job_id"),
		algbw:         d("collective_last_algbw_bytes_per_second", "Algorithm bandwidth (bytes / time) of the last all-reduce size measured by a job.", "job_id"),
		pipeStages:    d("pipeline_stages", "Stages of each running pipeline job.", "job_id"),
		stageSamples:  d("pipeline_stage_samples_per_second", "Throughput a pipeline stage reported when it finished.", "job_id", "stage"),
		stageBubble:   d("pipeline_stage_bubble_ratio", "Idle fraction (1 - busy/wall) a pipeline stage reported when it finished.", "job_id", "stage"),
		jobGen:        d("job_generation", "Current generation of each running job.", "job_id"),
		svcFailures:   d("service_replica_failures_in_a_row", "Failures in a row of a service's replica slot (the crash-loop back-off's count), for slots with at least one; gone once a replica stays healthy for restart.reset_after.", "job_id", "replica"),
	}
}

func (c *agentCollector) descs() []*prometheus.Desc {
	return []*prometheus.Desc{c.members, c.role, c.raftState, c.term, c.commit, c.applied, c.lastLog, c.fsmPending,
		c.lastContact, c.leaderChanges, c.voters, c.nonVoters, c.hasLeader, c.nodes, c.jobs, c.pending, c.allocs,
		c.localTasks, c.sentBytes, c.recvBytes, c.sentFrames, c.recvFrames, c.ops, c.lanes, c.busbw, c.algbw, c.pipeStages,
		c.stageSamples, c.stageBubble, c.jobGen, c.svcFailures}
}

// Describe implements prometheus.Collector.
func (c *agentCollector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs() {
		ch <- d
	}
}

var (
	raftStates = []string{"Leader", "Follower", "Candidate", "Shutdown"}
	roles      = []string{"leader", "voter", "standby", "client"}
	digits     = regexp.MustCompile(`[0-9]+(\.[0-9]+)?`)
)

// Collect implements prometheus.Collector.
func (c *agentCollector) Collect(ch chan<- prometheus.Metric) {
	a := c.o.a
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, v, labels...)
	}

	byState := zeroCounts(consensus.MemberStates)
	for _, m := range a.mesh.Members() {
		byState[m.State]++
	}
	for s, n := range byState {
		gauge(c.members, float64(n), s)
	}
	role := a.Role()
	for _, r := range roles {
		gauge(c.role, b2f(r == role), r)
	}

	r := c.o.a.raft
	if r != nil {
		st := r.Stats()
		for _, s := range raftStates {
			gauge(c.raftState, b2f(s == st.State), s)
		}
		gauge(c.term, float64(st.Term))
		gauge(c.commit, float64(st.CommitIndex))
		gauge(c.applied, float64(st.AppliedIndex))
		gauge(c.lastLog, float64(st.LastLogIndex))
		gauge(c.fsmPending, float64(st.FSMPending))
		gauge(c.lastContact, st.LastContact.Seconds())
		gauge(c.voters, float64(st.Voters))
		gauge(c.nonVoters, float64(st.NonVoters))
		id, _ := r.Leader()
		gauge(c.hasLeader, b2f(id != ""))
		if c.o.leaders != nil {
			counter(c.leaderChanges, float64(c.o.leaders.Count()))
		}
	}
	if r != nil && r.HasState() {
		c.collectState(r.State(), time.Now(), gauge)
	}

	if a.runner != nil {
		a.runner.mu.Lock()
		n := len(a.runner.tasks)
		a.runner.mu.Unlock()
		gauge(c.localTasks, float64(n))
	}
	for _, k := range c.o.counters.Snapshot() {
		op := k.Kind.String()
		counter(c.sentBytes, float64(k.SentBytes), op)
		counter(c.recvBytes, float64(k.RecvBytes), op)
		counter(c.sentFrames, float64(k.SentFrames), op)
		counter(c.recvFrames, float64(k.RecvFrames), op)
		counter(c.ops, float64(k.Ops), op)
	}
	if a.data != nil && a.data.svc != nil {
		counter(c.lanes, float64(a.data.svc.LanesAccepted()))
	}
}

func (c *agentCollector) collectState(st stateReader, now time.Time, gauge func(*prometheus.Desc, float64, ...string)) {
	nodes := zeroCounts(consensus.NodeStatuses)
	for _, n := range st.Nodes() {
		nodes[n.Status]++
	}
	for s, n := range nodes {
		gauge(c.nodes, float64(n), s)
	}
	jobs := zeroCounts(consensus.JobStatuses)
	allocs := zeroCounts(consensus.AllocStatuses)
	reasons := map[string]int{}
	for _, j := range st.Jobs() {
		jobs[j.Status]++
		if j.Status == consensus.JobPending {
			reasons[normalizeReason(j.StatusReason)]++
		}
		if j.Status == consensus.JobRunning {
			gauge(c.jobGen, float64(j.Generation), j.Id)
		}
		all := st.Allocations(j.Id)
		if j.Status == consensus.JobRunning {
			for _, b := range consensus.ServiceBackoffs(j, all, now) {
				gauge(c.svcFailures, float64(b.Failures), j.Id, strconv.Itoa(b.Slot))
			}
		}
		for _, al := range all {
			s := al.ClientStatus
			if s == "" {
				s = consensus.AllocPending
			}
			allocs[s]++
		}
		c.collectResults(j, all, gauge)
	}
	for s, n := range jobs {
		gauge(c.jobs, float64(n), s)
	}
	for s, n := range allocs {
		gauge(c.allocs, float64(n), s)
	}
	for s, n := range reasons {
		gauge(c.pending, float64(n), s)
	}
}

// collectResults exports what the built-in drivers reported: all-reduce
// bandwidth and pipeline stage throughput.
func (c *agentCollector) collectResults(j *pb.Job, allocs []*pb.Allocation, gauge func(*prometheus.Desc, float64, ...string)) {
	switch j.GetSpec().GetType() {
	case "allreduce":
		// The latest generation whose rank 0 reported.
		var best *pb.Allocation
		for _, al := range allocs {
			if al.Rank == 0 && al.Result != nil && (best == nil || al.Generation > best.Generation) {
				best = al
			}
		}
		if best == nil {
			return
		}
		if bus, alg, ok := lastBandwidth(best.Result); ok {
			gauge(c.busbw, bus, j.Id)
			gauge(c.algbw, alg, j.Id)
		}
	case "pipeline":
		if j.Status == consensus.JobRunning {
			gauge(c.pipeStages, float64(j.WorldSize), j.Id)
		}
		for _, al := range allocs {
			if al.Generation != j.Generation || al.Result == nil {
				continue
			}
			m := al.Result.AsMap()
			stage := strconv.Itoa(int(al.Rank))
			if v, ok := number(m["samples_per_sec"]); ok {
				gauge(c.stageSamples, v, j.Id, stage)
			}
			if v, ok := number(m["bubble"]); ok {
				gauge(c.stageBubble, v, j.Id, stage)
			}
		}
	}
}

// lastBandwidth reads the last row of an all-reduce report's "sizes"
// (GB/s, as the driver logs them) and returns bytes per second.
func lastBandwidth(s *structpb.Struct) (bus, alg float64, ok bool) {
	rows, _ := s.AsMap()["sizes"].([]any)
	if len(rows) == 0 {
		return 0, 0, false
	}
	last, _ := rows[len(rows)-1].(map[string]any)
	bus, ok1 := number(last["busbw_gbps"])
	alg, ok2 := number(last["algbw_gbps"])
	return bus * 1e9, alg * 1e9, ok1 && ok2
}

func number(v any) (float64, bool) {
	switch x := v.(type) {
	case float64:
		return x, true
	case string:
		f, err := strconv.ParseFloat(x, 64)
		return f, err == nil
	}
	return 0, false
}

// normalizeReason keeps the label set small: the reason's first clause,
// with numbers replaced by N.
func normalizeReason(r string) string {
	if r == "" {
		return "unknown"
	}
	r, _, _ = strings.Cut(r, ";")
	if len(r) > 120 {
		r = r[:120]
	}
	return digits.ReplaceAllString(r, "N")
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// sortedGPUs returns a copy of the sample ordered by index.
func sortedGPUs(in []cuda.GPUMetrics) []cuda.GPUMetrics {
	out := append([]cuda.GPUMetrics(nil), in...)
	sort.Slice(out, func(i, k int) bool { return out[i].Index < out[k].Index })
	return out
}

// zeroCounts returns a count of 0 for every value, so that each is exported
// even when nothing has it.
func zeroCounts(values []string) map[string]int {
	m := make(map[string]int, len(values))
	for _, v := range values {
		m[v] = 0
	}
	return m
}
