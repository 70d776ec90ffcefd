package consensus

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/hashicorp/raft"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// serviceSpec is the spec registerService uses, with command cmd.
func serviceSpec(t *testing.T, id string, replicas int32, cmd string) *fsmpb.JobSpec {
	t.Helper()
	spec, err := jobspec.Parse(fmt.Appendf(nil, "name: %s\ntype: service\nreplicas: %d\nplacement: spread\nrestart: {delay: 2s}\nexec: {command: [%s]}\n", id, replicas, cmd))
	if err != nil {
		t.Fatal(err)
	}
	return must(twin[fsmpb.JobSpec](spec))
}

// updateService applies an UpdateJob command and returns its result.
func (s *sim) updateService(id string, spec *fsmpb.JobSpec) any {
	s.t.Helper()
	return s.updateServiceKeep(id, spec, false)
}

// updateServiceKeep is updateService with the command's keep_generation,
// as the leader sets it for a spec that only scales (ScaleOnly).
func (s *sim) updateServiceKeep(id string, spec *fsmpb.JobSpec, keep bool) any {
	s.t.Helper()
	s.idx++
	data, err := encodeCommand(s.now, &fsmpb.Command{Cmd: &fsmpb.Command_UpdateJob{UpdateJob: &fsmpb.UpdateJob{Id: id, Spec: spec, KeepGeneration: keep}}})
	if err != nil {
		s.t.Fatal(err)
	}
	return s.f.Apply(&raft.Log{Index: s.idx, Type: raft.LogCommand, Data: data})
}

// liveIDs is the set of the IDs of the replicas told to run.
func (s *sim) liveIDs(id string) map[string]bool {
	ids := map[string]bool{}
	for _, as := range s.live(id) {
		for _, a := range as {
			ids[a.Id] = true
		}
	}
	return ids
}

// healthyCount is the number of replicas told to run that are running
// and healthy.
func (s *sim) healthyCount(id string) int {
	n := 0
	for _, as := range s.live(id) {
		for _, a := range as {
			if a.ClientStatus == AllocRunning && a.Health == HealthHealthy {
				n++
			}
		}
	}
	return n
}

// A rolling update replaces the replicas one slot at a time: each slot's
// replacement runs the new spec (a newer generation than spec_generation),
// the old replica is stopped only once it is healthy, and the next slot's
// turn comes only then. The healthy count never drops below the replicas.
func TestServiceRollingUpdateOneSlotAtATime(t *testing.T) {
	s := newSim(t, "a", "b", "c", "d")
	s.registerService("svc", 3)
	s.step("svc")
	s.serveAll("svc")
	olds := s.liveIDs("svc")
	if len(olds) != 3 {
		t.Fatalf("placed %v", s.live("svc"))
	}
	if r := s.updateService("svc", serviceSpec(t, "svc", 3, "srv-v2")); r != nil {
		t.Fatalf("update: %v", r)
	}
	j := s.job("svc")
	if j.SpecGeneration != j.Generation+1 || j.Spec.GetExec().GetCommand()[0] != "srv-v2" {
		t.Fatalf("after the update: spec generation %d (job generation %d), command %v", j.SpecGeneration, j.Generation, j.Spec.GetExec().GetCommand())
	}
	for turn := 0; turn < 3; turn++ {
		s.step("svc")
		var fresh []*controlpb.Allocation
		for _, as := range s.live("svc") {
			for _, a := range as {
				if !olds[a.Id] && a.Health != HealthHealthy {
					fresh = append(fresh, a)
				}
			}
		}
		if len(fresh) != 1 {
			t.Fatalf("turn %d: %d replacements starting at once, want 1: %v", turn, len(fresh), s.live("svc"))
		}
		repl := fresh[0]
		if repl.Generation < s.job("svc").SpecGeneration {
			t.Fatalf("turn %d: replacement %s is of generation %d, older than the spec's %d", turn, repl.Id, repl.Generation, s.job("svc").SpecGeneration)
		}
		if len(s.live("svc")[repl.Rank]) != 2 {
			t.Fatalf("turn %d: slot %d is %v; want the old replica beside its replacement", turn, repl.Rank, s.live("svc")[repl.Rank])
		}
		// Starting is not enough: nothing is stopped, nothing else starts.
		s.health(repl.Id, HealthStarting)
		if d := s.step("svc"); d.WakeAt.IsZero() || len(s.live("svc")[repl.Rank]) != 2 || s.healthyCount("svc") != 3 {
			t.Fatalf("turn %d: before the replacement is healthy: %v (wake %v)", turn, s.live("svc"), d.WakeAt)
		}
		if !strings.Contains(s.job("svc").StatusReason, "rolling update") {
			t.Fatalf("turn %d: status reason %q does not say a rolling update is under way", turn, s.job("svc").StatusReason)
		}
		s.health(repl.Id, HealthHealthy)
		if s.healthyCount("svc") != 4 {
			t.Fatalf("turn %d: %d healthy with the replacement, want 4", turn, s.healthyCount("svc"))
		}
		s.step("svc")
		if got := s.live("svc")[repl.Rank]; len(got) != 1 || got[0].Id != repl.Id {
			t.Fatalf("turn %d: slot %d after its replacement is healthy: %v; want only %s", turn, repl.Rank, got, repl.Id)
		}
		s.stopAll("svc")
		if s.healthyCount("svc") < 3 {
			t.Fatalf("turn %d: %d healthy replicas, fewer than 3", turn, s.healthyCount("svc"))
		}
		// The plan that stopped this slot's old replica may have placed
		// the next slot's replacement; the next turn checks there is one.
	}
	for _, as := range s.live("svc") {
		for _, a := range as {
			if olds[a.Id] || a.Generation < s.job("svc").SpecGeneration {
				t.Fatalf("after the update %s (generation %d) still runs", a.Id, a.Generation)
			}
		}
	}
	if d := s.step("svc"); d.Plan != nil || s.job("svc").StatusReason != "" {
		t.Fatalf("a finished update still plans %v (reason %q)", d.Plan, s.job("svc").StatusReason)
	}
}

// A replacement that never becomes healthy stalls the update: the old
// replicas keep serving, no other slot is touched.
func TestServiceRollingUpdateStallsOnAnUnhealthyReplacement(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.registerService("svc", 2)
	s.step("svc")
	s.serveAll("svc")
	if r := s.updateService("svc", serviceSpec(t, "svc", 2, "broken")); r != nil {
		t.Fatalf("update: %v", r)
	}
	s.step("svc")
	var repl *controlpb.Allocation
	for _, as := range s.live("svc") {
		for _, a := range as {
			if a.Generation >= s.job("svc").SpecGeneration {
				repl = a
			}
		}
	}
	if repl == nil {
		t.Fatalf("no replacement placed: %v", s.live("svc"))
	}
	s.health(repl.Id, HealthUnhealthy)
	for i := 0; i < 3; i++ {
		d := s.step("svc")
		s.now = s.now.Add(serviceRecheck)
		if d.WakeAt.IsZero() {
			t.Fatal("no recheck while the update waits")
		}
	}
	if s.healthyCount("svc") != 2 || len(s.live("svc")[repl.Rank]) != 2 || len(s.live("svc")[1-repl.Rank]) != 1 {
		t.Fatalf("a stalled update touched the serving replicas: %v", s.live("svc"))
	}
	if r := s.updateService("svc", serviceSpec(t, "svc", 2, "fixed")); r != nil {
		t.Fatalf("update: %v", r)
	}
	s.step("svc")
	// The fixed spec supersedes the broken one: its replacement is stopped,
	// a new one placed, the old replica still serves.
	slot := s.live("svc")[repl.Rank]
	if len(slot) != 2 || s.healthyCount("svc") != 2 {
		t.Fatalf("after the fixed spec slot %d is %v", repl.Rank, slot)
	}
	for _, a := range slot {
		if a.Id == repl.Id {
			t.Fatalf("the broken replacement %s still runs after the fixed spec", a.Id)
		}
	}
	for _, a := range slot {
		if a.Generation >= s.job("svc").SpecGeneration {
			repl = a
		}
	}
	s.health(repl.Id, HealthUnhealthy)
	// The replacement exits: it is not retried before the restart delay,
	// and the old replica still serves.
	s.report(repl.Id, AllocFailed, 1)
	d := s.step("svc")
	if s.healthyCount("svc") != 2 || d.WakeAt.IsZero() {
		t.Fatalf("after the replacement failed: %v (wake %v)", s.live("svc"), d.WakeAt)
	}
	for _, a := range s.live("svc")[repl.Rank] {
		if a.Generation >= s.job("svc").SpecGeneration {
			t.Fatalf("replacement %s placed again at once, before the restart delay", a.Id)
		}
	}
	s.now = d.WakeAt
	s.step("svc")
	if len(s.live("svc")[repl.Rank]) != 2 {
		t.Fatalf("after the restart delay slot %d is %v; want a new replacement beside the old", repl.Rank, s.live("svc")[repl.Rank])
	}
}

// Only a live service's spec may be updated; an equal spec changes nothing.
func TestServiceUpdateRefusals(t *testing.T) {
	s := newSim(t, "a", "b")
	s.registerService("svc", 1)
	s.step("svc")
	s.serveAll("svc")
	before := s.job("svc")
	if r := s.updateService("svc", serviceSpec(t, "svc", 1, "srv")); r != nil || s.job("svc").ModifyIndex != before.ModifyIndex || s.job("svc").SpecGeneration != 0 {
		t.Fatalf("an equal spec changed the job: %v, %v", r, s.job("svc"))
	}
	if got := RunningService(s.f.State().Jobs(), "svc"); got == nil || got.Id != "svc" {
		t.Fatalf("RunningService(svc) = %v", got)
	}
	if r, _ := s.updateService("nope", serviceSpec(t, "nope", 1, "srv")).(error); !errors.Is(r, ErrJobNotFound) {
		t.Fatalf("update of an unknown job: %v", r)
	}
	moved := serviceSpec(t, "svc", 1, "srv")
	moved.Service.Ports, moved.Service.RoutePort = []string{"api"}, "api"
	if r, _ := s.updateService("svc", moved).(error); !errors.Is(r, ErrInvalidArgument) || s.job("svc").SpecGeneration != 0 {
		t.Fatalf("an update that renames the route port: %v", r)
	}
	s.register("batch", 1, 0)
	exec := &fsmpb.JobSpec{Name: "batch", Type: "exec", Ranks: 1, Exec: &fsmpb.ExecSpec{Command: []string{"true"}}}
	if r, _ := s.updateService("batch", exec).(error); !errors.Is(r, ErrInvalidArgument) {
		t.Fatalf("update of a batch job: %v", r)
	}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: "svc"}}})
	if r, _ := s.updateService("svc", serviceSpec(t, "svc", 1, "v2")).(error); !errors.Is(r, ErrInvalidArgument) {
		t.Fatalf("update of a stopped service: %v", r)
	}
	if got := RunningService(s.f.State().Jobs(), "svc"); got != nil {
		t.Fatalf("a stopped service is still running: %v", got)
	}
}

// A RegisterJob that asks for a unique service name is refused when a live
// service has that name (it is checked in the log's order: two
// submissions of a new name at once register one job); an entry written
// before the flag existed registers as it did.
func TestRegisterServiceNameIsUnique(t *testing.T) {
	s := newSim(t, "a")
	spec, err := jobspec.Parse([]byte("name: web\ntype: service\nreplicas: 1\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	logSpec := must(twin[fsmpb.JobSpec](spec))
	register := func(id string, unique bool) any {
		s.idx++
		data, err := encodeCommand(s.now, &fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: logSpec, UniqueService: unique}}})
		if err != nil {
			t.Fatal(err)
		}
		return s.f.Apply(&raft.Log{Index: s.idx, Type: raft.LogCommand, Data: data})
	}
	if r := register("web-1", true); r != "web-1" {
		t.Fatalf("first registration: %v", r)
	}
	r := register("web-2", true)
	var exists *ServiceExistsError
	if err, _ := r.(error); !errors.As(err, &exists) || exists.ID != "web-1" || !errors.Is(err, ErrServiceExists) {
		t.Fatalf("a second live service named web: %v, want a ServiceExistsError naming web-1", r)
	}
	if s.job("web-2") != nil {
		t.Fatalf("the refused registration was stored")
	}
	if r := register("web-3", false); r != "web-3" {
		t.Fatalf("an old entry (no unique flag) was refused on replay: %v", r)
	}
}

// A spec that changes only the replica count scales the service: the
// leader proposes it with keep_generation (ScaleOnly), the spec generation
// stays, the running replicas are not replaced, and one replica is added.
// Any other change (here the command, with the count) is a rolling update.
func TestServiceScaleOnlyUpdateKeepsTheReplicas(t *testing.T) {
	ctl := func(replicas int32, cmd string) *controlpb.JobSpec {
		return must(twin[controlpb.JobSpec](serviceSpec(t, "svc", replicas, cmd)))
	}
	if !ScaleOnly(ctl(2, "srv"), ctl(3, "srv")) || ScaleOnly(ctl(2, "srv"), ctl(3, "srv-v2")) || ScaleOnly(ctl(2, "srv"), ctl(2, "srv-v2")) {
		t.Fatal("ScaleOnly: want true for a new count alone, false when the command changes")
	}
	s := newSim(t, "a", "b", "c", "d")
	s.registerService("svc", 2)
	s.step("svc")
	s.serveAll("svc")
	olds := s.liveIDs("svc")
	before := s.job("svc").SpecGeneration
	if r := s.updateServiceKeep("svc", serviceSpec(t, "svc", 3, "srv"), true); r != nil {
		t.Fatalf("update: %v", r)
	}
	if j := s.job("svc"); j.SpecGeneration != before || j.Spec.GetReplicas() != 3 {
		t.Fatalf("after scaling: spec generation %d (was %d), replicas %d", j.SpecGeneration, before, j.Spec.GetReplicas())
	}
	s.step("svc")
	s.serveAll("svc")
	s.step("svc")
	live := s.live("svc")
	kept := 0
	for id := range s.liveIDs("svc") {
		if olds[id] {
			kept++
		}
	}
	if len(live) != 3 || kept != 2 || s.healthyCount("svc") != 3 {
		t.Fatalf("after scaling to 3: %v (%d of the 2 first replicas kept, %d healthy)", live, kept, s.healthyCount("svc"))
	}
	// Without keep_generation (a log written before it, or a real change)
	// the same spec is a rolling update.
	if r := s.updateService("svc", serviceSpec(t, "svc", 3, "srv-v2")); r != nil {
		t.Fatalf("update: %v", r)
	}
	if j := s.job("svc"); j.SpecGeneration != j.Generation+1 {
		t.Fatalf("a changed command: spec generation %d, job generation %d; want a rolling update", j.SpecGeneration, j.Generation)
	}
}
