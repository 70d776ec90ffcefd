package consensus

import (
	"bytes"
	"context"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
)

// viewChanged says whether a view changed after index after, without
// waiting: WaitNode/WaitServices with a context that is already done
// return at once, with nil only when the view has moved.
func viewChanged(t *testing.T, st *StateStore, node string, after uint64) bool {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var err error
	if node == "" {
		_, err = st.WaitServices(ctx, after)
	} else {
		_, err = st.WaitNode(ctx, node, after)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("wait for %q: %v", node, err)
	}
	return err == nil
}

// TestStateStoreViews checks that each change wakes the views it shows
// in, and only those: a node's (its record, its allocations, their jobs)
// and the services' (service jobs and their allocations).
func TestStateStoreViews(t *testing.T) {
	h := newFSMHarness(t)
	st := h.f.State()
	step := func(what string, c *fsmpb.Command, want map[string]bool) {
		t.Helper()
		before := h.idx
		if r := h.apply(c); r != nil {
			if err, ok := r.(error); ok {
				t.Fatalf("%s: %v", what, err)
			}
		}
		for _, v := range []string{"n1", "n2", "n3", ""} {
			if got := viewChanged(t, st, v, before); got != want[v] {
				t.Errorf("%s: view %q changed = %v, want %v", what, v, got, want[v])
			}
		}
	}
	step("nodes n1 n2 n3", nodesCmd(&fsmpb.Node{Id: "n1"}, &fsmpb.Node{Id: "n2"}, &fsmpb.Node{Id: "n3"}),
		map[string]bool{"n1": true, "n2": true, "n3": true})
	step("drain n2", &fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "n2"}}},
		map[string]bool{"n2": true})
	step("register batch job", registerCmd("b", 2), nil)
	plan := func(job string, modify uint64, nodes ...string) *fsmpb.Command {
		p := &fsmpb.JobPlan{JobId: job, ExpectModifyIndex: modify, Status: JobRunning, Generation: 1, WorldSize: int32(len(nodes))}
		for r, n := range nodes {
			p.Allocations = append(p.Allocations, &fsmpb.Allocation{Id: job + "." + n, JobId: job, Generation: 1, Rank: int32(r), NodeId: n})
		}
		return &fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{p}}}}
	}
	step("place batch job on n1, n3", plan("b", h.idx, "n1", "n3"), map[string]bool{"n1": true, "n3": true})
	step("n1 reports running", &fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
		Allocations: []*fsmpb.Allocation{{Id: "b.n1", ClientStatus: AllocRunning}}}}}, map[string]bool{"n1": true})
	step("register service", &fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: "s",
		Spec: &fsmpb.JobSpec{Name: "svc", Type: "service", Ranks: 1}}}}, map[string]bool{"": true})
	step("place service on n2", plan("s", h.idx, "n2"), map[string]bool{"n2": true, "": true})
	step("stop batch job", &fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "b"}}},
		map[string]bool{"n1": true, "n3": true})
	step("purge batch job", &fsmpb.Command{Cmd: &fsmpb.Command_PurgeJobs{PurgeJobs: &fsmpb.PurgeJobs{Ids: []string{"b"}}}},
		map[string]bool{"n1": true, "n3": true})
	if got := st.AllocationsByNode("n1"); len(got) != 0 {
		t.Fatalf("purge left %v on n1", got)
	}

	// A waiter blocks until its own view changes, not another's.
	before := h.idx
	woke := make(chan uint64, 1)
	go func() {
		idx, err := st.WaitNode(t.Context(), "n3", before)
		if err != nil {
			t.Error(err)
		}
		woke <- idx
	}()
	step("drain n1", &fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "n1"}}},
		map[string]bool{"n1": true})
	step("drain n3", &fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "n3"}}},
		map[string]bool{"n3": true})
	select {
	case idx := <-woke:
		if idx != h.idx {
			t.Fatalf("WaitNode(n3) returned index %d, want %d (the drain of n3)", idx, h.idx)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WaitNode(n3) did not wake on n3's drain")
	}

	// A restore changes every view; so does nothing else.
	snap := snapshotBytes(t, h.f)
	g := NewFSM(nil)
	if viewChanged(t, g.State(), "n1", 0) {
		t.Fatal("an empty store reports a change")
	}
	if err := g.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	for _, v := range []string{"n1", "n2", "n9", ""} {
		if !viewChanged(t, g.State(), v, h.idx-1) {
			t.Errorf("view %q unchanged by a restore", v)
		}
		if viewChanged(t, g.State(), v, h.idx) {
			t.Errorf("view %q changed after the restored index", v)
		}
	}
	if _, err := st.WaitNode(t.Context(), "", 0); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("WaitNode without a node: %v, want ErrInvalidArgument", err)
	}
}
