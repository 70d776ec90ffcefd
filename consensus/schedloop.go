package consensus

import (
	"context"
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
)

// schedLoop is the leader's scheduler loop: it owns time, I/O and the
// wake-up timer around the pure Evaluator. It sleeps until an FSM change
// event (job registered, allocation finished, node joined, left or
// drained, a replica caught up) or the earliest wake-up a decision asked
// for, evaluates the affected jobs in batches, and commits all their plans
// as ONE ApplyPlans log entry per batch.
type schedLoop struct {
	s   *Server
	ctx context.Context
	// queue holds jobs to evaluate; wake holds jobs to evaluate at a time.
	queue map[string]struct{}
	wake  map[string]time.Time
	// ev is the planner view, kept across batches while the state's
	// resource version and the lagging set stay the same (only our own
	// plans were added since, and ev reserved their resources).
	ev         *Evaluator
	evVersion  uint64
	evLagging  uint64
	timer      *time.Timer
	timerArmed bool
}

func newSchedLoop(s *Server, ctx context.Context) *schedLoop {
	return &schedLoop{s: s, ctx: ctx, queue: map[string]struct{}{}, wake: map[string]time.Time{}}
}

func (sl *schedLoop) run() {
	sl.timer = time.NewTimer(time.Hour)
	sl.timer.Stop()
	defer sl.timer.Stop()
	events := sl.s.fsm.events
	for {
		if !sl.s.schedPaused.Load() {
			sl.collect(time.Now())
			for len(sl.queue) > 0 && sl.ctx.Err() == nil {
				sl.processBatch()
				sl.collect(time.Now())
			}
			sl.armTimer(time.Now())
		}
		select {
		case <-sl.ctx.Done():
			return
		case <-events.ch:
		case <-sl.timer.C:
			sl.timerArmed = false
		}
	}
}

// collect moves pending FSM events and due wake-ups into the queue.
func (sl *schedLoop) collect(now time.Time) {
	st := sl.s.fsm.state
	jobs, capacity, every := sl.s.fsm.events.take()
	for _, id := range jobs {
		sl.queue[id] = struct{}{}
	}
	if every || capacity {
		st.mu.RLock()
		for id, j := range st.jobs {
			if JobTerminal(j.Status) {
				continue
			}
			if every || j.Status == JobPending || (isElastic(j.Spec) && j.WorldSize < maxRanks(j.Spec)) {
				sl.queue[id] = struct{}{}
			}
		}
		st.mu.RUnlock()
	}
	for id, t := range sl.wake {
		if !t.After(now) {
			delete(sl.wake, id)
			sl.queue[id] = struct{}{}
		}
	}
}

func (sl *schedLoop) armTimer(now time.Time) {
	var next time.Time
	for _, t := range sl.wake {
		next = earliest(next, t)
	}
	if sl.timerArmed && !sl.timer.Stop() {
		select {
		case <-sl.timer.C:
		default:
		}
	}
	sl.timerArmed = !next.IsZero()
	if sl.timerArmed {
		sl.timer.Reset(max(next.Sub(now), time.Millisecond))
	}
}

// evaluator returns the planner view, rebuilt when resources were freed,
// nodes changed or the lagging set moved.
func (sl *schedLoop) evaluator() (*Evaluator, error) {
	ver := sl.s.fsm.state.resourceVersion()
	lagging, lagVer := sl.s.repl.lagging()
	if sl.ev != nil && sl.evVersion == ver && sl.evLagging == lagVer {
		return sl.ev, nil
	}
	v := sl.s.fsm.state.ClusterView()
	v.Lagging = lagging
	ev, err := NewEvaluator(v, SchedulerConfigFrom(sl.s.cfg))
	if err != nil {
		return nil, err
	}
	sl.ev, sl.evVersion, sl.evLagging = ev.WithLoad(sl.s.loads), ver, lagVer
	return ev, nil
}

func (sl *schedLoop) processBatch() {
	s := sl.s
	st := s.fsm.state
	// Take up to SchedulerBatch jobs, oldest first.
	type qj struct {
		id  string
		idx uint64
	}
	q := make([]qj, 0, len(sl.queue))
	st.mu.RLock()
	for id := range sl.queue {
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
		delete(sl.queue, x.id)
	}
	ev, err := sl.evaluator()
	if err != nil {
		s.logger.Error("scheduler: cannot build the cluster view", "error", err)
		return
	}
	now := time.Now()
	var plans []*fsmpb.JobPlan
	again := map[string]bool{}
	for _, x := range q {
		d := ev.Evaluate(st.Job(x.id), st.Allocations(x.id), now)
		if d.Note != "" && d.Plan != nil {
			s.logger.Info("scheduler: "+d.Note, "job", x.id)
		}
		if !d.WakeAt.IsZero() {
			sl.wake[x.id] = d.WakeAt
		} else {
			delete(sl.wake, x.id)
		}
		if d.Plan != nil {
			plans = append(plans, d.Plan)
			again[x.id] = d.Again
		}
	}
	if len(plans) == 0 {
		return
	}
	resp, _, err := s.apply(sl.ctx, &fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: plans}}})
	if err != nil {
		sl.ev = nil
		if sl.ctx.Err() == nil {
			s.logger.Warn("scheduler: committing plans failed; will retry", "plans", len(plans), "error", err)
			retry := time.Now().Add(100 * time.Millisecond)
			for _, p := range plans {
				sl.wake[p.JobId] = retry
			}
		}
		return
	}
	skipped := map[string]bool{}
	if r, ok := resp.(*PlansResult); ok {
		if len(r.Skipped) > 0 {
			sl.ev = nil // it holds resources of plans that were not applied
		}
		for _, id := range r.Skipped {
			sl.queue[id] = struct{}{}
			skipped[id] = true
		}
	}
	// Applying a plan raises no event of its own: a decision that needs a
	// follow-up (a generation ended) is evaluated again at once. The next
	// evaluation finds nothing new to do unless time or state moved, so
	// this cannot loop.
	for id, a := range again {
		if a && !skipped[id] {
			sl.queue[id] = struct{}{}
		}
	}
}
