package consensus

import (
	"errors"
	"fmt"
	"hash/fnv"
	"net"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
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

// Cause is why a generation ended, typed: the scheduler decides on it
// (never on a status reason, which says the same for people). It is stored
// as the job's end_cause.
type Cause string

// Causes of a generation's end.
const (
	CauseNone Cause = ""
	// CauseRankFailed: a rank failed (non-zero exit, or its driver failed).
	// Whether that is the job's own failure is not settled yet: when a node
	// dies its peers often fail before gossip says it is dead.
	CauseRankFailed Cause = "rank-failed"
	// CauseTaskFailed: the job's own failure, counted against its restart
	// policy.
	CauseTaskFailed Cause = "task-failed"
	// CauseNodeLost: a rank's node was silent for longer than the grace
	// period, or lost the rank (an agent restart that could not adopt it),
	// or went silent while the rank's peers failed.
	CauseNodeLost Cause = "node-lost"
	// CauseNodeDrained: a rank's node drains (operator drain, spot
	// interruption notice) or stopped the rank on its own.
	CauseNodeDrained Cause = "node-drained"
	// CauseResized: an elastic job is placed again to grow.
	CauseResized Cause = "resized"
	// CauseMasterPortBusy: rank 0 could not start because its MASTER_PORT
	// was held on its host by a process outside gpumesh (the scheduler only
	// knows the ports of its own jobs). Placed again at once with another
	// port; not counted, unless the generation before ended the same way
	// (then the next busy port counts as the job's failure, so a host whose
	// ports are all taken cannot loop forever).
	CauseMasterPortBusy Cause = "master-port-busy"
)

// StartMasterPortBusy is the Allocation.StartFailure of a rank 0 whose node
// found its MASTER_PORT in use before starting it.
const StartMasterPortBusy = "master-port-busy"

// StartCheckpointOtherJob is the Allocation.StartFailure of a rank whose
// agent found another job's newest checkpoint under the job's
// checkpoint.uri (checkpoint.ErrOtherJob). Every generation would fail the
// same way, so the job fails at once, its message in the status reason.
const StartCheckpointOtherJob = "checkpoint-of-another-job"

// Counts reports whether a generation that ended for this cause counts
// against the job's restart policy: only the job's own failure does.
func (c Cause) Counts() bool { return c == CauseTaskFailed }

// SchedulerConfig is what a scheduler decision depends on besides the
// state and the clock. SchedulerConfigFrom derives it from a server Config.
type SchedulerConfig struct {
	// MasterPortMin..MasterPortMax is the MASTER_PORT range per host.
	MasterPortMin, MasterPortMax int
	// StopReportGrace, NodeLossGrace and FailureSettle: see Config.
	StopReportGrace, NodeLossGrace, FailureSettle time.Duration
}

// SchedulerConfigFrom returns the scheduler's part of a server Config.
func SchedulerConfigFrom(c *Config) SchedulerConfig {
	return SchedulerConfig{
		MasterPortMin:   c.MasterPortMin,
		MasterPortMax:   c.MasterPortMax,
		StopReportGrace: c.StopReportGrace,
		NodeLossGrace:   c.NodeLossGrace,
		FailureSettle:   c.FailureSettle,
	}
}

// ClusterView is the part of the replicated state that placement reads:
// every node (any status) and every allocation that still holds resources.
// StateStore.ClusterView takes one.
type ClusterView struct {
	Nodes       []*controlpb.Node
	Allocations []*controlpb.Allocation
	// Lagging holds nodes whose replica is behind the leader (a server that
	// rejoined and has not caught up): nothing new is placed on them, since
	// they would learn of it late. Only the leader knows; nil elsewhere.
	Lagging map[string]bool
}

// Decision is the outcome of evaluating one job.
type Decision struct {
	// Plan is what to commit; nil when nothing changes now.
	Plan *fsmpb.JobPlan
	// WakeAt, when not zero, is when the job must be evaluated again even
	// if nothing else happens (a restart delay, a grace period, a stop
	// report deadline).
	WakeAt time.Time
	// Again asks for another evaluation once Plan is committed (a
	// generation ended: the next step is to settle its cause or place it).
	Again bool
	// Note, when not empty, says for the leader's log what Plan changes
	// that its status reason does not (a service scaled by load).
	Note string
}

// Evaluator decides what jobs need, against one ClusterView. It is the
// scheduler as a function: no clock (now is an argument), no locks, no
// I/O, no timers; the same view, job and time give the same decision.
// Evaluate reserves the resources of every placement it returns, so that
// the next job evaluated by the same Evaluator sees them taken (a batch of
// plans committed together). It is not safe for concurrent use.
type Evaluator struct {
	cfg     SchedulerConfig
	nodes   map[string]*controlpb.Node
	cluster *sharding.Cluster
	ports   map[string]map[int32]bool
	// load is the routers' load, for services scaled by load; nil: none
	// known (they keep their count).
	load LoadView
}

// WithLoad makes e read the services' load from l (services scaled by load
// keep their replica count without one). It returns e.
func (e *Evaluator) WithLoad(l LoadView) *Evaluator {
	e.load = l
	return e
}

// NewEvaluator builds the planner's view: live nodes (ready or draining)
// with the allocations that hold resources on them; draining, ineligible
// and lagging nodes take no new work.
func NewEvaluator(v ClusterView, cfg SchedulerConfig) (*Evaluator, error) {
	e := &Evaluator{cfg: cfg, nodes: make(map[string]*controlpb.Node, len(v.Nodes)), ports: map[string]map[int32]bool{}}
	var nodes []sharding.Node
	for _, n := range v.Nodes {
		e.nodes[n.Id] = n
		if !nodeAlive(n) {
			continue
		}
		sn := toShardingNode(n)
		if v.Lagging[n.Id] {
			sn.Ineligible = true
		}
		nodes = append(nodes, sn)
	}
	var existing []sharding.Allocation
	for _, a := range v.Allocations {
		if AllocTerminal(a.ClientStatus) {
			continue // a busy MASTER_PORT is the job's to avoid: see busyPorts
		}
		if n := e.nodes[a.NodeId]; n == nil || !nodeAlive(n) {
			continue
		}
		existing = append(existing, sharding.Allocation{JobID: a.JobId, Rank: int(a.Rank), NodeID: a.NodeId, GPUs: intsOf(a.Gpus)})
		if a.Rank == 0 && a.MasterPort != 0 {
			e.reservePort(masterKey(a.MasterAddr, a.NodeId), a.MasterPort)
		}
	}
	c, err := sharding.NewCluster(nodes, existing)
	if err != nil {
		return nil, err
	}
	e.cluster = c
	return e, nil
}

// Evaluate decides what job j needs at time now, given allocs, all of its
// allocations (every generation, less the ended ones that garbage
// collection let go: gc.go keeps what Evaluate reads).
//
// Job life:
//   - pending: placed with sharding.Cluster.Place once the ranks of its
//     previous generation have stopped and its restart delay has passed;
//     on success a new generation (generation+1) of allocations, job
//     running; otherwise it stays pending with the planner's reason.
//   - running: when every rank of the generation exited 0 the job is
//     complete. The generation ends (every rank told to stop, job pending)
//     when a rank fails, when a rank's node drains or lost it, or when a
//     rank's node has been silent (down or left) for NodeLossGrace; within
//     the grace the ranks of a silent node are only suspected, and an agent
//     that comes back adopts them. A silent node ends the generation sooner
//     when another rank of it fails (its peers saw the node die).
//   - the cause of the end is typed (Cause). A rank failure is settled as
//     the job's own (CauseTaskFailed, counted against restart.attempts) only
//     once no rank of the generation turned out lost with its node, when
//     every rank has reported or FailureSettle has passed; node losses and
//     drains never count. Once the counted failures exceed the attempts,
//     the job fails.
//   - elastic jobs (max_ranks > 0) are placed with min_ranks..max_ranks
//     ranks; a running elastic job below max_ranks is regrown (a new
//     generation) when capacity for more ranks appears, and a lost node
//     shrinks it the same way.
func (e *Evaluator) Evaluate(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) Decision {
	if j == nil || JobTerminal(j.Status) || j.StopRequested {
		return Decision{}
	}
	if j.Status == JobRunning {
		if j.Spec.GetType() == jobspec.TypeService {
			return e.evalService(j, allocs, now) // service_sched.go
		}
		return e.evalRunning(j, allocs, now)
	}
	return e.evalPending(j, allocs, now)
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
		EndCause:          j.EndCause,
	}
}

// silentSince returns when a node went silent (down or left, or unknown),
// and whether it is silent.
func silentSince(n *controlpb.Node) (time.Time, bool) {
	if n == nil {
		return time.Time{}, true
	}
	if nodeAlive(n) {
		return time.Time{}, false
	}
	return n.StatusTime.AsTime(), true
}

func earliest(a, b time.Time) time.Time {
	if a.IsZero() || (!b.IsZero() && b.Before(a)) {
		return b
	}
	return a
}

func (e *Evaluator) evalRunning(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) Decision {
	var cur []*controlpb.Allocation
	for _, a := range allocs {
		if a.Generation == j.Generation {
			cur = append(cur, a)
		}
	}
	complete := len(cur) > 0
	var failed, lost, drained, suspect, busy, refused *controlpb.Allocation
	var lostIDs []string
	var wake time.Time
	first := func(p **controlpb.Allocation, a *controlpb.Allocation) {
		if *p == nil {
			*p = a
		}
	}
	for _, a := range cur {
		if a.ClientStatus == AllocComplete && a.ExitCode == 0 {
			continue
		}
		complete = false
		n := e.nodes[a.NodeId]
		switch {
		case a.ClientStatus == AllocFailed && a.StartFailure == StartMasterPortBusy:
			first(&busy, a)
		case a.ClientStatus == AllocFailed && a.StartFailure == StartCheckpointOtherJob:
			first(&refused, a)
		case a.ClientStatus == AllocComplete || a.ClientStatus == AllocFailed:
			first(&failed, a)
		case a.ClientStatus == AllocLost:
			first(&lost, a)
		case a.ClientStatus == AllocStopped:
			// Its node stopped it without being asked (drain, spot notice).
			first(&drained, a)
		default:
			if since, silent := silentSince(n); silent {
				if end := since.Add(e.cfg.NodeLossGrace); n != nil && now.Before(end) {
					first(&suspect, a)
					wake = earliest(wake, end)
				} else {
					first(&lost, a)
					lostIDs = append(lostIDs, a.Id)
				}
			} else if n.Status == NodeDraining {
				first(&drained, a)
			}
		}
	}
	p := basePlan(j)
	switch {
	case complete:
		p.Status = JobComplete
		p.StatusReason = fmt.Sprintf("all %d ranks of generation %d exited 0", len(cur), j.Generation)
		return Decision{Plan: p}
	case refused != nil:
		p.Status = JobFailed
		p.NextAttemptTime = nil
		p.StopAllocIds = desiredRunIDs(cur)
		p.EndCause = string(CauseTaskFailed)
		p.StatusReason = fmt.Sprintf("generation %d could not start: %s; not restarted (every generation would fail the same way)", j.Generation, rankFailure(refused))
		return Decision{Plan: p}
	case failed == nil && lost == nil && drained == nil && busy == nil:
		reason := ""
		if suspect != nil {
			since, _ := silentSince(e.nodes[suspect.NodeId])
			reason = fmt.Sprintf("node %s of rank %d is silent since %s; its ranks count as lost at %s unless it comes back",
				suspect.NodeName, suspect.Rank, since.UTC().Format(time.RFC3339), since.Add(e.cfg.NodeLossGrace).UTC().Format(time.RFC3339))
		} else if isElastic(j.Spec) && j.WorldSize < maxRanks(j.Spec) && e.canGrow(j) {
			p.Status = JobPending
			p.StatusReason = fmt.Sprintf("growing from %d ranks: capacity for more appeared", j.WorldSize)
			p.NextAttemptTime = nil
			p.EndCause = string(CauseResized)
			p.StopAllocIds = desiredRunIDs(cur)
			return Decision{Plan: p, Again: true}
		}
		if reason == j.StatusReason {
			return Decision{WakeAt: wake}
		}
		p.StatusReason = reason
		return Decision{Plan: p, WakeAt: wake}
	}
	// The generation ends.
	p.Status = JobPending
	p.NextAttemptTime = nil
	p.StopAllocIds = desiredRunIDs(cur)
	p.LostAllocIds = lostIDs
	switch {
	case lost != nil || (failed != nil && suspect != nil):
		a := lost
		what := "lost it"
		if a == nil {
			a, what = suspect, "went silent while its peers failed"
		} else if a.ClientStatus != AllocLost {
			what = fmt.Sprintf("was silent for %s", e.cfg.NodeLossGrace)
		}
		p.EndCause = string(CauseNodeLost)
		p.LostMessage = fmt.Sprintf("lost: node %s %s", a.NodeName, what)
		p.StatusReason = fmt.Sprintf("generation %d ended: node %s of rank %d %s; placing again (a node loss does not count as a restart)", j.Generation, a.NodeName, a.Rank, what)
	case drained != nil:
		p.EndCause = string(CauseNodeDrained)
		p.StatusReason = fmt.Sprintf("generation %d ended: node %s of rank %d is draining; placing again (a drain does not count as a restart)", j.Generation, drained.NodeName, drained.Rank)
	case busy != nil && failed == nil && Cause(j.EndCause) != CauseMasterPortBusy:
		p.EndCause = string(CauseMasterPortBusy)
		p.StatusReason = fmt.Sprintf("generation %d ended: MASTER_PORT %d is in use on node %s by a process outside gpumesh; placing again with another port (does not count as a restart)", j.Generation, busy.MasterPort, busy.NodeName)
	default:
		if failed == nil {
			failed = busy // a second busy port in a row: the job's failure
		}
		_, delay := restartPolicy(j.Spec)
		p.EndCause = string(CauseRankFailed)
		p.NextAttemptTime = timestamppb.New(now.Add(delay))
		p.StatusReason = fmt.Sprintf("generation %d failed: %s; placing again in %s", j.Generation, rankFailure(failed), delay)
	}
	return Decision{Plan: p, Again: true}
}

// rankFailure says what became of a failed rank in one clause: "rank 1 on
// node-2 exited with code 3" or, when the task never ran, "rank 1 on node-2
// could not start (MESSAGE)".
func rankFailure(a *controlpb.Allocation) string {
	s := fmt.Sprintf("rank %d on %s exited with code %d", a.Rank, a.NodeName, a.ExitCode)
	if a.ExitCode < 0 {
		s = fmt.Sprintf("rank %d on %s did not run", a.Rank, a.NodeName)
	}
	if a.Message != "" {
		s += " (" + a.Message + ")"
	}
	return s
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
// again: its own ranks' resources plus the free ones. More ranks fitting
// in the free resources alone say so at once; a job whose ranks share GPUs
// (ranks_per_gpu N) may also have room on a GPU it holds (fewer than N of
// its ranks there), which only placing it again on what it holds plus
// what is free shows (on a copy of the cluster).
func (e *Evaluator) canGrow(j *controlpb.Job) bool {
	sj, err := toShardingJob(j.Id, j.Spec)
	if err != nil {
		return false
	}
	more := sj
	more.ID = j.Id + "~grow"
	more.Ranks, more.MinRanks = int(maxRanks(j.Spec)-j.WorldSize), 1
	if plan, err := e.cluster.Place(more); err == nil && len(plan.Ranks) > 0 {
		return true
	}
	if sj.RanksPerGPU <= 1 {
		return false
	}
	c := e.cluster.Clone()
	c.ReleaseJob(j.Id)
	plan, err := c.Place(sj)
	return err == nil && len(plan.Ranks) > int(j.WorldSize)
}

func (e *Evaluator) evalPending(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) Decision {
	p := basePlan(j)
	changed := false
	var wake time.Time
	// Ranks of earlier generations must stop (or their node be gone)
	// before the next generation is placed. A rank whose node is silent is
	// lost at once: the job no longer needs it, so no grace applies.
	var stopping []string
	lostNow := map[string]bool{}
	for _, a := range allocs {
		if AllocTerminal(a.ClientStatus) {
			continue
		}
		if _, silent := silentSince(e.nodes[a.NodeId]); silent {
			p.LostAllocIds = append(p.LostAllocIds, a.Id)
			lostNow[a.Id] = true
			if p.LostMessage == "" {
				p.LostMessage = fmt.Sprintf("lost: node %s is silent", a.NodeName)
			}
			changed = true
			continue
		}
		stopping = append(stopping, a.Id)
	}
	if Cause(j.EndCause) == CauseRankFailed {
		d, done := e.settle(j, allocs, lostNow, now, p)
		if done {
			if p.Status == JobFailed {
				return Decision{Plan: p}
			}
			changed = true
		} else {
			wake = earliest(wake, d)
		}
	}
	if len(stopping) > 0 {
		// A node that never reports its ranks stopped (it restarted without
		// them, or never started them) must not block the job forever.
		limit := killTimeout(j.Spec) + e.cfg.StopReportGrace
		since := j.StatusTime.AsTime()
		if !now.Before(since.Add(limit)) {
			p.StatusReason = fmt.Sprintf("%d ranks of generation %d did not report stopping within %s; treating them as lost", len(stopping), j.Generation, limit)
			p.LostAllocIds = append(p.LostAllocIds, stopping...)
			p.LostMessage = fmt.Sprintf("lost: its node did not report it stopped within %s", limit)
			return Decision{Plan: p, Again: true}
		}
		wake = earliest(wake, since.Add(limit))
		if p.EndCause == "" {
			// No end of a generation to explain (the job was just placed
			// again by an earlier leader, say): say what it waits for.
			p.StatusReason = fmt.Sprintf("waiting for %d ranks of generation %d to stop", len(stopping), j.Generation)
		}
		if !changed && p.StatusReason == j.StatusReason {
			return Decision{WakeAt: wake}
		}
		return Decision{Plan: p, WakeAt: wake, Again: changed}
	}
	if Cause(p.EndCause) == CauseRankFailed || (j.NextAttemptTime != nil && j.NextAttemptTime.AsTime().After(now)) {
		if t := j.NextAttemptTime; t != nil && t.AsTime().After(now) {
			wake = earliest(wake, t.AsTime())
		}
		if !changed {
			return Decision{WakeAt: wake}
		}
		return Decision{Plan: p, WakeAt: wake, Again: true}
	}
	return e.place(j, busyPorts(allocs), p, now)
}

// settle decides whether a rank failure (CauseRankFailed) was the job's
// own. It returns done with p updated (end cause, restarts, status) once
// decided, or the time to decide by. lostNow holds allocations p marks
// lost.
func (e *Evaluator) settle(j *controlpb.Job, allocs []*controlpb.Allocation, lostNow map[string]bool, now time.Time, p *fsmpb.JobPlan) (time.Time, bool) {
	var failed, lost *controlpb.Allocation
	reported := true
	for _, a := range allocs {
		if a.Generation != j.Generation {
			continue
		}
		switch {
		case a.ClientStatus == AllocLost || lostNow[a.Id]:
			if lost == nil {
				lost = a
			}
		case failed == nil && (a.ClientStatus == AllocFailed || (a.ClientStatus == AllocComplete && a.ExitCode != 0)):
			failed = a
		case !AllocTerminal(a.ClientStatus):
			reported = false
		}
	}
	if lost != nil {
		p.EndCause = string(CauseNodeLost)
		p.StatusReason = fmt.Sprintf("generation %d ended: node %s of rank %d was lost; placing again (a node loss does not count as a restart)", j.Generation, lost.NodeName, lost.Rank)
		return time.Time{}, true
	}
	settleAt := j.StatusTime.AsTime().Add(e.cfg.FailureSettle)
	if !reported && now.Before(settleAt) {
		return settleAt, false
	}
	what := "a rank failed"
	if failed != nil {
		what = rankFailure(failed)
	}
	attempts, delay := restartPolicy(j.Spec)
	p.EndCause = string(CauseTaskFailed)
	if j.Restarts >= attempts {
		p.Status = JobFailed
		p.NextAttemptTime = nil
		p.StatusReason = fmt.Sprintf("generation %d failed: %s; restart attempts exhausted (%d of %d)", j.Generation, what, j.Restarts, attempts)
		return time.Time{}, true
	}
	p.Restarts = j.Restarts + 1
	p.StatusReason = fmt.Sprintf("generation %d failed: %s; restart %d of %d in %s", j.Generation, what, p.Restarts, attempts, delay)
	return time.Time{}, true
}

// place places the next generation of a pending job whose previous one has
// stopped.
func (e *Evaluator) place(j *controlpb.Job, busy map[string]map[int32]bool, p *fsmpb.JobPlan, now time.Time) Decision {
	sj, err := toShardingJob(j.Id, j.Spec)
	if err != nil {
		p.Status = JobFailed
		p.StatusReason = "cannot place: " + err.Error()
		return Decision{Plan: p}
	}
	plan, err := e.cluster.Place(sj)
	if err != nil {
		var ue *sharding.UnplaceableError
		if !errors.As(err, &ue) {
			p.Status = JobFailed
			p.StatusReason = "cannot place: " + err.Error()
			return Decision{Plan: p}
		}
		reason := "waiting for capacity: " + ue.Reason
		if reason == j.StatusReason && len(p.LostAllocIds) == 0 && p.EndCause == j.EndCause && p.Restarts == j.Restarts {
			return Decision{}
		}
		p.StatusReason = reason
		return Decision{Plan: p}
	}
	if err := e.cluster.Apply(plan); err != nil {
		// The planner contradicted itself (a bug): nothing is committed and
		// the job stays as it is until its next event.
		return Decision{}
	}
	gen := j.Generation + 1
	p.Generation = gen
	p.Status = JobRunning
	p.StatusReason = ""
	p.NextAttemptTime = nil
	p.WorldSize = int32(len(plan.Ranks))
	groups := 0
	for _, r := range plan.Ranks {
		groups = max(groups, r.GroupRank+1)
	}
	var masterPort int32
	masterHost := ""
	for _, r := range plan.Ranks {
		if r.Rank == 0 {
			if master := e.nodes[r.NodeID]; master != nil {
				masterHost = hostOf(master.RpcAddr)
			}
			key := masterKey(masterHost, r.NodeID)
			masterPort = e.pickPort(key, j.Id, gen, busy[key])
		}
	}
	for _, r := range plan.Ranks {
		n := e.nodes[r.NodeID]
		a := &fsmpb.Allocation{
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
	return Decision{Plan: p}
}

// masterKey is what a MASTER_PORT is reserved on: the host rank 0 listens
// at (nodes of one machine, as in a dev cluster, share it), or the node
// when its address is unknown.
func masterKey(host, nodeID string) string {
	if host != "" {
		return "host " + host
	}
	return "node " + nodeID
}

func (e *Evaluator) reservePort(key string, port int32) {
	m := e.ports[key]
	if m == nil {
		m = map[int32]bool{}
		e.ports[key] = m
	}
	m[port] = true
}

// busyPorts returns, by masterKey, the MASTER_PORTs that the job's rank 0
// (a service's replicas: each is its own rank 0) found held by a process
// outside gpumesh (StartMasterPortBusy), for the next pick to avoid. They
// come from the job's own allocations (Evaluate's allocs keep the ended
// ones that matter until GC lets them go), not from the ClusterView, which
// holds only allocations that still hold resources.
func busyPorts(allocs []*controlpb.Allocation) map[string]map[int32]bool {
	var busy map[string]map[int32]bool
	for _, a := range allocs {
		if a.StartFailure != StartMasterPortBusy || a.MasterPort == 0 {
			continue
		}
		if busy == nil {
			busy = map[string]map[int32]bool{}
		}
		key := masterKey(a.MasterAddr, a.NodeId)
		if busy[key] == nil {
			busy[key] = map[int32]bool{}
		}
		busy[key][a.MasterPort] = true
	}
	return busy
}

// pickPort reserves a MASTER_PORT that no live job uses on key's host and
// that is not in avoid (ports found busy there; nil: none): the first free
// one from a start derived from the job and generation (so that a
// generation does not meet a port its predecessor or torchrun's default
// 29500 may still hold), wrapping around the range. When every free port
// is in avoid, it takes the first free one anyway (the start may find the
// port free again; a second busy port in a row fails the generation).
func (e *Evaluator) pickPort(key, jobID string, gen uint64, avoid map[int32]bool) int32 {
	lo, hi := int32(e.cfg.MasterPortMin), int32(e.cfg.MasterPortMax)
	span := hi - lo + 1
	h := fnv.New32a()
	fmt.Fprintf(h, "%s/%d", jobID, gen)
	start := int32(h.Sum32() % uint32(span))
	fallback := int32(0)
	for i := int32(0); i < span; i++ {
		p := lo + (start+i)%span
		if e.ports[key][p] {
			continue
		}
		if avoid[p] {
			if fallback == 0 {
				fallback = p
			}
			continue
		}
		e.reservePort(key, p)
		return p
	}
	if fallback != 0 {
		e.reservePort(key, fallback)
	}
	return fallback
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
		RanksPerGPU: int(spec.GetRanksPerGpu()),
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

func hostOf(addr string) string {
	if h, _, err := net.SplitHostPort(addr); err == nil {
		return h
	}
	return addr
}
