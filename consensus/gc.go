package consensus

import (
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// Garbage collection of the replicated state. The leader decides what goes
// (collectGarbage, every Config.JobGCInterval) and writes it as log
// entries; the FSM applies them like any other entry, so every server
// drops the same objects.
//
//   - Jobs: a job that ended (complete, failed or stopped) more than
//     Config.JobGCAge ago goes with all its allocations (PurgeJobs).
//   - Allocations of a job that has not ended (PurgeAllocations): a
//     service that crash-loops, is updated or moved, or an exec job that
//     restarts, adds allocations for as long as it lives. Each rank (a
//     service's replica slot) keeps every allocation that has not ended,
//     every one of the job's current generation, its newest ended one and
//     the one that ended last (what the scheduler reads: the crash-loop
//     back-off's slot_failures and healthy_time, the restart delay's last
//     end, see slotHistories), and its newest Config.AllocGCKeep ended ones
//     for people (job status, the checkpoint line); of these last, one
//     that ended more than JobGCAge ago goes too. Everything older goes.
//     The rule is monotonic (an allocation it lets go never becomes one it
//     keeps: ended is final, and newer ones only add), so a purge decided
//     on a slightly old state is still right when applied.

// purgeJobs removes ended jobs and their allocations (job garbage
// collection). The caller holds the state lock, as for every apply.
func (f *FSM) purgeJobs(idx uint64, ids []string) any {
	st := f.state
	purged := 0
	for _, id := range ids {
		j := st.jobs[id]
		if j == nil || !JobTerminal(j.Status) {
			continue
		}
		st.jobChangedLocked(j)
		for aid, a := range st.allocsByJob[id] {
			delete(st.allocs, aid)
			if bn := st.allocsByNode[a.NodeId]; bn != nil {
				delete(bn, aid)
				if len(bn) == 0 {
					delete(st.allocsByNode, a.NodeId)
				}
			}
		}
		delete(st.allocsByJob, id)
		delete(st.jobs, id)
		purged++
	}
	if purged > 0 {
		st.resVersion++
	}
	return purged
}

// purgeAllocations removes the allocations named that allocPurgeable lets
// go and returns how many it removed. They hold no resources, so the
// planner's view stays valid; no job changes, so no plan in flight is
// skipped.
func (f *FSM) purgeAllocations(ids []string) any {
	st := f.state
	purged := 0
	for _, id := range ids {
		a := st.allocs[id]
		if a == nil {
			continue
		}
		if j := st.jobs[a.JobId]; j == nil || !allocPurgeable(j, a) {
			continue
		}
		st.removeAllocLocked(a)
		purged++
	}
	return purged
}

// allocPurgeable is what the FSM checks before it removes an allocation of
// a job: ended (client status final), told to stop, and of a generation
// before the job's current one. The leader's rule (allocsToPurge) chooses
// among these.
func allocPurgeable(j *controlpb.Job, a *controlpb.Allocation) bool {
	return AllocTerminal(a.ClientStatus) && a.DesiredStatus == DesiredStop && a.Generation < j.Generation
}

// allocsToPurge returns, sorted, the IDs of the allocations of job j
// (allocs: all of them) that the retention rule above lets go at now: keep
// is Config.AllocGCKeep (zero: none goes) and maxAge Config.JobGCAge (zero:
// no age limit). Nothing goes for a job that ended (PurgeJobs takes it
// whole). It is a pure function of its arguments.
func allocsToPurge(j *controlpb.Job, allocs []*controlpb.Allocation, keep int, maxAge time.Duration, now time.Time) []string {
	if j == nil || keep <= 0 || JobTerminal(j.Status) {
		return nil
	}
	ended := map[int32][]*controlpb.Allocation{}
	for _, a := range allocs {
		if AllocTerminal(a.ClientStatus) {
			ended[a.Rank] = append(ended[a.Rank], a)
		}
	}
	var cutoff time.Time
	if maxAge > 0 {
		cutoff = now.Add(-maxAge)
	}
	var out []string
	for _, as := range ended {
		// Newest generation first; IDs break ties (a slot holds one
		// allocation per generation, but the order must not depend on the
		// map's).
		sort.Slice(as, func(i, k int) bool {
			if as[i].Generation != as[k].Generation {
				return as[i].Generation > as[k].Generation
			}
			return as[i].Id > as[k].Id
		})
		last := lastEnded(as)
		for i, a := range as {
			switch {
			case i == 0 || a == last || !allocPurgeable(j, a):
				continue // the scheduler reads it, or it has not ended for it
			case i < keep && (cutoff.IsZero() || a.FinishTime == nil || !a.FinishTime.AsTime().Before(cutoff)):
				continue // recent history
			}
			out = append(out, a.Id)
		}
	}
	sort.Strings(out)
	return out
}

// lastEnded returns the allocation of as with the latest finish time (the
// first such in as's order), or nil when none has one.
func lastEnded(as []*controlpb.Allocation) *controlpb.Allocation {
	var last *controlpb.Allocation
	for _, a := range as {
		if a.FinishTime != nil && (last == nil || a.FinishTime.AsTime().After(last.FinishTime.AsTime())) {
			last = a
		}
	}
	return last
}

// gcBatch bounds how many jobs or allocations one purge entry names.
const gcBatch = 1000

// gcEnabled says whether the leader runs collectGarbage at all.
func gcEnabled(c *Config) bool {
	return c.JobGCInterval > 0 && (c.JobGCAge > 0 || c.AllocGCKeep > 0)
}

// collectGarbage purges ended jobs and the ended allocations of live jobs
// that the rules above let go. It runs on the leader.
func (ls *leaderSession) collectGarbage() {
	if ls.s.cfg.JobGCAge > 0 && !ls.collectJobs() {
		return
	}
	if ls.s.cfg.AllocGCKeep > 0 {
		ls.collectAllocations()
	}
}

// collectJobs purges jobs that ended more than JobGCAge ago, oldest
// first, in entries of at most gcBatch jobs. It returns false when an
// entry failed (the next round tries again).
func (ls *leaderSession) collectJobs() bool {
	s := ls.s
	cutoff := time.Now().Add(-s.cfg.JobGCAge)
	st := s.fsm.state
	type old struct {
		id string
		at time.Time
	}
	var olds []old
	st.mu.RLock()
	for id, j := range st.jobs {
		if !JobTerminal(j.Status) || j.StatusTime == nil {
			continue
		}
		if at := j.StatusTime.AsTime(); at.Before(cutoff) {
			olds = append(olds, old{id, at})
		}
	}
	st.mu.RUnlock()
	sort.Slice(olds, func(i, k int) bool { return olds[i].at.Before(olds[k].at) })
	for len(olds) > 0 && ls.ctx.Err() == nil {
		n := min(len(olds), gcBatch)
		ids := make([]string, n)
		for i := range ids {
			ids[i] = olds[i].id
		}
		olds = olds[n:]
		resp, _, err := s.apply(ls.ctx, &fsmpb.Command{Cmd: &fsmpb.Command_PurgeJobs{PurgeJobs: &fsmpb.PurgeJobs{Ids: ids}}})
		if err != nil {
			s.logger.Warn("job garbage collection failed; will retry", "error", err)
			return false
		}
		s.logger.Debug("purged ended jobs", "jobs", resp, "older_than", s.cfg.JobGCAge)
	}
	return true
}

// collectAllocations purges the ended allocations of live jobs that
// allocsToPurge lets go, in entries of at most gcBatch allocations.
func (ls *leaderSession) collectAllocations() {
	s := ls.s
	st := s.fsm.state
	now := time.Now()
	var ids []string
	st.mu.RLock()
	for id, j := range st.jobs {
		if !JobTerminal(j.Status) {
			ids = append(ids, allocsToPurge(j, collect(st.allocsByJob[id]), s.cfg.AllocGCKeep, s.cfg.JobGCAge, now)...)
		}
	}
	st.mu.RUnlock()
	sort.Strings(ids)
	for len(ids) > 0 && ls.ctx.Err() == nil {
		n := min(len(ids), gcBatch)
		batch := ids[:n:n]
		ids = ids[n:]
		resp, _, err := s.apply(ls.ctx, &fsmpb.Command{Cmd: &fsmpb.Command_PurgeAllocations{PurgeAllocations: &fsmpb.PurgeAllocations{Ids: batch}}})
		if err != nil {
			s.logger.Warn("allocation garbage collection failed; will retry", "error", err)
			return
		}
		s.logger.Debug("purged ended allocations of live jobs", "allocations", resp, "keep", s.cfg.AllocGCKeep)
	}
}
