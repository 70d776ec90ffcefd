package node

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// fakeRaft is a raftServer whose role the test sets; the methods it does
// not define belong to the nil embedded interface and panic if called.
type fakeRaft struct {
	raftServer
	mu      sync.Mutex
	role    string
	boot    bool
	changed chan struct{}
}

var _ raftServer = (*fakeRaft)(nil)

func (f *fakeRaft) set(role string, boot bool) {
	f.mu.Lock()
	f.role, f.boot = role, boot
	f.mu.Unlock()
	select {
	case f.changed <- struct{}{}:
	default:
	}
}

func (f *fakeRaft) Role() string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.role
}

func (f *fakeRaft) Bootstrapped() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.boot
}

func (f *fakeRaft) IsLeader() bool               { return f.Role() == consensus.RoleLeader }
func (f *fakeRaft) RoleChanged() <-chan struct{} { return f.changed }

// fakeMesh is a membership that records what the agent gossips about
// itself; the rest belongs to the nil embedded interface.
type fakeMesh struct {
	membership
	mu   sync.Mutex
	role string
	boot bool
}

var _ membership = (*fakeMesh)(nil)

func (m *fakeMesh) SetRole(r string)       { m.mu.Lock(); m.role = r; m.mu.Unlock() }
func (m *fakeMesh) SetBootstrapped(b bool) { m.mu.Lock(); m.boot = b; m.mu.Unlock() }

func (m *fakeMesh) gossiped(role string, boot bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.role != role || m.boot != boot {
		return fmt.Errorf("gossiped role %q bootstrapped %v, want %q %v", m.role, m.boot, role, boot)
	}
	return nil
}

// The agent gossips its role and bootstrap state, and runs its leader task
// only while it leads, each time consensus signals a change (no timer).
func TestRoleLoopFollowsConsensus(t *testing.T) {
	r := &fakeRaft{role: consensus.RoleNone, changed: make(chan struct{}, 1)}
	m := &fakeMesh{}
	a := &Agent{cfg: &Config{}, logger: hclog.NewNullLogger(), raft: r, mesh: m}
	a.ctx, a.cancel = context.WithCancel(context.Background())
	var leading sync.Map // run number → still running
	runs := 0
	a.onLeader = func(ctx context.Context) {
		runs++
		n := runs
		leading.Store(n, true)
		<-ctx.Done()
		leading.Store(n, false)
	}
	a.goFunc(a.roleLoop)
	t.Cleanup(func() { a.cancel(); a.stopLeaderHooks(); a.wg.Wait() })
	running := func(want int) error {
		got := 0
		leading.Range(func(_, v any) bool {
			if v.(bool) {
				got++
			}
			return true
		})
		if got != want {
			return fmt.Errorf("%d leader tasks running, want %d", got, want)
		}
		return nil
	}

	poll.Until(t, 5*time.Second, func() error { return m.gossiped("client", false) })
	for _, step := range []struct {
		role    string
		boot    bool
		gossip  string
		leading int
	}{
		{consensus.RoleVoter, false, "voter", 0},
		{consensus.RoleVoter, true, "voter", 0},
		{consensus.RoleLeader, true, "leader", 1},
		{consensus.RoleStandby, true, "standby", 0},
		{consensus.RoleLeader, true, "leader", 1},
	} {
		r.set(step.role, step.boot)
		poll.Until(t, 5*time.Second, func() error {
			if err := m.gossiped(step.gossip, step.boot); err != nil {
				return err
			}
			return running(step.leading)
		}, step.role)
	}
}
