package consensus

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// twoGPUNodes adds nodes with two GPUs each to the sim.
func (s *sim) twoGPUNodes(ids ...string) {
	var ns []*fsmpb.Node
	for i, id := range ids {
		ns = append(ns, &fsmpb.Node{Id: id, Name: id, RpcAddr: fmt.Sprintf("10.0.1.%d:7947", i+1), Status: NodeReady, MaxRanks: 8,
			Gpus: []*fsmpb.GPU{{Index: 0, Model: "H100", MemoryBytes: 80 << 30}, {Index: 1, Model: "H100", MemoryBytes: 80 << 30}}})
	}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: ns}}})
}

func sharedSpec(name string, ranks, perGPU int32) *fsmpb.JobSpec {
	return &fsmpb.JobSpec{Name: name, Type: "exec", Ranks: ranks, GpusPerRank: 1, RanksPerGpu: perGPU, Placement: "pack",
		Restart: &fsmpb.RestartPolicy{Attempts: 3, Delay: durationpb.New(2 * time.Second)},
		Exec:    &fsmpb.ExecSpec{Command: []string{"true"}}}
}

// layout is "node:gpus/local rank" of each rank of the current generation.
func (s *sim) layout(id string) string {
	var out []string
	for _, a := range s.gen(id) {
		out = append(out, fmt.Sprintf("%s:%v/%d.%d", a.NodeId, a.Gpus, a.LocalRank, a.LocalWorldSize))
	}
	return strings.Join(out, " ")
}

// failAndReplace fails the last rank of the current generation and drives
// the job to its next generation.
func (s *sim) failAndReplace(id string) {
	s.t.Helper()
	gen := s.job(id).Generation
	s.runAll(id)
	as := s.gen(id)
	s.report(as[len(as)-1].Id, AllocFailed, 7)
	s.step(id)
	s.now = s.now.Add(5 * time.Second) // FailureSettle
	s.step(id)
	s.stopAll(id)
	s.now = s.now.Add(3 * time.Second) // the restart delay
	s.step(id)
	if j := s.job(id); j.Status != JobRunning || j.Generation != gen+1 {
		s.t.Fatalf("after a failed rank of generation %d: %v", gen, j)
	}
}

// withFSM continues the sim on f (a restarted server's state).
func (s *sim) withFSM(f *FSM) { s.f = f }

// A job whose ranks share GPUs keeps the same sharing in every generation,
// also after the state is rebuilt from a snapshot or from the log (a
// cluster restart), and its shared GPUs are never given to another job.
func TestEvaluateRanksPerGPUAcrossGenerationsAndRestart(t *testing.T) {
	s := newSim(t)
	s.twoGPUNodes("a", "b")
	s.registerSpec("j", sharedSpec("j", 4, 2))
	s.step("j")
	// Local ranks 0-1 share GPU 0 and 2-3 GPU 1 of node a.
	const want1 = "a:[0]/0.4 a:[0]/1.4 a:[1]/2.4 a:[1]/3.4"
	if got := s.layout("j"); got != want1 {
		t.Fatalf("generation 1: %s, want %s", s.layout("j"), want1)
	}
	// Another sharing job gets node b's GPUs, not a slot on a's.
	s.registerSpec("k", sharedSpec("k", 3, 2))
	s.step("k")
	if got := s.layout("k"); got != "b:[0]/0.3 b:[0]/1.3 b:[1]/2.3" {
		t.Fatalf("job k: %s", got)
	}
	// No GPU is left for a third job, even one that would share.
	s.registerSpec("l", sharedSpec("l", 1, 4))
	s.step("l")
	if l := s.job("l"); l.Status != JobPending || !strings.Contains(l.StatusReason, "needs at least 1 GPU (1 rank, up to 4 on one GPU); 0 free") {
		t.Fatalf("job l: %v", l)
	}

	s.failAndReplace("j")
	if got := s.layout("j"); got != want1 {
		t.Fatalf("generation 2: %s, want %s", got, want1)
	}

	// A restarted server: the state from a snapshot, then from the log.
	snap := snapshotBytes(t, s.f)
	restored := NewFSM(nil)
	if err := restored.Restore(io.NopCloser(bytes.NewReader(snap))); err != nil {
		t.Fatal(err)
	}
	if n := restored.State().Job("j").Spec.GetRanksPerGpu(); n != 2 {
		t.Fatalf("ranks_per_gpu after restore = %d, want 2", n)
	}
	replayed := NewFSM(nil)
	replayed.ApplyBatch(append([]*raft.Log(nil), s.log...))
	if n := replayed.State().Job("j").Spec.GetRanksPerGpu(); n != 2 {
		t.Fatalf("ranks_per_gpu after replay = %d, want 2", n)
	}
	s.withFSM(restored)
	s.failAndReplace("j")
	if got := s.layout("j"); got != want1 {
		t.Fatalf("generation 3 after restore: %s, want %s", got, want1)
	}
	if got := s.layout("k"); got != "b:[0]/0.3 b:[0]/1.3 b:[1]/2.3" {
		t.Fatalf("job k moved: %s", got)
	}
}

// A spec written before ranks_per_gpu existed (no field 17 in the log)
// reads as 0 and places exactly as before: one rank per GPU.
func TestOldSpecWithoutRanksPerGPUPlacesAsBefore(t *testing.T) {
	old := &fsmpb.JobSpec{Name: "old", Type: "exec", Ranks: 2, GpusPerRank: 1, Placement: "pack",
		Restart: &fsmpb.RestartPolicy{Attempts: 3, Delay: durationpb.New(2 * time.Second)},
		Exec:    &fsmpb.ExecSpec{Command: []string{"true"}}}
	b, err := proto.Marshal(old)
	if err != nil {
		t.Fatal(err)
	}
	// What an old build wrote: the same bytes (proto3 leaves a zero field out).
	if bytes.Contains(b, []byte{17 << 3}) {
		t.Fatalf("a spec without sharing encodes field 17: %x", b)
	}
	s := newSim(t)
	s.twoGPUNodes("a")
	s.registerSpec("old", old)
	s.step("old")
	if n := s.job("old").Spec.GetRanksPerGpu(); n != 0 {
		t.Fatalf("old spec reads ranks_per_gpu %d, want 0 (meaning 1)", n)
	}
	if got := s.layout("old"); got != "a:[0]/0.2 a:[1]/1.2" {
		t.Fatalf("old spec placed %s, want a GPU per rank", got)
	}
	sj, err := toShardingJob("old", &controlpb.JobSpec{Ranks: 2, GpusPerRank: 1})
	if err != nil || sj.RanksPerGPU != 0 {
		t.Fatalf("toShardingJob: %+v %v", sj, err)
	}
}

// A whole-cluster restart (the one server stopped and started again from its
// data dir, after a snapshot) keeps the job's sharing: the next generation
// is placed by the new leader with the same ranks on the same GPUs.
func TestSchedulerRanksPerGPUAfterRestart(t *testing.T) {
	tc := NewTestCluster(t, func(c *Config) {
		c.BootstrapExpect, c.MaxVoters, c.Standbys = 1, 1, 0
	})
	tc.Start("srv", func(m *Member) { m.Ineligible = true })
	tc.AnnounceAll("srv")
	s := tc.WaitForLeader(10 * time.Second)
	addGPUNode(tc, "c1", 2)
	spec := gpuJob("shared", 3)
	spec.RanksPerGpu = 2
	id, _, err := s.RegisterJob(ctxT(t), spec)
	if err != nil {
		t.Fatal(err)
	}
	waitJob(t, s, id, "placed", running(1, 3))
	layout := func(s *Server, gen uint64) string {
		var out []string
		for _, a := range genAllocs(s, id, gen) {
			out = append(out, fmt.Sprintf("%s:%v", a.NodeId, a.Gpus))
		}
		return strings.Join(out, " ")
	}
	const want = "c1:[0] c1:[0] c1:[1]"
	if got := layout(s, 1); got != want {
		t.Fatalf("generation 1: %s, want %s", got, want)
	}
	if err := s.raft.Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	tc.Stop("srv", false)
	s = tc.Restart("srv")
	tc.WaitForLeader(10 * time.Second)
	waitJob(t, s, id, "restored", running(1, 3))
	if n := s.State().Job(id).Spec.GetRanksPerGpu(); n != 2 {
		t.Fatalf("ranks_per_gpu after restart = %d, want 2", n)
	}
	as := genAllocs(s, id, 1)
	report(t, s, &controlpb.Allocation{Id: as[0].Id, ClientStatus: AllocRunning}, &controlpb.Allocation{Id: as[1].Id, ClientStatus: AllocRunning},
		&controlpb.Allocation{Id: as[2].Id, ClientStatus: AllocFailed, ExitCode: 1})
	waitJob(t, s, id, "generation failed", func(j *controlpb.Job, _ []*controlpb.Allocation) bool {
		return j.Status == JobPending && j.Restarts == 1
	})
	ackStops(t, s, id)
	waitJob(t, s, id, "generation 2", running(2, 3))
	if got := layout(s, 2); got != want {
		t.Fatalf("generation 2 after restart: %s, want %s", got, want)
	}
}

// An elastic job whose ranks share GPUs grows into room on a GPU it
// already holds (fewer than ranks_per_gpu of its ranks there) when ranks
// can be added there, not only when a whole GPU is free: here node a's one
// GPU holds one rank of the job because the node's rank cap was taken by a
// CPU job; once that ends, the job grows to two ranks on the same GPU.
func TestElasticSharedJobGrowsOnItsOwnGPU(t *testing.T) {
	s := newSim(t)
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: []*fsmpb.Node{
		{Id: "a", Name: "a", RpcAddr: "10.0.1.1:7947", Status: NodeReady, MaxRanks: 2,
			Gpus: []*fsmpb.GPU{{Index: 0, Model: "H100", MemoryBytes: 80 << 30}}}}}}})
	cpu := sharedSpec("k", 1, 0)
	cpu.GpusPerRank = 0
	s.registerSpec("k", cpu)
	s.step("k")
	s.runAll("k")
	elastic := sharedSpec("j", 1, 2)
	elastic.MinRanks, elastic.MaxRanks = 1, 4
	s.registerSpec("j", elastic)
	s.step("j")
	if got := s.layout("j"); got != "a:[0]/0.1" {
		t.Fatalf("generation 1: %s, want one rank on GPU 0 (node a's rank cap)", got)
	}
	s.runAll("j")
	s.step("j")
	if j := s.job("j"); j.Status != JobRunning {
		t.Fatalf("grew while the node had no room: %v", j)
	}
	for _, a := range s.gen("k") {
		s.report(a.Id, AllocComplete, 0)
	}
	s.step("k")
	s.step("j")
	if j := s.job("j"); j.Status != JobPending || Cause(j.EndCause) != CauseResized {
		t.Fatalf("room for a second rank on its GPU, but the job did not grow: %s %q", j.Status, j.StatusReason)
	}
	s.stopAll("j")
	s.step("j")
	if got := s.layout("j"); s.job("j").Generation != 2 || got != "a:[0]/0.2 a:[0]/1.2" {
		t.Fatalf("generation %d: %s, want two ranks on GPU 0", s.job("j").Generation, got)
	}
	// Full (the node's cap): it stays.
	s.runAll("j")
	s.step("j")
	if j := s.job("j"); j.Status != JobRunning || j.Generation != 2 {
		t.Fatalf("grew without room: %v", j)
	}
}
