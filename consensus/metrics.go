package consensus

import (
	"strconv"
	"sync/atomic"
	"time"

	"github.com/hashicorp/raft"
)

// RaftStats is a cheap snapshot of this server's Raft state, for metrics.
type RaftStats struct {
	// State is Leader, Follower, Candidate or Shutdown.
	State string
	// Term is the current term.
	Term uint64
	// CommitIndex and AppliedIndex are the last committed and the last
	// applied log index; LastLogIndex the last index in the local log.
	CommitIndex, AppliedIndex, LastLogIndex uint64
	// LastContact is how long ago this server heard from the leader (zero
	// on the leader; negative when it never has).
	LastContact time.Duration
	// FSMPending is the number of committed entries waiting to be applied.
	FSMPending uint64
	// Voters and NonVoters count the servers in the latest configuration.
	Voters, NonVoters int
}

// RaftStats reads raft's own statistics. Safe for concurrent use; it does
// not block on the Raft loop.
func (s *Server) RaftStats() RaftStats {
	st := s.raft.Stats()
	u := func(k string) uint64 {
		v, _ := strconv.ParseUint(st[k], 10, 64)
		return v
	}
	out := RaftStats{
		State:        s.raft.State().String(),
		Term:         u("term"),
		CommitIndex:  u("commit_index"),
		AppliedIndex: u("applied_index"),
		LastLogIndex: u("last_log_index"),
		FSMPending:   u("fsm_pending"),
	}
	switch lc := st["last_contact"]; lc {
	case "never":
		out.LastContact = -1
	case "0", "":
	default:
		if d, err := time.ParseDuration(lc); err == nil {
			out.LastContact = d
		}
	}
	if s.raft.State() == raft.Leader {
		out.LastContact = 0
	}
	out.Voters = int(u("num_peers"))
	if f := s.raft.GetConfiguration(); f.Error() == nil {
		out.Voters = 0
		for _, srv := range f.Configuration().Servers {
			if srv.Suffrage == raft.Voter {
				out.Voters++
			} else {
				out.NonVoters++
			}
		}
	}
	return out
}

// LeaderChangeCounter counts the leader changes this server observes (a
// new, non-empty leader), from the moment it is created until Close.
type LeaderChangeCounter struct {
	r     *raft.Raft
	obs   *raft.Observer
	count atomic.Uint64
	last  atomic.Int64 // unix nanoseconds of the last change
}

// CountLeaderChanges starts counting leader changes. The observer's filter
// does the counting, so no goroutine is needed and nothing is ever queued.
func (s *Server) CountLeaderChanges() *LeaderChangeCounter {
	c := &LeaderChangeCounter{r: s.raft}
	c.obs = raft.NewObserver(nil, false, func(o *raft.Observation) bool {
		if lo, ok := o.Data.(raft.LeaderObservation); ok && lo.LeaderID != "" {
			c.last.Store(time.Now().UnixNano())
			c.count.Add(1)
		}
		return false
	})
	s.raft.RegisterObserver(c.obs)
	return c
}

// Count is the number of leader changes seen so far.
func (c *LeaderChangeCounter) Count() uint64 { return c.count.Load() }

// LastChange is when the last leader change was observed (zero if none).
func (c *LeaderChangeCounter) LastChange() time.Time {
	if n := c.last.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Close stops counting.
func (c *LeaderChangeCounter) Close() { c.r.DeregisterObserver(c.obs) }
