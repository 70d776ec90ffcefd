package node

import (
	"context"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// watchEvents runs watchState in the background and hands its views over
// a channel; it stops with the test.
func watchEvents(t *testing.T, st stateReader, req *pb.WatchRequest, refresh time.Duration) <-chan *pb.WatchEvent {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ch := make(chan *pb.WatchEvent, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = watchState(ctx, st, req, refresh, func(ev *pb.WatchEvent) error {
			select {
			case ch <- ev:
			case <-ctx.Done():
			}
			return nil
		})
	}()
	t.Cleanup(func() { cancel(); <-done })
	return ch
}

func nextEvent(t *testing.T, ch <-chan *pb.WatchEvent) *pb.WatchEvent {
	t.Helper()
	select {
	case ev := <-ch:
		return ev
	case <-time.After(20 * time.Second):
		t.Fatal("no watch event")
		return nil
	}
}

// A node's watch stream sends a view when that node's view changes, not
// when another node's does, and again after the refresh interval.
func TestWatchStateFollowsOneNode(t *testing.T) {
	tc := consensus.MakeTestCluster(t, 1, single)
	for _, id := range []string{"n1", "n2"} {
		tc.AddClient(&pb.Node{Id: id, Name: id, RpcAddr: "127.0.0.1:1"})
	}
	leader := tc.WaitForLeader(20 * time.Second)
	st := leader.State()
	consensus.WaitFor(t, 20*time.Second, func() (bool, string) {
		return st.Node("n1") != nil && st.Node("n2") != nil, "clients not registered yet"
	})
	ch := watchEvents(t, st, &pb.WatchRequest{NodeId: "n1"}, time.Hour)
	first := nextEvent(t, ch)
	if len(first.Nodes) != 1 || first.Nodes[0].Id != "n1" || first.Nodes[0].Status != consensus.NodeReady || first.Index == 0 {
		t.Fatalf("first view = %v", first)
	}
	ctx := t.Context()
	if _, err := leader.DrainNode(ctx, "n2", time.Now().Add(time.Hour), "test"); err != nil {
		t.Fatal(err)
	}
	idx, err := leader.DrainNode(ctx, "n1", time.Now().Add(time.Hour), "test")
	if err != nil {
		t.Fatal(err)
	}
	// Had n2's drain sent a view, it would show n1 still ready.
	ev := nextEvent(t, ch)
	if len(ev.Nodes) != 1 || ev.Nodes[0].Status != consensus.NodeDraining || ev.Index < idx {
		t.Fatalf("view after the drains = %v (n1 drained at index %d)", ev, idx)
	}

	// With a short refresh, views come again without a change.
	rch := watchEvents(t, st, &pb.WatchRequest{NodeId: "n2", AfterIndex: st.Index()}, time.Millisecond)
	if ev := nextEvent(t, rch); len(ev.Nodes) != 1 || ev.Nodes[0].Id != "n2" {
		t.Fatalf("refreshed view = %v", ev)
	}
}

// A services watch sends service jobs and their allocations only, when
// one of them changes; a service that ends leaves the view.
func TestWatchStateServices(t *testing.T) {
	tc := consensus.MakeTestCluster(t, 1, single)
	leader := tc.WaitForLeader(20 * time.Second)
	st := leader.State()
	ch := watchEvents(t, st, &pb.WatchRequest{Services: true}, time.Hour)
	if ev := nextEvent(t, ch); len(ev.Jobs) != 0 || len(ev.Allocations) != 0 {
		t.Fatalf("first view of an empty cluster = %v", ev)
	}
	spec, err := jobspec.Parse([]byte("name: web\ntype: service\nreplicas: 1\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := t.Context()
	svc, _, err := leader.RegisterJob(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	batch := &pb.JobSpec{Name: "batch", Type: "exec", Ranks: 1, Exec: &pb.ExecSpec{Command: []string{"true"}}}
	if _, _, err := leader.RegisterJob(ctx, batch); err != nil {
		t.Fatal(err)
	}
	if _, err := leader.StopJob(ctx, svc); err != nil {
		t.Fatal(err)
	}
	sawService := false
	for {
		ev := nextEvent(t, ch)
		for _, j := range ev.Jobs {
			if j.Id != svc {
				t.Fatalf("services view holds job %s (%s)", j.Id, j.Spec.GetType())
			}
			sawService = true
		}
		for _, a := range ev.Allocations {
			if a.JobId != svc {
				t.Fatalf("services view holds allocation %s", a.Id)
			}
		}
		if len(ev.Jobs) == 0 && sawService {
			break // the stopped service has left the view
		}
	}
}

// single makes a one-server test cluster bootstrap on its own.
func single(c *consensus.Config) { c.BootstrapExpect, c.MaxVoters = 1, 1 }
