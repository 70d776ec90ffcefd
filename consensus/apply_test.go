package consensus

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// A write whose caller gives up returns when its context ends, even though
// its entry is queued and cannot commit (the followers are gone), instead
// of waiting until the leader steps down.
func TestApplyReturnsWhenContextEnds(t *testing.T) {
	tc := MakeTestCluster(t, 3, func(c *Config) {
		// A lease that outlasts the write: the leader keeps leading
		// without its quorum meanwhile, so only the context can end the
		// wait for the commit.
		c.HeartbeatTimeout = 2 * time.Second
		c.ElectionTimeout = 2 * time.Second
		c.LeaderLeaseTimeout = 2 * time.Second
	})
	l := tc.WaitForLeader(20 * time.Second)
	for _, id := range tc.IDs() {
		if id != l.cfg.NodeID {
			tc.Stop(id, false)
		}
	}
	before := l.raft.LastIndex()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	res := make(chan error, 1)
	go func() {
		_, _, err := l.RegisterJob(ctx, &controlpb.JobSpec{Name: "orphan", Type: "exec", Ranks: 1})
		res <- err
	}()
	poll.Until(t, 10*time.Second, func() bool { return l.raft.LastIndex() > before }, "the entry in the leader's log")
	cancel()
	select {
	case err := <-res:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("write cancelled after queueing: got %v, want context.Canceled", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("write cancelled after queueing still waits for its commit")
	}
}
