package consensus

import (
	"fmt"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

func (s *sim) registerService(id string, replicas int32) {
	s.t.Helper()
	spec, err := jobspec.Parse(fmt.Appendf(nil, "name: %s\ntype: service\nreplicas: %d\nplacement: spread\nrestart: {delay: 2s}\nexec: {command: [srv]}\n", id, replicas))
	if err != nil {
		s.t.Fatal(err)
	}
	logSpec, err := twin[fsmpb.JobSpec](spec)
	if err != nil {
		s.t.Fatal(err)
	}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: logSpec}}})
}

func (s *sim) health(id, health string) {
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
		Allocations: []*fsmpb.Allocation{{Id: id, ClientStatus: AllocRunning, Health: health}}}}})
}

// live returns the replicas told to run, by slot.
func (s *sim) live(id string) map[int32][]*controlpb.Allocation {
	out := map[int32][]*controlpb.Allocation{}
	for _, a := range s.f.State().Allocations(id) {
		if a.DesiredStatus == DesiredRun {
			out[a.Rank] = append(out[a.Rank], a)
		}
	}
	return out
}

// serveAll plays the nodes: every replica told to run runs and is healthy.
func (s *sim) serveAll(id string) {
	for _, as := range s.live(id) {
		for _, a := range as {
			if !AllocTerminal(a.ClientStatus) && a.Health != HealthHealthy {
				s.health(a.Id, HealthHealthy)
			}
		}
	}
}

// A drained node's replica is replaced elsewhere first and stopped only
// once its replacement is healthy; the other replica is never touched (the
// replacement alone is of the next generation).
func TestServiceDrainReplacesOneReplicaAtATime(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.registerService("svc", 2)
	s.step("svc")
	s.serveAll("svc")
	gen := s.job("svc").Generation
	before := s.live("svc")
	if len(before[0]) != 1 || len(before[1]) != 1 {
		t.Fatalf("placed %v", before)
	}
	victim, other := before[0][0], before[1][0]
	s.nodeStatus(victim.NodeId, NodeDraining)
	s.step("svc")
	now := s.live("svc")
	if len(now[0]) != 2 {
		t.Fatalf("slot 0 after the drain: %v; want the old replica and its replacement", now[0])
	}
	var repl *controlpb.Allocation
	for _, a := range now[0] {
		if a.Id != victim.Id {
			repl = a
		}
	}
	if repl.GroupWorldSize != 1 || repl.LocalWorldSize != 1 || repl.WorldSize != 2 || repl.MasterAddr == "" || repl.MasterPort == 0 {
		t.Fatalf("the replacement's rank environment is incomplete: %v", repl)
	}
	if repl.NodeId == victim.NodeId {
		t.Fatalf("replacement placed on the draining node %s", repl.NodeId)
	}
	if repl.Generation != gen+1 || s.job("svc").Generation != gen+1 {
		t.Fatalf("the replacement is of generation %d, the job %d; want both %d", repl.Generation, s.job("svc").Generation, gen+1)
	}
	if len(now[1]) != 1 || now[1][0].Id != other.Id || now[1][0].DesiredStatus != DesiredRun || s.job("svc").Status != JobRunning {
		t.Fatalf("the other replica or the generation changed: %v, gen %d, %s", now[1], s.job("svc").Generation, s.job("svc").Status)
	}
	// Starting is not enough: the old replica keeps serving.
	s.health(repl.Id, HealthStarting)
	if d := s.step("svc"); len(s.live("svc")[0]) != 2 || d.WakeAt.IsZero() {
		t.Fatalf("the old replica was stopped before its replacement was healthy (wake %v)", d.WakeAt)
	}
	s.health(repl.Id, HealthHealthy)
	s.step("svc")
	final := s.live("svc")
	if len(final[0]) != 1 || final[0][0].Id != repl.Id {
		t.Fatalf("after the replacement is healthy slot 0 is %v; want only %s", final[0], repl.Id)
	}
}

// A replica that exits is replaced on its own after the restart delay; the
// service never completes or fails.
func TestServiceReplicaExitIsReplaced(t *testing.T) {
	s := newSim(t, "a", "b")
	s.registerService("svc", 2)
	s.step("svc")
	s.serveAll("svc")
	r0 := s.live("svc")[0][0]
	s.report(r0.Id, AllocFailed, 1)
	d := s.step("svc")
	if len(s.live("svc")[0]) != 0 || d.WakeAt.IsZero() {
		t.Fatalf("replaced at once, before the restart delay (wake %v): %v", d.WakeAt, s.live("svc")[0])
	}
	s.now = d.WakeAt
	s.step("svc")
	// A replacement that fails at once is not replaced before the delay
	// either (no tight loop of failed starts; its second failure in a row
	// doubles the delay, TestServiceCrashLoopBacksOff).
	first := s.live("svc")[0][0]
	s.report(first.Id, AllocFailed, -1)
	if d2 := s.step("svc"); len(s.live("svc")[0]) != 0 || d2.WakeAt.IsZero() {
		t.Fatalf("a replacement failing at once was replaced at once: %v", s.live("svc")[0])
	}
	s.now = s.now.Add(4 * time.Second)
	s.step("svc")
	if got := s.live("svc")[0]; len(got) != 1 || got[0].Id == r0.Id {
		t.Fatalf("slot 0 after the delay: %v", got)
	}
	if j := s.job("svc"); j.Status != JobRunning || j.Restarts != 0 || len(s.live("svc")[1]) != 1 {
		t.Fatalf("job %s restarts %d; replica 1 %v", j.Status, j.Restarts, s.live("svc")[1])
	}
	// Every replica exiting 0 does not complete it either.
	for _, as := range s.live("svc") {
		s.report(as[0].Id, AllocComplete, 0)
	}
	s.step("svc")
	if j := s.job("svc"); j.Status != JobRunning {
		t.Fatalf("a service %s", j.Status)
	}
}

// A replica on a node silent past the grace is lost and replaced; within
// the grace a replacement starts, and the extra one goes when the node
// comes back.
func TestServiceSilentNode(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.registerService("svc", 1)
	s.step("svc")
	s.serveAll("svc")
	old := s.live("svc")[0][0]
	s.nodeStatus(old.NodeId, NodeDown)
	s.step("svc")
	if got := s.live("svc")[0]; len(got) != 2 {
		t.Fatalf("within the grace: %v; want the suspect and a replacement", got)
	}
	s.serveAll("svc")
	s.nodeStatus(old.NodeId, NodeReady)
	s.step("svc")
	if got := s.live("svc")[0]; len(got) != 1 {
		t.Fatalf("after the node came back: %v; want one replica", got)
	}
	keep := s.live("svc")[0][0]
	s.nodeStatus(keep.NodeId, NodeDown)
	s.now = s.now.Add(time.Minute)
	s.step("svc")
	a := s.f.State().Allocation(keep.Id)
	if a.ClientStatus != AllocLost {
		t.Fatalf("replica on a node silent past the grace: %s", a.ClientStatus)
	}
	if got := s.live("svc")[0]; len(got) != 1 || got[0].NodeId == keep.NodeId {
		t.Fatalf("slot 0: %v", got)
	}
}

// A replacement replica goes to a node that holds no other replica of the
// service when one can take it, even under pack placement; with no such
// node it shares one.
func TestServiceReplacementAvoidsItsSiblingsNodes(t *testing.T) {
	for _, c := range []struct {
		name  string
		nodes []string
		apart bool
	}{{"another node free", []string{"a", "b", "c"}, true}, {"one node only", []string{"a"}, false}} {
		t.Run(c.name, func(t *testing.T) {
			s := newSim(t, c.nodes...)
			spec, err := jobspec.Parse([]byte("name: svc\ntype: service\nreplicas: 2\nplacement: pack\nrestart: {delay: 2s}\nexec: {command: [srv]}\n"))
			if err != nil {
				t.Fatal(err)
			}
			s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: "svc", Spec: must(twin[fsmpb.JobSpec](spec))}}})
			s.step("svc")
			s.serveAll("svc")
			live := s.live("svc")
			if live[0][0].NodeId != live[1][0].NodeId {
				t.Fatalf("pack placed the replicas on %s and %s; the test wants them together", live[0][0].NodeId, live[1][0].NodeId)
			}
			sibling := live[0][0].NodeId
			s.report(live[1][0].Id, AllocFailed, 1)
			s.now = s.now.Add(3 * time.Second)
			s.step("svc")
			repl := s.live("svc")[1]
			if len(repl) != 1 || AllocTerminal(repl[0].ClientStatus) {
				t.Fatalf("slot 1 after its replica failed: %v", repl)
			}
			if apart := repl[0].NodeId != sibling; apart != c.apart {
				t.Fatalf("the replacement went to %s, its sibling is on %s; want apart=%v", repl[0].NodeId, sibling, c.apart)
			}
		})
	}
}

// A replica whose node finds its MASTER_PORT held by a process outside
// gpumesh is replaced without counting as a failure, and its successor's
// MASTER_PORT is another one, even where the successor's search starts at
// the busy port.
func TestServiceReplicaMasterPortBusyKeptOutOfNextPick(t *testing.T) {
	s := newSim(t, "a")
	id := s.sameFirstPortJobID()
	s.registerService(id, 1)
	s.step(id)
	first := s.live(id)[0][0]
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
		Allocations: []*fsmpb.Allocation{{Id: first.Id, ClientStatus: AllocFailed, ExitCode: -1,
			Message: "MASTER_PORT is in use", StartFailure: StartMasterPortBusy}}}}})
	d := s.step(id)
	s.now = d.WakeAt
	s.step(id)
	live := s.live(id)[0]
	if len(live) != 1 || live[0].Generation != 2 {
		t.Fatalf("replica not replaced: %v", live)
	}
	if live[0].MasterPort == first.MasterPort {
		t.Fatalf("the replacement got MASTER_PORT %d again, which its predecessor found busy", first.MasterPort)
	}
	if live[0].SlotFailures != 0 {
		t.Fatalf("a busy port counted as the replica's failure: %d in a row", live[0].SlotFailures)
	}
}
