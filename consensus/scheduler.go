package consensus

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

// Restart policy used when a job spec has none.
const (
	DefaultRestartAttempts = 3
	DefaultRestartDelay    = 5 * time.Second
	// DefaultKillTimeout is a rank's time between SIGTERM and SIGKILL when
	// the spec sets none.
	DefaultKillTimeout = 30 * time.Second
)

func killTimeout(spec *controlpb.JobSpec) time.Duration {
	if d := spec.GetKillTimeout(); d != nil && d.AsDuration() > 0 {
		return d.AsDuration()
	}
	return DefaultKillTimeout
}

// scheduler is the leader's event-driven placement loop. It consumes the
// FSM's change events (job registered, allocation finished, node changed),
// evaluates the affected jobs in batches, and commits all their plans as
// ONE ApplyPlans log entry per batch.
//
// Job life (decided here, applied by the FSM):
//   - pending: placed with sharding.Cluster.Place; on success a new
//     generation (generation+1) of allocations in one entry, job running;
//     otherwise it stays pending with the planner's reason.
//   - running: when every rank of the generation completed with exit 0 the
//     job is complete. When a rank fails (client status failed, or complete
//     with a non-zero exit) the generation fails: every rank gets desired
//     stop, and the job goes back to pending until restart.delay passes,
//     counting one restart; once restarts reach restart.attempts the job
//     fails. When a rank's node goes down, leaves or drains, the generation
//     also ends, but that is not the job's fault: no restart is counted and
//     no delay applies. A pending job waits for the ranks of its previous
//     generation to stop before it is placed again, so a GPU never serves
//     two generations at once.
//   - elastic jobs (max_ranks > 0) are placed with min_ranks..max_ranks
//     ranks; a running elastic job below max_ranks is regrown (a new
//     generation) when capacity for more ranks appears, and a lost node
//     shrinks it the same way.
type scheduler struct {
	s      *Server
	ctx    context.Context
	queue  map[string]struct{}
	timers map[string]time.Time
	// bc is the planner view, kept across batches while the state's
	// resource version stays bcVersion (only our own plans were added).
	bc        *batchContext
	bcVersion uint64
	// requeue holds jobs to evaluate again once the batch is committed.
	requeue []string
	timer   *time.Timer
}

// schedulerPaused stops the scheduler from evaluating (benchmarks); events
// keep accumulating and are processed once it is cleared.
var schedulerPaused atomic.Bool

func newScheduler(s *Server, ctx context.Context) *scheduler {
	return &scheduler{s: s, ctx: ctx, queue: map[string]struct{}{}, timers: map[string]time.Time{}}
}

func (sc *scheduler) run() {
	sc.timer = time.NewTimer(time.Hour)
	defer sc.timer.Stop()
	ev := sc.s.fsm.events
	pollPaused := time.NewTicker(50 * time.Millisecond)
	defer pollPaused.Stop()
	for {
		if !schedulerPaused.Load() {
			sc.collect()
			for len(sc.queue) > 0 && sc.ctx.Err() == nil {
				sc.processBatch()
				sc.collect()
			}
			sc.armTimer()
		}
		select {
		case <-sc.ctx.Done():
			return
		case <-ev.ch:
		case <-sc.timer.C:
		case <-pollPaused.C:
		}
	}
}

// collect moves pending FSM events and due timers into the queue.
func (sc *scheduler) collect() {
	st := sc.s.fsm.state
	jobs, capacity, every := sc.s.fsm.events.take()
	for _, id := range jobs {
		sc.queue[id] = struct{}{}
	}
	if every || capacity {
		st.mu.RLock()
		for id, j := range st.jobs {
			if JobTerminal(j.Status) {
				continue
			}
			if every || j.Status == JobPending || (isElastic(j.Spec) && j.WorldSize < maxRanks(j.Spec)) {
				sc.queue[id] = struct{}{}
			}
		}
		st.mu.RUnlock()
	}
	now := time.Now()
	for id, t := range sc.timers {
		if !t.After(now) {
			delete(sc.timers, id)
			sc.queue[id] = struct{}{}
		}
	}
}

func (sc *scheduler) armTimer() {
	var next time.Time
	for _, t := range sc.timers {
		if next.IsZero() || t.Before(next) {
			next = t
		}
	}
	if !sc.timer.Stop() {
		select {
		case <-sc.timer.C:
		default:
		}
	}
	if next.IsZero() {
		sc.timer.Reset(time.Hour)
	} else {
		sc.timer.Reset(max(time.Until(next), time.Millisecond))
	}
}

// batchContext is what one batch evaluation shares: a planner snapshot
// and the master ports in use per node.
type batchContext struct {
	cluster *sharding.Cluster
	nodes   map[string]*controlpb.Node
	ports   map[string]map[int32]bool
	now     time.Time
}

func (sc *scheduler) processBatch() {
	s := sc.s
	st := s.fsm.state
	// Take up to SchedulerBatch jobs, oldest first.
	st.mu.RLock()
	type qj struct {
		id  string
		idx uint64
	}
	q := make([]qj, 0, len(sc.queue))
	for id := range sc.queue {
		var idx uint64
		if j := st.jobs[id]; j != nil {
			idx = j.CreateIndex
		}
		q = append(q, qj{id, idx})
	}
	st.mu.RUnlock()
	sort.Slice(q, func(i, j int) bool {
		if q[i].idx != q[j].idx {
			return q[i].idx < q[j].idx
		}
		return q[i].id < q[j].id
	})
	if len(q) > s.cfg.SchedulerBatch {
		q = q[:s.cfg.SchedulerBatch]
	}
	for _, x := range q {
		delete(sc.queue, x.id)
	}

	st.mu.RLock()
	ver := st.resVersion
	st.mu.RUnlock()
	bc := sc.bc
	if bc == nil || sc.bcVersion != ver {
		var err error
		if bc, err = sc.snapshot(); err != nil {
			s.logger.Error("scheduler: cannot build the cluster view", "error", err)
			return
		}
		sc.bc, sc.bcVersion = bc, ver
	}
	bc.now = time.Now()
	var plans []*fsmpb.JobPlan
	sc.requeue = sc.requeue[:0]
	for _, x := range q {
		if p := sc.evaluate(bc, x.id); p != nil {
			plans = append(plans, p)
		}
	}
	if len(plans) == 0 {
		return
	}
	resp, _, err := s.apply(sc.ctx, &fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: plans}}})
	if err != nil {
		sc.bc = nil
		if sc.ctx.Err() == nil {
			s.logger.Warn("scheduler: committing plans failed; will retry", "plans", len(plans), "error", err)
			for _, p := range plans {
				sc.queue[p.JobId] = struct{}{}
			}
			select {
			case <-sc.ctx.Done():
			case <-time.After(100 * time.Millisecond):
			}
		}
		return
	}
	for _, id := range sc.requeue {
		sc.queue[id] = struct{}{}
	}
	sc.requeue = sc.requeue[:0]
	skipped := map[string]bool{}
	if r, ok := resp.(*PlansResult); ok {
		if len(r.Skipped) > 0 {
			sc.bc = nil // it holds resources of plans that were not applied
		}
		for _, id := range r.Skipped {
			sc.queue[id] = struct{}{}
			skipped[id] = true
		}
	}
	// A job whose generation just ended (a failure, a lost or drained node,
	// an elastic resize) is evaluated again at once, since applying a plan
	// raises no event of its own: that sets its restart-delay and
	// stop-report timers, or places it. A second evaluation that finds
	// nothing new returns no plan, so this cannot loop.
	for _, p := range plans {
		if p.Status == JobPending && !skipped[p.JobId] && (p.NextAttemptTime != nil || len(p.StopAllocIds) > 0 || len(p.LostAllocIds) > 0) {
			sc.queue[p.JobId] = struct{}{}
		}
	}
}

// snapshot builds the planner's view: schedulable-or-draining live nodes
// and every allocation that still holds resources on them.
func (sc *scheduler) snapshot() (*batchContext, error) {
	st := sc.s.fsm.state
	bc := &batchContext{nodes: map[string]*controlpb.Node{}, ports: map[string]map[int32]bool{}, now: time.Now()}
	st.mu.RLock()
	var nodes []sharding.Node
	for id, n := range st.nodes {
		if !nodeAlive(n) {
			continue
		}
		bc.nodes[id] = n
		nodes = append(nodes, toShardingNode(n))
	}
	var existing []sharding.Allocation
	for _, a := range st.allocs {
		if AllocTerminal(a.ClientStatus) {
			continue
		}
		if _, ok := bc.nodes[a.NodeId]; !ok {
			continue
		}
		existing = append(existing, sharding.Allocation{JobID: a.JobId, Rank: int(a.Rank), NodeID: a.NodeId, GPUs: intsOf(a.Gpus)})
		if a.Rank == 0 && a.MasterPort != 0 {
			sc.reservePort(bc, a.NodeId, a.MasterPort)
		}
	}
	st.mu.RUnlock()
	c, err := sharding.NewCluster(nodes, existing)
	if err != nil {
		return nil, err
	}
	bc.cluster = c
	return bc, nil
}

func (sc *scheduler) reservePort(bc *batchContext, node string, port int32) {
	m := bc.ports[node]
	if m == nil {
		m = map[int32]bool{}
		bc.ports[node] = m
	}
	m[port] = true
}

func (sc *scheduler) pickPort(bc *batchContext, node string) int32 {
	for p := int32(sc.s.cfg.MasterPortMin); p <= int32(sc.s.cfg.MasterPortMax); p++ {
		if !bc.ports[node][p] {
			sc.reservePort(bc, node, p)
			return p
		}
	}
	return 0
}

func toShardingNode(n *controlpb.Node) sharding.Node {
	sn := sharding.Node{
		ID:           n.Id,
		Name:         n.Name,
		AZ:           n.Az,
		InstanceType: n.InstanceType,
		Lifecycle:    n.Lifecycle,
		MaxRanks:     int(n.MaxRanks),
		Draining:     n.Status == NodeDraining,
		Ineligible:   n.Ineligible,
	}
	if sn.Lifecycle == "" {
		sn.Lifecycle = sharding.LifecycleUnknown
	}
	for _, g := range n.Gpus {
		sn.GPUs = append(sn.GPUs, sharding.GPU{Index: int(g.Index), Model: g.Model, MemoryBytes: g.MemoryBytes})
	}
	return sn
}

func intsOf(v []int32) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func isElastic(spec *controlpb.JobSpec) bool { return spec.GetMaxRanks() > 0 }

func maxRanks(spec *controlpb.JobSpec) int32 {
	if spec.GetMaxRanks() > 0 {
		return spec.GetMaxRanks()
	}
	return spec.GetRanks()
}

func restartPolicy(spec *controlpb.JobSpec) (int32, time.Duration) {
	r := spec.GetRestart()
	if r == nil {
		return DefaultRestartAttempts, DefaultRestartDelay
	}
	return r.Attempts, r.Delay.AsDuration()
}

// toShardingJob converts a spec; ranks overrides the rank range when > 0.
func toShardingJob(id string, spec *controlpb.JobSpec) (sharding.Job, error) {
	j := sharding.Job{
		ID:          id,
		Ranks:       int(spec.GetRanks()),
		GPUsPerRank: int(spec.GetGpusPerRank()),
		Placement:   spec.GetPlacement(),
	}
	if spec.GetMaxRanks() > 0 {
		j.Ranks = int(spec.GetMaxRanks())
		j.MinRanks = int(max(spec.GetMinRanks(), 1))
	}
	if c := spec.GetConstraints(); c != nil {
		j.Constraints = sharding.Constraints{AZ: c.Az, Lifecycle: c.Lifecycle, InstanceType: c.InstanceType}
		if c.MinGpuMemory != "" {
			b, err := bytesize.Parse(c.MinGpuMemory)
			if err != nil {
				return j, fmt.Errorf("%w: min_gpu_memory: %w", ErrInvalidArgument, err)
			}
			j.Constraints.MinGPUMemoryBytes = uint64(b)
		}
	}
	return j, nil
}

// evaluate decides what a job needs now; nil means nothing to commit.
func (sc *scheduler) evaluate(bc *batchContext, id string) *fsmpb.JobPlan {
	st := sc.s.fsm.state
	j := st.Job(id)
	if j == nil || JobTerminal(j.Status) || j.StopRequested {
		return nil
	}
	allocs := st.Allocations(id)
	switch j.Status {
	case JobRunning:
		return sc.evalRunning(bc, j, allocs)
	default:
		return sc.evalPending(bc, j, allocs)
	}
}

func basePlan(j *controlpb.Job) *fsmpb.JobPlan {
	return &fsmpb.JobPlan{
		JobId:             j.Id,
		ExpectModifyIndex: j.ModifyIndex,
		Status:            j.Status,
		StatusReason:      j.StatusReason,
		Generation:        j.Generation,
		Restarts:          j.Restarts,
		WorldSize:         j.WorldSize,
		NextAttemptTime:   j.NextAttemptTime,
	}
}

func (sc *scheduler) evalRunning(bc *batchContext, j *controlpb.Job, allocs []*controlpb.Allocation) *fsmpb.JobPlan {
	var cur []*controlpb.Allocation
	for _, a := range allocs {
		if a.Generation == j.Generation {
			cur = append(cur, a)
		}
	}
	complete := len(cur) > 0
	var failReason, lossReason string
	var lost []string
	for _, a := range cur {
		n := bc.nodes[a.NodeId]
		switch {
		case a.ClientStatus == AllocComplete && a.ExitCode == 0:
			continue
		case a.ClientStatus == AllocComplete || a.ClientStatus == AllocFailed:
			if failReason == "" {
				failReason = fmt.Sprintf("rank %d failed on node %s: exit code %d", a.Rank, a.NodeName, a.ExitCode)
				if a.Message != "" {
					failReason += ": " + a.Message
				}
			}
		case a.ClientStatus == AllocLost || a.ClientStatus == AllocStopped:
			if lossReason == "" {
				lossReason = fmt.Sprintf("rank %d on node %s was %s", a.Rank, a.NodeName, a.ClientStatus)
			}
		case n == nil:
			lost = append(lost, a.Id)
			if lossReason == "" {
				lossReason = fmt.Sprintf("node %s of rank %d is gone", a.NodeName, a.Rank)
			}
		case n.Status == NodeDraining:
			if lossReason == "" {
				lossReason = fmt.Sprintf("node %s of rank %d is draining", a.NodeName, a.Rank)
			}
		}
		complete = false
	}
	p := basePlan(j)
	switch {
	case complete:
		p.Status = JobComplete
		p.StatusReason = fmt.Sprintf("all %d ranks of generation %d exited 0", len(cur), j.Generation)
		return p
	case failReason == "" && lossReason == "":
		if isElastic(j.Spec) && j.WorldSize < maxRanks(j.Spec) && sc.canGrow(bc, j) {
			p.Status = JobPending
			p.StatusReason = fmt.Sprintf("growing from %d ranks: capacity for more appeared", j.WorldSize)
			p.NextAttemptTime = nil
			p.StopAllocIds = desiredRunIDs(cur)
			return p
		}
		return nil
	}
	p.StopAllocIds = desiredRunIDs(cur)
	p.LostAllocIds = lost
	if failReason != "" {
		attempts, delay := restartPolicy(j.Spec)
		if j.Restarts >= attempts {
			p.Status = JobFailed
			p.StatusReason = fmt.Sprintf("generation %d failed: %s; restart attempts exhausted (%d of %d)", j.Generation, failReason, j.Restarts, attempts)
			return p
		}
		p.Restarts = j.Restarts + 1
		p.Status = JobPending
		p.NextAttemptTime = timestamppb.New(bc.now.Add(delay))
		p.StatusReason = fmt.Sprintf("generation %d failed: %s; restart %d of %d in %s", j.Generation, failReason, p.Restarts, attempts, delay)
		return p
	}
	p.Status = JobPending
	p.NextAttemptTime = nil
	p.StatusReason = fmt.Sprintf("generation %d ended: %s; placing again", j.Generation, lossReason)
	return p
}

func desiredRunIDs(allocs []*controlpb.Allocation) []string {
	var out []string
	for _, a := range allocs {
		if a.DesiredStatus != DesiredStop {
			out = append(out, a.Id)
		}
	}
	return out
}

// canGrow reports whether an elastic job would get more ranks if placed
// again: its own ranks' resources plus the free ones.
func (sc *scheduler) canGrow(bc *batchContext, j *controlpb.Job) bool {
	sj, err := toShardingJob(j.Id+"~grow", j.Spec)
	if err != nil {
		return false
	}
	extra := int(maxRanks(j.Spec) - j.WorldSize)
	sj.Ranks, sj.MinRanks = extra, 1
	plan, err := bc.cluster.Place(sj)
	return err == nil && len(plan.Ranks) > 0
}

func (sc *scheduler) evalPending(bc *batchContext, j *controlpb.Job, allocs []*controlpb.Allocation) *fsmpb.JobPlan {
	if t := j.NextAttemptTime; t != nil && t.AsTime().After(bc.now) {
		sc.timers[j.Id] = t.AsTime()
		return nil
	}
	p := basePlan(j)
	// Ranks of earlier generations must stop (or their node be gone)
	// before the next generation is placed.
	var lost, stopping []string
	for _, a := range allocs {
		if AllocTerminal(a.ClientStatus) {
			continue
		}
		if _, live := bc.nodes[a.NodeId]; !live {
			lost = append(lost, a.Id)
			continue
		}
		stopping = append(stopping, a.Id)
	}
	if len(stopping) > 0 {
		// A node that never reports its ranks stopped (it restarted without
		// them, or never started them) must not block the job forever.
		limit := killTimeout(j.Spec) + sc.s.cfg.StopReportGrace
		since := j.StatusTime.AsTime()
		if !bc.now.Before(since.Add(limit)) {
			p.StatusReason = fmt.Sprintf("%d ranks of generation %d did not report stopping within %s; treating them as lost", len(stopping), j.Generation, limit)
			p.LostAllocIds = append(lost, stopping...)
			sc.requeue = append(sc.requeue, j.Id)
			return p
		}
		sc.timers[j.Id] = since.Add(limit)
		stopping := len(stopping)
		reason := fmt.Sprintf("waiting for %d ranks of generation %d to stop", stopping, j.Generation)
		if strings.Contains(j.StatusReason, "failed") || strings.Contains(j.StatusReason, "ended") || strings.Contains(j.StatusReason, "growing") {
			reason = j.StatusReason // keep the cause visible while ranks stop
		}
		if len(lost) == 0 && reason == j.StatusReason {
			return nil
		}
		p.StatusReason = reason
		p.LostAllocIds = lost
		return p
	}
	sj, err := toShardingJob(j.Id, j.Spec)
	if err != nil {
		p.Status = JobFailed
		p.StatusReason = "cannot place: " + err.Error()
		return p
	}
	plan, err := bc.cluster.Place(sj)
	if err != nil {
		var ue *sharding.UnplaceableError
		if errors.As(err, &ue) {
			reason := "waiting for capacity: " + ue.Reason
			if reason == j.StatusReason && len(lost) == 0 {
				return nil
			}
			p.StatusReason = reason
			p.LostAllocIds = lost
			return p
		}
		p.Status = JobFailed
		p.StatusReason = "cannot place: " + err.Error()
		return p
	}
	if err := bc.cluster.Apply(plan); err != nil {
		sc.s.logger.Error("scheduler: planner returned a conflicting plan", "job", j.Id, "error", err)
		return nil
	}
	gen := j.Generation + 1
	p.Generation = gen
	p.Status = JobRunning
	p.StatusReason = ""
	p.NextAttemptTime = nil
	p.WorldSize = int32(len(plan.Ranks))
	p.LostAllocIds = lost
	groups := 0
	for _, r := range plan.Ranks {
		groups = max(groups, r.GroupRank+1)
	}
	var master *controlpb.Node
	var masterPort int32
	for _, r := range plan.Ranks {
		if r.Rank == 0 {
			master = bc.nodes[r.NodeID]
			masterPort = sc.pickPort(bc, r.NodeID)
		}
	}
	masterHost := ""
	if master != nil {
		masterHost = hostOf(master.RpcAddr)
	}
	for _, r := range plan.Ranks {
		n := bc.nodes[r.NodeID]
		a := &controlpb.Allocation{
			Id:             fmt.Sprintf("%s.%d.%d", j.Id, gen, r.Rank),
			JobId:          j.Id,
			Generation:     gen,
			Rank:           int32(r.Rank),
			WorldSize:      p.WorldSize,
			LocalRank:      int32(r.LocalRank),
			LocalWorldSize: int32(r.LocalWorldSize),
			GroupRank:      int32(r.GroupRank),
			GroupWorldSize: int32(groups),
			NodeId:         r.NodeID,
			MasterAddr:     masterHost,
			MasterPort:     masterPort,
			DesiredStatus:  DesiredRun,
			ClientStatus:   AllocPending,
			RestartCount:   int32(gen - 1),
		}
		for _, g := range r.GPUs {
			a.Gpus = append(a.Gpus, int32(g))
		}
		if n != nil {
			a.NodeName = n.Name
			a.RankAddr = n.RpcAddr
		}
		p.Allocations = append(p.Allocations, a)
	}
	return p
}

func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
