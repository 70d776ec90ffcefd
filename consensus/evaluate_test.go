package consensus

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/types/known/durationpb"
)

// sim is fixed state for the scheduler's table tests: an FSM driven by
// hand (no Raft, no clock: every command carries sim.now), and the
// Evaluator run on it.
type sim struct {
	t   *testing.T
	f   *FSM
	idx uint64
	now time.Time
	cfg SchedulerConfig
	lag map[string]bool
	// load is the routers' load the evaluator reads (services scaled by
	// load); nil: none.
	load LoadView
	// log holds every entry applied, for replay on other FSMs.
	log []*raft.Log
}

func newSim(t *testing.T, nodes ...string) *sim {
	s := &sim{t: t, f: NewFSM(nil), now: time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC),
		cfg: SchedulerConfig{MasterPortMin: 29500, MasterPortMax: 29599, StopReportGrace: 15 * time.Second, NodeLossGrace: 30 * time.Second, FailureSettle: 5 * time.Second}}
	var ns []*fsmpb.Node
	for i, id := range nodes {
		ns = append(ns, &fsmpb.Node{Id: id, Name: id, RpcAddr: "10.0.0." + string(rune('1'+i)) + ":7947", Status: NodeReady, MaxRanks: 8,
			Gpus: []*fsmpb.GPU{{Index: 0, Model: "H100", MemoryBytes: 80 << 30}}})
	}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: ns}}})
	return s
}

func (s *sim) apply(c *fsmpb.Command) any {
	s.t.Helper()
	s.idx++
	data, err := encodeCommand(s.now, c)
	if err != nil {
		s.t.Fatal(err)
	}
	l := &raft.Log{Index: s.idx, Type: raft.LogCommand, Data: data}
	s.log = append(s.log, l)
	resp := s.f.Apply(l)
	if err, ok := resp.(error); ok {
		s.t.Fatal(err)
	}
	return resp
}

func (s *sim) register(id string, ranks, attempts int32) {
	spec := &fsmpb.JobSpec{Name: id, Type: "exec", Ranks: ranks, GpusPerRank: 1,
		Restart: &fsmpb.RestartPolicy{Attempts: attempts, Delay: durationpb.New(2 * time.Second)},
		Exec:    &fsmpb.ExecSpec{Command: []string{"true"}}}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: spec}}})
}

func (s *sim) eval(id string) Decision {
	s.t.Helper()
	st := s.f.State()
	v := st.ClusterView()
	v.Lagging = s.lag
	e, err := NewEvaluator(v, s.cfg)
	if err != nil {
		s.t.Fatal(err)
	}
	return e.WithLoad(s.load).Evaluate(st.Job(id), st.Allocations(id), s.now)
}

// step evaluates and commits, following Again as the leader loop does,
// and returns the last decision.
func (s *sim) step(id string) Decision {
	s.t.Helper()
	for i := 0; i < 10; i++ {
		d := s.eval(id)
		if d.Plan != nil {
			r := s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{d.Plan}}}})
			if pr := r.(*PlansResult); pr.Applied != 1 {
				s.t.Fatalf("plan skipped: %v", pr)
			}
		}
		if d.Plan == nil || !d.Again {
			return d
		}
	}
	s.t.Fatal("the scheduler keeps asking to evaluate again")
	return Decision{}
}

func (s *sim) report(id string, status string, exit int32) {
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
		Allocations: []*fsmpb.Allocation{{Id: id, ClientStatus: status, ExitCode: exit}}}}})
}

func (s *sim) nodeStatus(id, status string) {
	n := s.f.State().Node(id)
	nn := &controlpb.Node{Id: n.Id, Name: n.Name, RpcAddr: n.RpcAddr, Gpus: n.Gpus, MaxRanks: n.MaxRanks, Status: status}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: must(twins[fsmpb.Node]([]*controlpb.Node{nn}))}}})
}

func (s *sim) job(id string) *controlpb.Job { return s.f.State().Job(id) }

func (s *sim) gen(id string) []*controlpb.Allocation {
	var out []*controlpb.Allocation
	j := s.job(id)
	for _, a := range s.f.State().Allocations(id) {
		if a.Generation == j.Generation {
			out = append(out, a)
		}
	}
	return out
}

// runAll reports every rank of the current generation running.
func (s *sim) runAll(id string) {
	for _, a := range s.gen(id) {
		s.report(a.Id, AllocRunning, 0)
	}
}

// stopAll plays the surviving nodes: ranks told to stop report stopped.
func (s *sim) stopAll(id string) {
	for _, a := range s.f.State().Allocations(id) {
		if a.DesiredStatus == DesiredStop && !AllocTerminal(a.ClientStatus) {
			if n := s.f.State().Node(a.NodeId); n != nil && nodeAlive(n) {
				s.report(a.Id, AllocStopped, -1)
			}
		}
	}
}

func TestEvaluatePlacesAndSkipsLaggingNodes(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.lag = map[string]bool{"a": true}
	s.register("j", 2, 3)
	d := s.step("j")
	j := s.job("j")
	if j.Status != JobRunning || j.Generation != 1 || d.Plan == nil || len(d.Plan.Allocations) != 2 {
		t.Fatalf("job %v, decision %v", j, d)
	}
	for _, a := range s.gen("j") {
		if a.NodeId == "a" {
			t.Fatalf("rank %d placed on lagging node a", a.Rank)
		}
		if a.Rank == 0 && (a.MasterPort < 29500 || a.MasterPort > 29599) {
			t.Fatalf("master port %d", a.MasterPort)
		}
	}
	// With only the lagging node free, a second job waits for it.
	s.register("k", 1, 3)
	s.step("k")
	if k := s.job("k"); k.Status != JobPending || !strings.HasPrefix(k.StatusReason, "waiting for capacity") {
		t.Fatalf("job k placed on a lagging node: %v", k)
	}
	s.lag = nil
	s.step("k")
	if k := s.job("k"); k.Status != JobRunning || s.gen("k")[0].NodeId != "a" {
		t.Fatalf("job k not placed once a caught up: %v", k)
	}
}

// An agent restart: its node is silent for less than the grace period and
// the generation goes on; the wake-up is the end of the grace.
func TestEvaluateSilentNodeWithinGraceKeepsGeneration(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.register("j", 2, 3)
	s.step("j")
	s.runAll("j")
	victim := s.gen("j")[1].NodeId
	s.nodeStatus(victim, NodeDown)
	silentAt := s.now
	s.now = s.now.Add(10 * time.Second)
	d := s.step("j")
	j := s.job("j")
	if j.Status != JobRunning || j.Generation != 1 || !d.WakeAt.Equal(silentAt.Add(30*time.Second)) {
		t.Fatalf("within the grace: job %v, wake %v", j, d.WakeAt)
	}
	if !strings.Contains(j.StatusReason, "silent") {
		t.Fatalf("reason %q does not say the node is silent", j.StatusReason)
	}
	// It comes back: same generation, nothing stopped, reason cleared.
	s.nodeStatus(victim, NodeReady)
	s.now = s.now.Add(time.Second)
	s.step("j")
	j = s.job("j")
	if j.Status != JobRunning || j.Generation != 1 || j.StatusReason != "" {
		t.Fatalf("after the node came back: %v", j)
	}
	for _, a := range s.gen("j") {
		if a.DesiredStatus != DesiredRun {
			t.Fatalf("rank %d told to stop", a.Rank)
		}
	}
}

func TestEvaluateSilentNodePastGraceIsLostNotCounted(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.register("j", 2, 3)
	s.step("j")
	s.runAll("j")
	victim := s.gen("j")[1]
	s.nodeStatus(victim.NodeId, NodeDown)
	s.now = s.now.Add(31 * time.Second)
	s.step("j")
	s.stopAll("j")
	s.step("j")
	j := s.job("j")
	if j.Status != JobRunning || j.Generation != 2 || j.Restarts != 0 || Cause(j.EndCause) != CauseNodeLost {
		t.Fatalf("job %v", j)
	}
	a := s.f.State().Allocation(victim.Id)
	if a.ClientStatus != AllocLost || !strings.Contains(a.Message, "node "+victim.NodeId) {
		t.Fatalf("lost rank = %v", a)
	}
}

// The spot losses without notice: the dead node's peers fail
// first (exit 1, every node still ready), then gossip marks the node down.
// None of the three losses counts; the job with attempts 3 keeps running,
// and a failure of its own afterwards counts as the first restart.
func TestEvaluateSpotLossesDoNotUseRestarts(t *testing.T) {
	s := newSim(t, "a", "b", "c", "d", "e")
	s.register("j", 2, 3)
	s.step("j")
	for loss := 1; loss <= 3; loss++ {
		s.runAll("j")
		g := s.gen("j")
		s.report(g[0].Id, AllocFailed, 1) // the survivor sees its peer die
		s.step("j")
		if j := s.job("j"); Cause(j.EndCause) != CauseRankFailed || j.Restarts != 0 {
			t.Fatalf("loss %d: right after the peer failed: %v", loss, j)
		}
		s.now = s.now.Add(2 * time.Second)
		s.nodeStatus(g[1].NodeId, NodeDown)
		d := s.step("j")
		if j := s.job("j"); Cause(j.EndCause) != CauseNodeLost || j.Restarts != 0 {
			t.Fatalf("loss %d: after the node went down: %v (decision %v)", loss, j, d)
		}
		s.now = s.now.Add(time.Second)
		s.step("j")
		if j := s.job("j"); j.Status != JobRunning || j.Generation != uint64(loss+1) || j.Restarts != 0 {
			t.Fatalf("loss %d: not placed again: %v", loss, j)
		}
	}
	// Now a failure of its own: every rank reported, no node lost.
	s.runAll("j")
	g := s.gen("j")
	s.report(g[0].Id, AllocFailed, 3)
	s.step("j")
	s.stopAll("j")
	s.step("j")
	if j := s.job("j"); j.Restarts != 1 || Cause(j.EndCause) != CauseTaskFailed || !strings.Contains(j.StatusReason, "exited with code 3") {
		t.Fatalf("own failure: %v", j)
	}
}

func TestEvaluateFailureSettlesAfterWindow(t *testing.T) {
	s := newSim(t, "a", "b")
	s.register("j", 2, 1)
	s.step("j")
	s.runAll("j")
	failedAt := s.now
	s.report(s.gen("j")[1].Id, AllocFailed, 7)
	s.step("j")
	// Rank 0 was told to stop and has not reported: the cause is not
	// settled before FailureSettle.
	d := s.step("j")
	if j := s.job("j"); j.Restarts != 0 || Cause(j.EndCause) != CauseRankFailed || d.WakeAt.IsZero() || d.WakeAt.After(failedAt.Add(5*time.Second)) {
		t.Fatalf("before settling: %v, wake %v", j, d.WakeAt)
	}
	s.now = failedAt.Add(5 * time.Second)
	s.step("j")
	if j := s.job("j"); j.Restarts != 1 || Cause(j.EndCause) != CauseTaskFailed || j.Status != JobPending {
		t.Fatalf("settled: %v", j)
	}
	// Second failure with attempts 1: exhausted, the job fails.
	s.stopAll("j")
	s.now = s.now.Add(3 * time.Second)
	s.step("j")
	s.runAll("j")
	s.report(s.gen("j")[0].Id, AllocFailed, 7)
	s.report(s.gen("j")[1].Id, AllocFailed, 7)
	s.step("j")
	if j := s.job("j"); j.Status != JobFailed || !strings.Contains(j.StatusReason, "exhausted") {
		t.Fatalf("exhausted: %v", j)
	}
}

// A rank fails while the node of another rank is silent (within the
// grace): its peers saw the node die, the generation ends at once as a
// node loss.
func TestEvaluateFailureWithSilentPeerIsNodeLoss(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.register("j", 2, 3)
	s.step("j")
	s.runAll("j")
	g := s.gen("j")
	s.nodeStatus(g[1].NodeId, NodeDown)
	s.now = s.now.Add(time.Second)
	s.report(g[0].Id, AllocFailed, 1)
	s.step("j")
	s.stopAll("j")
	s.step("j")
	j := s.job("j")
	if j.Status != JobRunning || j.Generation != 2 || j.Restarts != 0 || Cause(j.EndCause) != CauseNodeLost {
		t.Fatalf("job %v", j)
	}
}

func TestEvaluateDrainEndsGenerationWithoutRestart(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.register("j", 2, 3)
	s.step("j")
	s.runAll("j")
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: &fsmpb.DrainNode{NodeId: s.gen("j")[0].NodeId, Reason: "spot"}}})
	s.step("j")
	if j := s.job("j"); j.Status != JobPending || Cause(j.EndCause) != CauseNodeDrained || j.NextAttemptTime != nil {
		t.Fatalf("job %v", j)
	}
	s.stopAll("j")
	s.step("j")
	if j := s.job("j"); j.Status != JobRunning || j.Restarts != 0 {
		t.Fatalf("job %v", j)
	}
}

// A rank 0 whose node finds its MASTER_PORT taken by a process outside
// gpumesh ends the generation without a restart; the next one gets another
// port and never the busy one; a second busy port in a row counts.
func TestEvaluateMasterPortBusyPlacesAgainWithAnotherPort(t *testing.T) {
	s := newSim(t, "a", "b")
	s.register("j", 2, 1)
	s.step("j")
	busyOn := func() *controlpb.Allocation {
		for _, a := range s.gen("j") {
			if a.Rank == 0 {
				s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
					Allocations: []*fsmpb.Allocation{{Id: a.Id, ClientStatus: AllocFailed, ExitCode: -1,
						Message: "MASTER_PORT is in use", StartFailure: StartMasterPortBusy}}}}})
				return a
			}
			s.report(a.Id, AllocRunning, 0)
		}
		t.Fatal("no rank 0")
		return nil
	}
	first := busyOn()
	s.step("j")
	j := s.job("j")
	if j.Status != JobPending || Cause(j.EndCause) != CauseMasterPortBusy || j.Restarts != 0 || j.NextAttemptTime != nil {
		t.Fatalf("after a busy port: %v", j)
	}
	if !strings.Contains(j.StatusReason, fmt.Sprintf("MASTER_PORT %d is in use", first.MasterPort)) {
		t.Fatalf("reason %q does not name the port", j.StatusReason)
	}
	s.stopAll("j")
	s.step("j")
	if j := s.job("j"); j.Status != JobRunning || j.Generation != 2 || j.Restarts != 0 {
		t.Fatalf("not placed again without a restart: %v", j)
	}
	second := busyOn()
	if second.MasterPort == first.MasterPort {
		t.Fatalf("generation 2 got the busy port %d again", first.MasterPort)
	}
	s.step("j")
	if j := s.job("j"); Cause(j.EndCause) != CauseRankFailed {
		t.Fatalf("a second busy port in a row did not end as a failure: %v", j)
	}
	s.stopAll("j")
	s.now = s.now.Add(10 * time.Second)
	s.step("j")
	if j := s.job("j"); j.Restarts != 1 || Cause(j.EndCause) != CauseTaskFailed {
		t.Fatalf("a second busy port in a row is not counted: %v", j)
	}
}

// The leader's view (StateStore.ClusterView) holds no ended allocation, so
// the port that generation 1's rank 0 found busy must come from the job's
// own allocations: generation 2 gets another port even where its own
// start in the range is that very port.
func TestEvaluateMasterPortBusyKeptOutOfNextPick(t *testing.T) {
	s := newSim(t, "a", "b")
	id := s.sameFirstPortJobID()
	s.register(id, 2, 1)
	s.step(id)
	var busy int32
	for _, a := range s.gen(id) {
		if a.Rank != 0 {
			s.report(a.Id, AllocRunning, 0)
			continue
		}
		busy = a.MasterPort
		s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
			Allocations: []*fsmpb.Allocation{{Id: a.Id, ClientStatus: AllocFailed, ExitCode: -1,
				Message: "MASTER_PORT is in use", StartFailure: StartMasterPortBusy}}}}})
	}
	s.step(id)
	if j := s.job(id); Cause(j.EndCause) != CauseMasterPortBusy {
		t.Fatalf("after a busy port: %v", j)
	}
	s.stopAll(id)
	s.step(id)
	if j := s.job(id); j.Status != JobRunning || j.Generation != 2 {
		t.Fatalf("not placed again: %v", j)
	}
	for _, a := range s.gen(id) {
		if a.Rank == 0 && a.MasterPort == busy {
			t.Fatalf("generation 2's rank 0 got MASTER_PORT %d again, which generation 1 found busy", busy)
		}
	}
}

// sameFirstPortJobID narrows the sim's MASTER_PORT range to 3 ports and
// returns a job ID whose generations 1 and 2 start their port search at
// the same port (with a range of 3: FNV's last step never maps ".../1" and
// ".../2" to one value modulo a power of two).
func (s *sim) sameFirstPortJobID() string {
	s.t.Helper()
	s.cfg.MasterPortMin, s.cfg.MasterPortMax = 29500, 29502
	for i := 0; i < 1000; i++ {
		c := fmt.Sprintf("j%d", i)
		e1 := &Evaluator{cfg: s.cfg, ports: map[string]map[int32]bool{}}
		e2 := &Evaluator{cfg: s.cfg, ports: map[string]map[int32]bool{}}
		if e1.pickPort("k", c, 1, nil) == e2.pickPort("k", c, 2, nil) {
			return c
		}
	}
	s.t.Fatal("no job ID whose generations 1 and 2 start at one port")
	return ""
}

// A rank whose agent found another job's checkpoints under the job's
// checkpoint.uri fails the job at once, without restarts (each would fail
// the same way), with the agent's message, and its other ranks stop.
func TestEvaluateCheckpointOfAnotherJobFailsTheJob(t *testing.T) {
	s := newSim(t, "a", "b")
	s.register("j", 2, 3)
	s.step("j")
	var refused *controlpb.Allocation
	for _, a := range s.gen("j") {
		if a.Rank == 1 {
			refused = a
			s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
				Allocations: []*fsmpb.Allocation{{Id: a.Id, ClientStatus: AllocFailed, ExitCode: -1,
					Message: `the newest checkpoint was written by job "other"`, StartFailure: StartCheckpointOtherJob}}}}})
			continue
		}
		s.report(a.Id, AllocRunning, 0)
	}
	s.step("j")
	j := s.job("j")
	if j.Status != JobFailed || j.Restarts != 0 || j.NextAttemptTime != nil {
		t.Fatalf("after a rank found another job's checkpoints: %v", j)
	}
	if !strings.Contains(j.StatusReason, `written by job "other"`) || !strings.Contains(j.StatusReason, "rank 1") {
		t.Fatalf("reason %q does not carry the agent's message", j.StatusReason)
	}
	for _, a := range s.gen("j") {
		if a.Id != refused.Id && a.DesiredStatus != DesiredStop {
			t.Fatalf("rank %d was not told to stop: %v", a.Rank, a)
		}
	}
}

func TestCauseCounts(t *testing.T) {
	for _, c := range []Cause{CauseNone, CauseRankFailed, CauseNodeLost, CauseNodeDrained, CauseResized, CauseMasterPortBusy} {
		if c.Counts() {
			t.Errorf("%q counts against the restart policy", c)
		}
	}
	if !CauseTaskFailed.Counts() {
		t.Error("task-failed does not count")
	}
}

func TestReplTrackerBehindUntilAppendAccepted(t *testing.T) {
	caught := 0
	tr := newReplTracker(func() { caught++ })
	if lag, _ := tr.lagging(); lag != nil {
		t.Fatalf("lagging %v at start", lag)
	}
	tr.fall("n1")
	lag, v1 := tr.lagging()
	if !lag["n1"] {
		t.Fatalf("n1 not lagging after a failure: %v", lag)
	}
	tr.fall("n1")
	if _, v := tr.lagging(); v != v1 {
		t.Fatal("version moved without a change")
	}
	tr.ok("n1")
	if lag, v := tr.lagging(); lag != nil || v == v1 || caught != 1 {
		t.Fatalf("after an accepted append: lagging %v, caught-up calls %d", lag, caught)
	}
	if !isHeartbeat(&raft.AppendEntriesRequest{}) || isHeartbeat(&raft.AppendEntriesRequest{PrevLogEntry: 4, LeaderCommitIndex: 4}) {
		t.Fatal("heartbeats and replication appends are not told apart")
	}
	// A reachable follower is not waited for; an unreachable one until a
	// heartbeat reaches it (or the hold, or stop).
	never := make(chan struct{})
	tr.waitReachable("n1", time.Hour, never)
	tr.unreachable("n1")
	done := make(chan struct{})
	go func() { tr.waitReachable("n1", time.Hour, never); close(done) }()
	select {
	case <-done:
		t.Fatal("the wait for an unreachable follower returned before it was reached")
	case <-time.After(20 * time.Millisecond):
	}
	tr.reachable("n1")
	<-done
	stop := make(chan struct{})
	close(stop)
	tr.unreachable("n2")
	tr.waitReachable("n2", time.Hour, stop) // returns: stopped
}
