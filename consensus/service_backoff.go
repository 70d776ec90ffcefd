package consensus

import (
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Crash-loop back-off of service replica slots (Kubernetes'
// CrashLoopBackOff, Nomad's exponential restart delay).
//
// A replica's own end (it exited, failed, or failed to start on its node)
// is one more failure in a row of its slot, unless the replica stayed
// healthy for restart.reset_after before it ended: then the count starts
// again at this failure. After k failures in a row the slot's next replica
// waits restart.delay × 2^(k-1), at most restart.max_delay, from the end.
// An end that is not the replica's fault (lost with its node, stopped by
// the scheduler or its node) neither adds nor resets. A replica of an older
// spec (before a rolling update) does not count toward the current spec's.
//
// Nothing of it lives in a leader's memory: each replica carries its slot's
// count at its placement (Allocation.slot_failures) and the FSM records when
// it was first healthy (Allocation.healthy_time), so any leader derives the
// same count and the same next try from the Raft state.

// CrashLoopAt is the failures in a row from which a replica slot is said to
// crash-loop, wherever the word is used: the job's status reason, `service
// list` and `service status`, `gpumesh dev`, and `job run`, which stops
// watching a new service then. Fewer are failures, replaced with the same
// back-off.
const CrashLoopAt = 3

// backoffPolicy is a service's crash-loop back-off.
type backoffPolicy struct {
	delay      time.Duration // wait after the first failure
	max        time.Duration // cap of the doubling
	resetAfter time.Duration // healthy this long: the count starts again
}

// serviceBackoff returns a service's back-off, with the defaults for the
// fields its spec leaves out.
func serviceBackoff(spec *controlpb.JobSpec) backoffPolicy {
	_, delay := restartPolicy(spec)
	b := backoffPolicy{delay: delay, max: jobspec.DefaultRestartMaxDelay, resetAfter: jobspec.DefaultRestartResetAfter}
	r := spec.GetRestart()
	if r.GetMaxDelay() != nil {
		b.max = r.GetMaxDelay().AsDuration()
	}
	if r.GetResetAfter() != nil {
		b.resetAfter = r.GetResetAfter().AsDuration()
	}
	b.max = max(b.max, b.delay)
	return b
}

// wait is the back-off after failures failures in a row: delay for none
// or one, doubled for each further one, at most max.
func (b backoffPolicy) wait(failures int) time.Duration {
	d := b.delay
	for i := 1; i < failures && d > 0 && d < b.max; i++ {
		d *= 2
	}
	return min(d, b.max)
}

// ownEnd says whether a replica ended on its own: it exited or failed
// (a MASTER_PORT held on its node is the node's fault, not the replica's).
func ownEnd(a *controlpb.Allocation) bool {
	switch a.ClientStatus {
	case AllocComplete:
		return true
	case AllocFailed:
		return a.StartFailure != StartMasterPortBusy
	}
	return false
}

// stayedHealthy says whether a replica was healthy for at least d: from
// its first healthy report to its end (now while it runs).
func stayedHealthy(a *controlpb.Allocation, d time.Duration, now time.Time) bool {
	if a.HealthyTime == nil {
		return false
	}
	end := now
	if AllocTerminal(a.ClientStatus) && a.FinishTime != nil {
		end = a.FinishTime.AsTime()
	}
	return end.Sub(a.HealthyTime.AsTime()) >= d
}

// slotHistory is what the back-off of one replica slot is derived from.
type slotHistory struct {
	newest  *controlpb.Allocation // the slot's replica of the highest generation
	lastEnd time.Time             // the latest end of one of its replicas; zero if none ended
}

// slotHistories returns the history of every slot that had a replica.
func slotHistories(allocs []*controlpb.Allocation) map[int]*slotHistory {
	out := map[int]*slotHistory{}
	for _, a := range allocs {
		r := int(a.Rank)
		h := out[r]
		if h == nil {
			h = &slotHistory{}
			out[r] = h
		}
		if h.newest == nil || a.Generation > h.newest.Generation {
			h.newest = a
		}
		if AllocTerminal(a.ClientStatus) && a.FinishTime != nil && a.FinishTime.AsTime().After(h.lastEnd) {
			h.lastEnd = a.FinishTime.AsTime()
		}
	}
	return out
}

// failures returns the slot's failures in a row: what its next replica
// carries as slot_failures.
func (h *slotHistory) failures(j *controlpb.Job, b backoffPolicy, now time.Time) int {
	a := h.newest
	if a == nil || a.Generation < j.SpecGeneration {
		return 0 // a spec the service no longer runs failed, not this one
	}
	n := int(a.SlotFailures)
	if stayedHealthy(a, b.resetAfter, now) {
		n = 0
	}
	if AllocTerminal(a.ClientStatus) && ownEnd(a) {
		n++
	}
	return n
}

// nextTry is when the slot's next replica may be placed, or the zero time
// when no replica of it ended: the back-off after the latest end when the
// newest replica failed on its own; restart.delay after it otherwise (a
// replica lost with its node, or one being moved, is replaced without a
// crash loop's wait).
func (h *slotHistory) nextTry(failures int, b backoffPolicy) time.Time {
	if h == nil || h.lastEnd.IsZero() {
		return time.Time{}
	}
	if AllocTerminal(h.newest.ClientStatus) && ownEnd(h.newest) {
		return h.lastEnd.Add(b.wait(failures))
	}
	return h.lastEnd.Add(b.delay)
}

// SlotBackoff is the crash-loop back-off of one replica slot of a service.
type SlotBackoff struct {
	// Slot is the replica slot (rank).
	Slot int
	// Failures is the slot's failures in a row (see the file comment).
	Failures int
	// Waiting is true while the slot's newest replica has ended and its
	// successor waits for NextTry.
	Waiting bool
	// NextTry is when the next replica may be placed (set while Waiting).
	NextTry time.Time
	// Delay is the back-off after the last failure.
	Delay time.Duration
	// Last is the slot's newest replica.
	Last *controlpb.Allocation
	// ResetAfter is how long a replica must stay healthy to end the count.
	ResetAfter time.Duration
}

// ServiceBackoffs returns the slots of a service with at least one failure
// in a row, by slot, as the scheduler sees them at now from the job and
// its allocations (Control.GetJob's); nil for a job of another type.
func ServiceBackoffs(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) []SlotBackoff {
	if j.GetSpec().GetType() != jobspec.TypeService {
		return nil
	}
	b := serviceBackoff(j.Spec)
	hist := slotHistories(allocs)
	slots := make([]int, 0, len(hist))
	for r := range hist {
		if r < int(j.WorldSize) {
			slots = append(slots, r) // a higher slot was scaled away
		}
	}
	sort.Ints(slots)
	var out []SlotBackoff
	for _, r := range slots {
		h := hist[r]
		n := h.failures(j, b, now)
		if n == 0 {
			continue
		}
		sb := SlotBackoff{Slot: r, Failures: n, Delay: b.wait(n), Last: h.newest, ResetAfter: b.resetAfter}
		if AllocTerminal(h.newest.ClientStatus) {
			if next := h.nextTry(n, b); now.Before(next) {
				sb.Waiting, sb.NextTry = true, next
			}
		}
		out = append(out, sb)
	}
	return out
}
