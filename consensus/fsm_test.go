package consensus

import (
	"bytes"
	"errors"
	"io"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
)

var t0 = time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)

type fsmHarness struct {
	t   *testing.T
	f   *FSM
	idx uint64
	log []*raft.Log
}

func newFSMHarness(t *testing.T) *fsmHarness { return &fsmHarness{t: t, f: NewFSM(nil)} }

func (h *fsmHarness) apply(c *fsmpb.Command) any {
	h.t.Helper()
	h.idx++
	data, err := encodeCommand(t0.Add(time.Duration(h.idx)*time.Second), c)
	if err != nil {
		h.t.Fatal(err)
	}
	l := &raft.Log{Index: h.idx, Term: 1, Type: raft.LogCommand, Data: data}
	h.log = append(h.log, l)
	return h.f.Apply(l)
}

func registerCmd(id string, ranks int32) *fsmpb.Command {
	return &fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: &controlpb.JobSpec{Name: "j", Type: "exec", Ranks: ranks}}}}
}

func nodesCmd(ns ...*controlpb.Node) *fsmpb.Command {
	return &fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: ns}}}
}

func TestFSMApplyLifecycle(t *testing.T) {
	h := newFSMHarness(t)
	st := h.f.State()
	if r := h.apply(nodesCmd(&controlpb.Node{Id: "n1", Name: "one"}, &controlpb.Node{Id: "n2", Name: "two"})); r != nil {
		t.Fatalf("upsert nodes: %v", r)
	}
	if n := st.NodeByName("two"); n == nil || n.Id != "n2" || n.Status != NodeReady || n.CreateIndex != 1 {
		t.Fatalf("node two = %v", n)
	}
	if r := h.apply(registerCmd("job-a", 2)); r != "job-a" {
		t.Fatalf("register response %v", r)
	}
	if r := h.apply(registerCmd("job-a", 2)); !errors.Is(r.(error), ErrJobExists) {
		t.Fatalf("duplicate id: got %v, want ErrJobExists", r)
	}
	j := st.Job("job-a")
	if j.Status != JobPending || j.CreateIndex != 2 || !j.SubmitTime.AsTime().Equal(t0.Add(2*time.Second)) {
		t.Fatalf("job = %v", j)
	}
	// A plan computed from the job's current modify index applies.
	plan := &fsmpb.JobPlan{JobId: "job-a", ExpectModifyIndex: j.ModifyIndex, Status: JobRunning, Generation: 1, WorldSize: 2,
		Allocations: []*controlpb.Allocation{
			{Id: "job-a.1.0", JobId: "job-a", Generation: 1, Rank: 0, NodeId: "n1"},
			{Id: "job-a.1.1", JobId: "job-a", Generation: 1, Rank: 1, NodeId: "n2"},
		}}
	r := h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{plan}}}})
	if pr := r.(*PlansResult); pr.Applied != 1 || len(pr.Skipped) != 0 {
		t.Fatalf("plans result %+v", pr)
	}
	if j := st.Job("job-a"); j.Status != JobRunning || j.Generation != 1 {
		t.Fatalf("job after plan = %v", j)
	}
	if a := st.Allocations("job-a"); len(a) != 2 || a[0].DesiredStatus != DesiredRun || a[1].ClientStatus != AllocPending {
		t.Fatalf("allocs = %v", a)
	}
	// The same (now stale) plan is skipped.
	r = h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{plan}}}})
	if pr := r.(*PlansResult); pr.Applied != 0 || len(pr.Skipped) != 1 {
		t.Fatalf("stale plan result %+v", pr)
	}
	// Client reports.
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{Allocations: []*controlpb.Allocation{
		{Id: "job-a.1.0", ClientStatus: AllocRunning},
		{Id: "job-a.1.1", ClientStatus: AllocFailed, ExitCode: 3, Message: "boom"},
		{Id: "nope", ClientStatus: AllocRunning},
	}}}})
	a1 := st.Allocation("job-a.1.1")
	if a1.ClientStatus != AllocFailed || a1.ExitCode != 3 || a1.FinishTime == nil {
		t.Fatalf("alloc 1 = %v", a1)
	}
	// A final allocation ignores later reports.
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{Allocations: []*controlpb.Allocation{{Id: "job-a.1.1", ClientStatus: AllocRunning}}}}})
	if st.Allocation("job-a.1.1").ClientStatus != AllocFailed {
		t.Fatal("final allocation changed by a late report")
	}
	if got := st.AllocationsByNode("n2"); len(got) != 1 || got[0].Id != "job-a.1.1" {
		t.Fatalf("allocs by node = %v", got)
	}
	// Drain.
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "n2", Reason: "spot"}}})
	if n := st.Node("n2"); n.Status != NodeDraining || n.StatusReason != "spot" {
		t.Fatalf("drained node = %v", n)
	}
	if r := h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: "zz"}}}); !errors.Is(r.(error), ErrNodeNotFound) {
		t.Fatalf("drain unknown: %v", r)
	}
	// Stop.
	if r := h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "job-a"}}}); r != nil {
		t.Fatalf("stop: %v", r)
	}
	if j := st.Job("job-a"); j.Status != JobStopped || !j.StopRequested {
		t.Fatalf("stopped job = %v", j)
	}
	for _, a := range st.Allocations("job-a") {
		if a.DesiredStatus != DesiredStop {
			t.Fatalf("alloc %s desired %s after stop", a.Id, a.DesiredStatus)
		}
	}
	if st.Index() != h.idx {
		t.Fatalf("index %d, want %d", st.Index(), h.idx)
	}
	if r := h.f.Apply(&raft.Log{Index: h.idx + 1, Type: raft.LogCommand, Data: []byte{0xff, 0xff}}); !errors.Is(r.(error), ErrInvalidCommand) {
		t.Fatalf("garbage entry: %v", r)
	}
}

type memSink struct {
	bytes.Buffer
	cancelled bool
}

func (m *memSink) ID() string    { return "mem" }
func (m *memSink) Cancel() error { m.cancelled = true; return nil }
func (m *memSink) Close() error  { return nil }

func snapshotBytes(t *testing.T, f *FSM) []byte {
	t.Helper()
	snap, err := f.Snapshot()
	if err != nil {
		t.Fatal(err)
	}
	var sink memSink
	if err := snap.Persist(&sink); err != nil {
		t.Fatal(err)
	}
	snap.Release()
	return sink.Bytes()
}

func TestFSMSnapshotRestoreAndDeterminism(t *testing.T) {
	h := newFSMHarness(t)
	h.apply(nodesCmd(&controlpb.Node{Id: "n1", Name: "one", Gpus: []*controlpb.GPU{{Index: 0, Model: "H100"}}}))
	for _, id := range []string{"a-1", "b-2", "c-3"} {
		h.apply(registerCmd(id, 1))
	}
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{
		{JobId: "a-1", ExpectModifyIndex: 2, Status: JobRunning, Generation: 1, WorldSize: 1,
			Allocations: []*controlpb.Allocation{{Id: "a-1.1.0", JobId: "a-1", Generation: 1, NodeId: "n1", Gpus: []int32{0}}}},
	}}}})
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "c-3"}}})
	want := snapshotBytes(t, h.f)

	// Restore into a fresh FSM gives the same state.
	g := NewFSM(nil)
	if err := g.Restore(io.NopCloser(bytes.NewReader(want))); err != nil {
		t.Fatal(err)
	}
	if got := snapshotBytes(t, g); !bytes.Equal(got, want) {
		t.Fatal("restored snapshot differs from the original")
	}
	if g.State().Index() != h.idx || g.State().Job("a-1").Status != JobRunning || len(g.State().AllocationsByNode("n1")) != 1 {
		t.Fatal("restored state is missing content")
	}
	// Replaying the same log on another FSM gives byte-identical state.
	k := NewFSM(nil)
	k.ApplyBatch(h.log)
	if got := snapshotBytes(t, k); !bytes.Equal(got, want) {
		t.Fatal("replay of the same log is not deterministic")
	}
	// Returned objects are not modified by later applies (immutability).
	j := h.f.State().Job("b-2")
	before := proto.Clone(j)
	h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "b-2"}}})
	if !proto.Equal(before, j) {
		t.Fatal("an object handed out by the store was modified in place")
	}
}

func TestStateStoreWaitIndex(t *testing.T) {
	h := newFSMHarness(t)
	st := h.f.State()
	done := make(chan uint64)
	go func() {
		idx, _ := st.WaitIndex(t.Context(), 0)
		done <- idx
	}()
	h.apply(registerCmd("x-1", 1))
	select {
	case idx := <-done:
		if idx != 1 {
			t.Fatalf("WaitIndex returned %d", idx)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("WaitIndex did not wake")
	}
	ctx, cancel := contextWithTimeout(20 * time.Millisecond)
	defer cancel()
	if _, err := st.WaitIndex(ctx, 1); err == nil {
		t.Fatal("WaitIndex past the index should time out")
	}
}

func TestBootstrapSetOrder(t *testing.T) {
	ms := []Member{
		{ID: "d", Server: true, State: MemberAlive, RaftAddr: "x", Lifecycle: LifecycleSpot},
		{ID: "c", Server: true, State: MemberAlive, RaftAddr: "x", Lifecycle: LifecycleOnDemand},
		{ID: "b", Server: false, State: MemberAlive, RaftAddr: "x", Lifecycle: LifecycleOnDemand},
		{ID: "a", Server: true, State: MemberAlive, RaftAddr: "x", Lifecycle: LifecycleSpot},
		{ID: "e", Server: true, State: MemberDead, RaftAddr: "x", Lifecycle: LifecycleOnDemand},
	}
	if got := BootstrapSet(ms, 4); got != nil {
		t.Fatalf("only 3 eligible, got %v", idsOf(got))
	}
	got := idsOf(BootstrapSet(ms, 2))
	if len(got) != 2 || got[0] != "c" || got[1] != "a" {
		t.Fatalf("bootstrap set %v, want [c a]", got)
	}
	// Order of the input does not matter.
	rev := []Member{ms[4], ms[3], ms[2], ms[1], ms[0]}
	if got2 := idsOf(BootstrapSet(rev, 2)); got2[0] != got[0] || got2[1] != got[1] {
		t.Fatalf("order dependent: %v vs %v", got, got2)
	}
}

func TestConfigValidate(t *testing.T) {
	ok := DefaultConfig()
	ok.NodeID, ok.DataDir, ok.Membership = "n", "/tmp/x", NewFakeMembership()
	if err := ok.Validate(); err != nil {
		t.Fatalf("valid config: %v", err)
	}
	for name, mut := range map[string]func(*Config){
		"no id":        func(c *Config) { c.NodeID = "" },
		"even voters":  func(c *Config) { c.MaxVoters = 4 },
		"six voters":   func(c *Config) { c.MaxVoters = 7 },
		"expect>max":   func(c *Config) { c.BootstrapExpect = 5 },
		"lease":        func(c *Config) { c.LeaderLeaseTimeout = time.Second },
		"bad bind":     func(c *Config) { c.RaftBindAddr = "nope" },
		"unspecified":  func(c *Config) { c.RaftAdvertiseAddr = "0.0.0.0:7948" },
		"no members":   func(c *Config) { c.Membership = nil },
		"port range":   func(c *Config) { c.MasterPortMin = 30000; c.MasterPortMax = 20000 },
		"election<hb":  func(c *Config) { c.ElectionTimeout = time.Millisecond },
		"zero cleanup": func(c *Config) { c.DeadServerCleanup = 0 },
	} {
		c := *ok
		mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("%s: got %v, want ErrInvalidConfig", name, err)
		}
	}
}

func TestNewJobID(t *testing.T) {
	a, b := NewJobID("My Job!"), NewJobID("My Job!")
	if a == b || len(a) != len("my-job-")+8 || a[:7] != "my-job-" {
		t.Errorf("job ids %q %q", a, b)
	}
	if id := NewJobID(""); id[:4] != "job-" {
		t.Errorf("empty name id %q", id)
	}
}
