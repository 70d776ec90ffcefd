package consensus

import (
	"fmt"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

func TestRaftStatsAndLeaderChanges(t *testing.T) {
	tc := MakeTestCluster(t, 3, nil)
	leader := tc.Leader()
	poll.Until(t, 10*time.Second, func() (bool, string) {
		st := leader.RaftStats()
		ok := st.State == "Leader" && st.Term >= 1 && st.CommitIndex >= 1 && st.AppliedIndex >= 1 && st.LastContact == 0
		return ok, fmt.Sprintf("leader stats %+v", st)
	})
	counters := map[string]*LeaderChangeCounter{}
	for _, id := range tc.IDs() {
		s := tc.Server(id)
		if s != leader {
			// Right after an election a follower may not have heard from
			// the leader yet (still a candidate, no contact): wait for it.
			poll.Until(t, 10*time.Second, func() (bool, string) {
				fs := s.RaftStats()
				ok := fs.State == "Follower" && fs.LastContact >= 0 && fs.LastContact <= 5*time.Second
				return ok, fmt.Sprintf("follower %s stats %+v", id, fs)
			})
			counters[id] = s.CountLeaderChanges()
		}
	}
	poll.Until(t, 10*time.Second, func() (bool, string) {
		v := leader.RaftStats().Voters
		return v == 3, fmt.Sprintf("voters %d", v)
	})
	for _, c := range counters {
		if c.Count() != 0 {
			t.Fatalf("leader changes counted without a change: %d", c.Count())
		}
	}
	var old string
	for _, id := range tc.IDs() {
		if tc.Server(id) == leader {
			old = id
		}
	}
	tc.Stop(old, true)
	poll.Until(t, 15*time.Second, func() (bool, string) {
		for id, c := range counters {
			if c.Count() < 1 {
				return false, id + " has not counted the new leader"
			}
		}
		return true, ""
	})
	for _, c := range counters {
		c.Close()
		c.Close() // idempotent
	}
}
