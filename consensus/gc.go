package consensus

import (
	"sort"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
)

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

// gcBatch bounds how many jobs one purge entry names.
const gcBatch = 1000

// collectGarbage purges jobs that ended more than JobGCAge ago, oldest
// first, in entries of at most gcBatch jobs. It runs on the leader.
func (ls *leaderSession) collectGarbage() {
	s := ls.s
	if s.cfg.JobGCAge <= 0 {
		return
	}
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
			return
		}
		s.logger.Debug("purged ended jobs", "jobs", resp, "older_than", s.cfg.JobGCAge)
	}
}
