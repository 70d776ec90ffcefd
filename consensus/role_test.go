package consensus

import (
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// Each server hears of every change of its own role and bootstrap state:
// what Role and Bootstrapped read after the last RoleChanged it received is
// what they read now, for the leader, the voters and a standby added later
// (the agent gossips both from this signal, not from a timer).
func TestRoleChangedFollowsRoleAndBootstrap(t *testing.T) {
	tc := NewTestCluster(t, func(c *Config) { c.BootstrapExpect, c.MaxVoters, c.Standbys = 3, 3, 1 })
	type seen struct {
		role string
		boot bool
	}
	var mu sync.Mutex
	last := map[string]seen{}
	var wg sync.WaitGroup
	done := make(chan struct{})
	t.Cleanup(func() { close(done); wg.Wait() })
	ids := []string{"node-0", "node-1", "node-2", "node-3"}
	for _, id := range ids {
		s := tc.Start(id, nil)
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-done:
					return
				case <-s.RoleChanged():
					now := seen{s.Role(), s.Bootstrapped()}
					mu.Lock()
					last[id] = now
					mu.Unlock()
				}
			}
		}()
	}
	for _, id := range ids {
		tc.AnnounceAll(id)
	}
	poll.Until(t, 30*time.Second, func() error {
		roles := map[string]int{}
		for _, id := range ids {
			s := tc.Server(id)
			now := seen{s.Role(), s.Bootstrapped()}
			mu.Lock()
			got := last[id]
			mu.Unlock()
			if got != now {
				return fmt.Errorf("%s: last signalled %+v, now %+v", id, got, now)
			}
			if !now.boot {
				return fmt.Errorf("%s not bootstrapped yet", id)
			}
			roles[now.role]++
		}
		if roles[RoleLeader] != 1 || roles[RoleVoter] != 2 || roles[RoleStandby] != 1 {
			return fmt.Errorf("roles %v", roles)
		}
		return nil
	})
}
