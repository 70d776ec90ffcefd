package mesh

import (
	"context"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// After a join, and again whenever the node's incarnation grows (a
// refutation or a metadata update), the node runs a round of syncs.
func TestSyncAfterJoinAndIncarnationBump(t *testing.T) {
	var ms []*Mesh
	for _, name := range []string{"x", "y"} {
		c := DefaultLocalConfig()
		c.NodeName, c.NodeID = name, "id-"+name
		m, err := New(c)
		if err != nil {
			t.Fatal(err)
		}
		defer m.Shutdown()
		ms = append(ms, m)
	}
	x, y := ms[0], ms[1]
	if _, err := y.Join(context.Background(), []string{x.Addr()}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 20*time.Second, y.syncing.Load, "the post-join syncs to start")
	poll.Until(t, 20*time.Second, func() bool { return !y.syncing.Load() }, "the post-join syncs to end")
	if x.syncing.Load() {
		t.Fatal("x syncs although it neither joined nor changed")
	}
	if err := x.UpdateMeta(func(m *Meta) { m.Role = RoleVoter }); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 20*time.Second, x.syncing.Load, "syncs after x's incarnation grew")
}
