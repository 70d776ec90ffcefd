package consensus

import (
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

// Replica health values (Allocation.health), reported by the replica's
// node from its health checks.
const (
	HealthStarting  = "starting"  // no check passed yet (within the grace period)
	HealthHealthy   = "healthy"   // receives traffic
	HealthUnhealthy = "unhealthy" // the check failed threshold times in a row
	HealthDraining  = "draining"  // its node drains or it is stopping: no new requests
)

// serviceRecheck bounds how long a running service waits between
// evaluations while a replacement is starting (health reports wake it
// sooner).
const serviceRecheck = 5 * time.Second

// evalService decides what a running service needs. A service never
// completes: every replica slot (rank 0..replicas-1) holds one replica.
//   - a replica that ended (exited, failed, lost with its node) is replaced
//     on its own, after the restart delay, without touching the others; a
//     slot whose replicas keep failing waits longer after each failure in
//     a row (the crash-loop back-off, service_backoff.go);
//   - a replica on a draining node, or on a node silent for longer than the
//     node loss grace, gets a replacement placed elsewhere first; the old
//     one is stopped once the replacement is healthy (max unavailable 0),
//     or at once when its node is gone;
//   - after a rolling update (UpdateJob), a replica of a generation older
//     than the job's spec_generation runs the previous spec: it gets a
//     replacement with the new spec, and is stopped (drained) once the
//     replacement is healthy; one slot at a time, so the service never has
//     fewer healthy replicas than before (max unavailable 0). A replacement
//     that never becomes healthy stalls the update, the old replicas serve.
//
// A plan that places replacements bumps the job's generation and gives
// them the new one (so their IDs and task directories never repeat); the
// replicas it does not touch keep theirs and run on.
func (e *Evaluator) evalService(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) Decision {
	p := basePlan(j)
	replicas, note := e.serviceReplicas(j, allocs, now) // service_scale.go
	p.WorldSize = int32(replicas)
	changed := p.WorldSize != j.WorldSize
	var wake time.Time
	if j.Spec.GetService().GetMaxReplicas() > 0 {
		wake = now.Add(ScaleEvery) // scaled by load: look at it again
	}
	slots := make([][]*controlpb.Allocation, replicas)
	hist := slotHistories(allocs) // service_backoff.go
	for _, a := range allocs {
		r := int(a.Rank)
		if a.DesiredStatus == DesiredStop {
			continue
		}
		if AllocTerminal(a.ClientStatus) {
			// Ended on its own: told to stop so it is not counted again.
			p.StopAllocIds = append(p.StopAllocIds, a.Id)
			changed = true
			continue
		}
		if r >= replicas {
			p.StopAllocIds = append(p.StopAllocIds, a.Id) // scaled down
			changed = true
			continue
		}
		slots[r] = append(slots[r], a)
	}
	backoff := serviceBackoff(j.Spec)
	busy := busyPorts(allocs) // MASTER_PORTs replicas found held on their node
	var reasons []string
	// siblings are the nodes of the replicas to keep running, and of those
	// placed below: a new replica goes elsewhere when another node can
	// take it.
	var siblings []string
	for _, live := range slots {
		for _, a := range live {
			siblings = append(siblings, a.NodeId)
		}
	}
	// Slots whose outdated replica has a replacement that is not healthy
	// yet: a rolling update replaces one slot at a time.
	rolling := 0
	for _, live := range slots {
		var old, cur []*controlpb.Allocation
		for _, a := range live {
			if a.Generation < j.SpecGeneration {
				old = append(old, a)
			} else {
				cur = append(cur, a)
			}
		}
		if len(old) > 0 && len(cur) > 0 && firstHealthy(cur) == nil {
			rolling++
		}
	}
	for r, live := range slots {
		var good, moving []*controlpb.Allocation
		for _, a := range live {
			n := e.nodes[a.NodeId]
			since, silent := silentSince(n)
			switch {
			case silent && (n == nil || !now.Before(since.Add(e.cfg.NodeLossGrace))):
				p.LostAllocIds = append(p.LostAllocIds, a.Id)
				p.LostMessage = fmt.Sprintf("lost: node %s is silent", a.NodeName)
				changed = true
			case silent:
				moving = append(moving, a) // suspect: replace, keep until lost
				wake = earliest(wake, since.Add(e.cfg.NodeLossGrace))
			case n.Status == NodeDraining:
				moving = append(moving, a)
			default:
				good = append(good, a)
			}
		}
		// A rolling update: replicas of a generation older than the
		// spec's run the previous spec (outdated); the others run the
		// current one.
		var cur, old []*controlpb.Allocation
		for _, a := range good {
			if a.Generation < j.SpecGeneration {
				old = append(old, a)
			} else {
				cur = append(cur, a)
			}
		}
		healthy := firstHealthy(cur)
		if healthy == nil && len(cur) == 0 {
			healthy = firstHealthy(old) // no replacement yet: the old one serves
		}
		if healthy != nil {
			// One replica per slot: a replacement made while a silent node
			// was suspected, whose node came back, is one too many; an
			// outdated replica whose replacement is healthy is done.
			for _, a := range good {
				if a != healthy {
					p.StopAllocIds = append(p.StopAllocIds, a.Id)
					changed = true
				}
			}
		}
		if healthy != nil {
			for _, a := range moving {
				if n := e.nodes[a.NodeId]; n != nil && n.Status == NodeDraining {
					p.StopAllocIds = append(p.StopAllocIds, a.Id)
					changed = true
				}
			}
		}
		// The slot's failures in a row and when its next replica may
		// start (crash-loop back-off).
		var failures int
		var next time.Time
		if h := hist[r]; h != nil {
			failures = h.failures(j, backoff, now)
			next = h.nextTry(failures, backoff)
		}
		if len(cur) == 0 && len(old) > 0 && len(moving) == 0 {
			// Replace the outdated replica, one slot at a time: the next
			// slot's turn comes once this replacement is healthy.
			switch {
			case rolling > 0:
				reasons = append(reasons, fmt.Sprintf("rolling update: replica %d waits its turn", r))
				continue
			case now.Before(next):
				wake = earliest(wake, next)
				reasons = append(reasons, fmt.Sprintf("rolling update: replica %d's replacement ended%s; trying again at %s", r, inARow(failures), next.UTC().Format(time.RFC3339)))
				rolling++
				continue
			}
			a, why := e.placeReplica(j, r, p.WorldSize, j.Generation+1, int32(failures), siblings, busy)
			if a == nil {
				reasons = append(reasons, fmt.Sprintf("rolling update: replica %d's replacement waits for capacity: %s", r, why))
				continue
			}
			p.Allocations = append(p.Allocations, a)
			siblings = append(siblings, a.NodeId)
			p.Generation = j.Generation + 1
			changed = true
			rolling++
			wake = earliest(wake, now.Add(serviceRecheck))
			continue
		}
		if len(good) > 0 {
			if healthy == nil && (len(moving) > 0 || len(old) > 0) {
				wake = earliest(wake, now.Add(serviceRecheck))
			}
			if healthy == nil && len(old) > 0 {
				reasons = append(reasons, fmt.Sprintf("rolling update: replica %d's replacement is not healthy yet", r))
			}
			continue
		}
		if now.Before(next) {
			wake = earliest(wake, next)
			if failures >= CrashLoopAt {
				reasons = append(reasons, fmt.Sprintf("replica %d is crash-looping (%d failures in a row); next try at %s", r, failures, next.UTC().Format(time.RFC3339)))
			} else {
				reasons = append(reasons, fmt.Sprintf("replica %d ended%s; replacing it at %s", r, inARow(failures), next.UTC().Format(time.RFC3339)))
			}
			continue
		}
		a, why := e.placeReplica(j, r, p.WorldSize, j.Generation+1, int32(failures), siblings, busy)
		if a == nil {
			reasons = append(reasons, fmt.Sprintf("replica %d waits for capacity: %s", r, why))
			continue
		}
		p.Allocations = append(p.Allocations, a)
		siblings = append(siblings, a.NodeId)
		p.Generation = j.Generation + 1
		changed = true
		if len(moving) > 0 {
			wake = earliest(wake, now.Add(serviceRecheck))
		}
	}
	sort.Strings(reasons)
	reason := ""
	if len(reasons) > 0 {
		reason = reasons[0]
		if len(reasons) > 1 {
			reason += fmt.Sprintf(" (and %d more)", len(reasons)-1)
		}
	}
	if !changed && reason == j.StatusReason {
		return Decision{WakeAt: wake}
	}
	p.StatusReason = reason
	return Decision{Plan: p, WakeAt: wake, Note: note}
}

// firstHealthy returns the first running, healthy replica of as, or nil.
func firstHealthy(as []*controlpb.Allocation) *controlpb.Allocation {
	for _, a := range as {
		if a.ClientStatus == AllocRunning && a.Health == HealthHealthy {
			return a
		}
	}
	return nil
}

// inARow says ", N failures in a row" for more than one, "" else.
func inARow(failures int) string {
	if failures < 2 {
		return ""
	}
	return fmt.Sprintf(", %d failures in a row", failures)
}

// placeReplica places one replica of slot r of replicas (its WORLD_SIZE)
// as part of generation gen, on a node not in avoid when one can take it,
// or says why it cannot. The replica carries its slot's failures in a row;
// its MASTER_PORT is not one of busy (busyPorts) where another is free.
func (e *Evaluator) placeReplica(j *controlpb.Job, r int, replicas int32, gen uint64, failures int32, avoid []string, busy map[string]map[int32]bool) (*fsmpb.Allocation, string) {
	spec := j.Spec
	sj, err := toShardingJob(fmt.Sprintf("%s~%d", j.Id, r), spec)
	if err != nil {
		return nil, err.Error()
	}
	sj.Ranks, sj.MinRanks, sj.Avoid = 1, 0, avoid
	plan, err := e.cluster.Place(sj)
	if err != nil {
		var ue *sharding.UnplaceableError
		if errors.As(err, &ue) {
			return nil, ue.Reason
		}
		return nil, err.Error()
	}
	if err := e.cluster.Apply(plan); err != nil || len(plan.Ranks) != 1 {
		return nil, "the planner contradicted itself"
	}
	pr := plan.Ranks[0]
	a := &fsmpb.Allocation{
		Id:             fmt.Sprintf("%s.%d.%d", j.Id, gen, r),
		JobId:          j.Id,
		Generation:     gen,
		Rank:           int32(r),
		WorldSize:      replicas, // the job's until this plan commits: less when it scales out
		LocalRank:      0,
		LocalWorldSize: 1,
		GroupRank:      0,
		GroupWorldSize: 1,
		NodeId:         pr.NodeID,
		RestartCount:   int32(gen - 1),
		SlotFailures:   failures,
		DesiredStatus:  DesiredRun,
		ClientStatus:   AllocPending,
	}
	for _, g := range pr.GPUs {
		a.Gpus = append(a.Gpus, int32(g))
	}
	if n := e.nodes[pr.NodeID]; n != nil {
		a.NodeName = n.Name
		a.RankAddr = n.RpcAddr
		// A replica is its own torchrun "world" for the environment's
		// sake: MASTER_* name its node.
		a.MasterAddr = hostOf(n.RpcAddr)
		key := masterKey(a.MasterAddr, pr.NodeID)
		a.MasterPort = e.pickPort(key, j.Id, gen, busy[key])
	}
	return a, ""
}
