package consensus

import (
	"bytes"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// gcAllocs plays the leader's allocation GC for one job at s.now: what
// allocsToPurge lets go, as one PurgeAllocations entry. It returns how
// many the FSM removed.
func (s *sim) gcAllocs(id string, keep int, maxAge time.Duration) int {
	s.t.Helper()
	ids := allocsToPurge(s.job(id), s.f.State().Allocations(id), keep, maxAge, s.now)
	if len(ids) == 0 {
		return 0
	}
	n := s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_PurgeAllocations{PurgeAllocations: &fsmpb.PurgeAllocations{Ids: ids}}}).(int)
	if n != len(ids) {
		s.t.Fatalf("the FSM removed %d of the %d allocations the rule let go: %v", n, len(ids), ids)
	}
	return n
}

// replay applies the sim's log to a fresh FSM, as a follower would.
func (s *sim) replay() *FSM {
	f := NewFSM(nil)
	for _, l := range s.log {
		if err, ok := f.Apply(l).(error); ok {
			s.t.Fatalf("replay of entry %d: %v", l.Index, err)
		}
	}
	return f
}

// liveIn returns the replica of slot r told to run that has not ended, or
// nil.
func (s *sim) liveIn(id string, r int32) *controlpb.Allocation {
	for _, a := range s.live(id)[r] {
		if !AllocTerminal(a.ClientStatus) {
			return a
		}
	}
	return nil
}

// crashLoop drives a two-replica service whose replicas fail before they
// are healthy, slot 1 a second after slot 0, for rounds rounds (in every
// tenth, slot 0's replica stays healthy for reset_after first, which
// starts its count again). After every evaluation gc runs, if not nil. It
// returns what the scheduler decided and showed after each evaluation, and
// the most allocations the job held.
func crashLoop(s *sim, rounds int, gc func(*sim)) (trace []string, most int) {
	t := s.t
	t.Helper()
	spec, err := jobspec.Parse([]byte("name: svc\ntype: service\nreplicas: 2\nplacement: spread\nrestart: {delay: 2s, max_delay: 16s, reset_after: 1m}\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	s.registerSpec("svc", must(twin[fsmpb.JobSpec](spec)))
	step := func() Decision {
		t.Helper()
		d := s.step("svc")
		if gc != nil {
			gc(s)
		}
		// What the scheduler would decide if anything woke it now, after
		// the purge.
		again := s.eval("svc")
		j := s.job("svc")
		all := s.f.State().Allocations("svc")
		var live, backoffs []string
		for _, a := range all {
			if a.DesiredStatus == DesiredRun {
				live = append(live, fmt.Sprintf("%d:%s:%s:%d", a.Rank, a.Id, a.ClientStatus, a.SlotFailures))
			}
		}
		for _, b := range ServiceBackoffs(j, all, s.now) {
			backoffs = append(backoffs, fmt.Sprintf("%d:%d:%t:%s:%s", b.Slot, b.Failures, b.Waiting, b.NextTry.Format(time.RFC3339Nano), b.Delay))
		}
		trace = append(trace, fmt.Sprintf("%s gen %d wake %s again %s %v reason %q live %v backoffs %v",
			s.now.Format(time.RFC3339Nano), j.Generation, d.WakeAt.Format(time.RFC3339Nano), again.WakeAt.Format(time.RFC3339Nano), again.Plan != nil, j.StatusReason, live, backoffs))
		most = max(most, len(all))
		return d
	}
	step()
	for round := 0; round < rounds; round++ {
		var rep [2]*controlpb.Allocation
		for r := range int32(2) {
			if rep[r] = s.liveIn("svc", r); rep[r] == nil {
				t.Fatalf("round %d: slot %d has no replica", round, r)
			}
			s.report(rep[r].Id, AllocRunning, 0)
		}
		if round%10 == 9 {
			s.health(rep[0].Id, HealthHealthy)
			s.now = s.now.Add(61 * time.Second)
		}
		s.report(rep[0].Id, AllocFailed, 1)
		step()
		s.now = s.now.Add(time.Second)
		s.report(rep[1].Id, AllocFailed, 1)
		d := step()
		for i := 0; s.liveIn("svc", 0) == nil || s.liveIn("svc", 1) == nil; i++ {
			if i > 10 || d.WakeAt.IsZero() {
				t.Fatalf("round %d: the slots are not both replaced (wake %s)", round, d.WakeAt)
			}
			s.now = d.WakeAt
			d = step()
		}
	}
	return trace, most
}

// Allocation GC of a crash-looping service keeps a bounded number of its
// allocations, and the scheduler decides exactly what it decides without
// GC: the same back-off after every failure, the same slot_failures on
// every replica, the same reasons and ServiceBackoffs, with or without an
// age limit. A rule that let the slots' newest ended replicas go would not
// (the control below), so this test sees it when GC drops what the back-off
// is derived from. Followers applying the same entries, and a snapshot
// restored after the purges, hold the same state.
func TestAllocGCCrashLoopingServiceKeepsItsBackoff(t *testing.T) {
	const rounds = 40
	want, grown := crashLoop(newSim(t, "a", "b", "c"), rounds, nil)
	if grown < 2*rounds {
		t.Fatalf("without GC the service held at most %d allocations after %d rounds; the test does not grow it", grown, rounds)
	}
	for _, c := range []struct {
		name   string
		keep   int
		maxAge time.Duration
	}{{"keep 1", 1, 0}, {"keep 3", 3, 0}, {"keep 3, 30s age", 3, 30 * time.Second}} {
		t.Run(c.name, func(t *testing.T) {
			s := newSim(t, "a", "b", "c")
			got, most := crashLoop(s, rounds, func(s *sim) { s.gcAllocs("svc", c.keep, c.maxAge) })
			for i := range want {
				if i >= len(got) || got[i] != want[i] {
					t.Fatalf("evaluation %d differs with GC:\n got %v\nwant %s", i, got[min(i, len(got)-1):min(i+1, len(got))], want[i])
				}
			}
			if len(got) != len(want) {
				t.Fatalf("%d evaluations with GC, %d without", len(got), len(want))
			}
			// Per slot: the live replica, the newest keep ended ones and
			// the one that ended last.
			if bound := 2 * (c.keep + 2); most > bound {
				t.Fatalf("with GC the service held %d allocations, want at most %d", most, bound)
			}
			// The back-off kept growing: slot 1 failed every round in a row.
			if a := s.liveIn("svc", 1); a == nil || a.SlotFailures != rounds {
				t.Fatalf("slot 1's replica after %d failures in a row: %v", rounds, a)
			}
			// Followers applying the same entries drop the same ones.
			if !bytes.Equal(snapshotBytes(t, s.f), snapshotBytes(t, s.replay())) {
				t.Fatal("a follower applying the same entries holds another state")
			}
			// A snapshot taken after the purges restores to the same state,
			// which the rule finds nothing more to purge in.
			restored := NewFSM(nil)
			if err := restored.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, s.f)))); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(snapshotBytes(t, s.f), snapshotBytes(t, restored)) {
				t.Fatal("the restored snapshot differs")
			}
			st := restored.State()
			if ids := allocsToPurge(st.Job("svc"), st.Allocations("svc"), c.keep, c.maxAge, s.now); len(ids) != 0 {
				t.Fatalf("after restore the rule lets %v go again", ids)
			}
			if len(st.AllocationsByNode("a"))+len(st.AllocationsByNode("b"))+len(st.AllocationsByNode("c")) != len(st.Allocations("svc")) {
				t.Fatal("the node index of the restored state disagrees with the job's")
			}
		})
	}
	// The control: dropping every ended allocation of an older generation
	// (the slots' newest ones included) changes what the scheduler does.
	naive := func(s *sim) {
		j := s.job("svc")
		var ids []string
		for _, a := range s.f.State().Allocations("svc") {
			if allocPurgeable(j, a) {
				ids = append(ids, a.Id)
			}
		}
		if len(ids) > 0 {
			s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_PurgeAllocations{PurgeAllocations: &fsmpb.PurgeAllocations{Ids: ids}}})
		}
	}
	if got, _ := crashLoop(newSim(t, "a", "b", "c"), rounds, naive); slices.Equal(got, want) {
		t.Fatal("dropping the slots' newest ended replicas left the scheduler's decisions unchanged: the test cannot see GC break the back-off")
	}
}

// restartLoop drives a two-rank exec job with restart.attempts 10: in
// every third round rank 1 fails (counted), in the others its node loses it
// (not counted), until the job fails. After every evaluation gc runs, if
// not nil. It returns what the scheduler decided and showed after each
// evaluation, and the most allocations the job held.
func restartLoop(s *sim, gc func(*sim)) (trace []string, most int) {
	t := s.t
	t.Helper()
	s.register("j", 2, 10)
	step := func() Decision {
		t.Helper()
		d := s.step("j")
		if gc != nil {
			gc(s)
		}
		again := s.eval("j") // as if anything woke the scheduler now
		j := s.job("j")
		trace = append(trace, fmt.Sprintf("%s %s gen %d restarts %d cause %q next %v wake %s again %s %v reason %q",
			s.now.Format(time.RFC3339Nano), j.Status, j.Generation, j.Restarts, j.EndCause, j.NextAttemptTime.AsTime(), d.WakeAt.Format(time.RFC3339Nano),
			again.WakeAt.Format(time.RFC3339Nano), again.Plan != nil, j.StatusReason))
		most = max(most, len(s.f.State().Allocations("j")))
		return d
	}
	step()
	for round := 0; !JobTerminal(s.job("j").Status); round++ {
		if round > 100 {
			t.Fatalf("the job did not fail after %d rounds: %v", round, s.job("j"))
		}
		s.runAll("j")
		for _, a := range s.gen("j") {
			if a.Rank != 1 {
				continue
			}
			if round%3 == 2 {
				s.report(a.Id, AllocFailed, 3)
			} else {
				s.report(a.Id, AllocLost, -1)
			}
		}
		d := step()
		for i := 0; s.job("j").Status == JobPending; i++ {
			s.stopAll("j")
			if d = step(); s.job("j").Status != JobPending {
				break
			}
			if i > 10 || d.WakeAt.IsZero() {
				t.Fatalf("round %d: the job is not placed again: %v", round, s.job("j"))
			}
			s.now = d.WakeAt
		}
	}
	return trace, most
}

// Allocation GC of an exec job restarted many times keeps a bounded number
// of its allocations, and the job restarts and fails exactly as without GC:
// node losses are not counted, failures are, and the eleventh fails it.
func TestAllocGCRestartedExecJobCountsRestartsAsBefore(t *testing.T) {
	want, grown := restartLoop(newSim(t, "a", "b", "c"), nil)
	s := newSim(t, "a", "b", "c")
	const keep = 2
	got, most := restartLoop(s, func(s *sim) { s.gcAllocs("j", keep, time.Minute) })
	if !slices.Equal(got, want) {
		for i := range min(len(got), len(want)) {
			if got[i] != want[i] {
				t.Fatalf("evaluation %d differs with GC:\n got %s\nwant %s", i, got[i], want[i])
			}
		}
		t.Fatalf("%d evaluations with GC, %d without", len(got), len(want))
	}
	j := s.job("j")
	if j.Status != JobFailed || j.Restarts != 10 || !strings.Contains(j.StatusReason, "restart attempts exhausted (10 of 10)") {
		t.Fatalf("the job did not fail on its 11th failure: %v", j)
	}
	if j.Generation < 30 || grown < 60 {
		t.Fatalf("generation %d, %d allocations without GC: the test does not restart the job often", j.Generation, grown)
	}
	if bound := 2 * (keep + 2); most > bound {
		t.Fatalf("with GC the job held %d allocations, want at most %d", most, bound)
	}
	if !bytes.Equal(snapshotBytes(t, s.f), snapshotBytes(t, s.replay())) {
		t.Fatal("a follower applying the same entries holds another state")
	}
}

// The retention rule, case by case, and the FSM's own check: it removes
// only ended allocations told to stop of a generation before the job's.
func TestAllocsToPurgeRule(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC)
	at := func(min int) *timestamppb.Timestamp { return timestamppb.New(t0.Add(time.Duration(min) * time.Minute)) }
	ended := func(gen uint64, rank int32, finish int) *controlpb.Allocation {
		return &controlpb.Allocation{Id: fmt.Sprintf("j.%d.%d", gen, rank), JobId: "j", Generation: gen, Rank: rank,
			DesiredStatus: DesiredStop, ClientStatus: AllocFailed, FinishTime: at(finish)}
	}
	job := &controlpb.Job{Id: "j", Status: JobRunning, Generation: 9}
	allocs := []*controlpb.Allocation{
		// Slot 0: generations 1..5 ended in order, 9 runs.
		ended(1, 0, 1), ended(2, 0, 2), ended(3, 0, 3), ended(4, 0, 4), ended(5, 0, 5),
		{Id: "j.9.0", JobId: "j", Generation: 9, Rank: 0, DesiredStatus: DesiredRun, ClientStatus: AllocRunning},
		// Slot 1: generation 3 ended last (a drained replica stopped after
		// its replacement failed), 6 and 7 before it; 8 ended but is not
		// told to stop yet.
		ended(3, 1, 60), ended(6, 1, 50), ended(7, 1, 55),
		func() *controlpb.Allocation { a := ended(8, 1, 58); a.DesiredStatus = DesiredRun; return a }(),
		// Slot 2: one ended replica, of the current generation.
		ended(9, 2, 59),
		// Slot 3: generation 4 (the newest) ended before 2 (the last
		// ended), both long ago: the back-off reads both.
		ended(4, 3, 10), ended(2, 3, 20),
	}
	for _, c := range []struct {
		keep   int
		maxAge time.Duration
		want   []string
	}{
		{0, 0, nil},
		// Slot 0 keeps 5 (newest, last ended) and 4; slot 1 keeps 8
		// (newest, not told to stop), 7 (within keep) and 3 (last ended).
		{2, 0, []string{"j.1.0", "j.2.0", "j.3.0", "j.6.1"}},
		{1, 0, []string{"j.1.0", "j.2.0", "j.3.0", "j.4.0", "j.6.1", "j.7.1"}},
		{10, 0, nil},
		// Within keep 10 but ended more than 30 minutes before now (the
		// 61st minute): all but each slot's newest and last ended.
		{10, 30 * time.Minute, []string{"j.1.0", "j.2.0", "j.3.0", "j.4.0"}},
	} {
		got := allocsToPurge(job, allocs, c.keep, c.maxAge, t0.Add(61*time.Minute))
		if !slices.Equal(got, c.want) {
			t.Errorf("keep %d, max age %s: purge %v, want %v", c.keep, c.maxAge, got, c.want)
		}
	}
	if got := allocsToPurge(&controlpb.Job{Id: "j", Status: JobFailed, Generation: 9}, allocs, 1, 0, t0); got != nil {
		t.Errorf("the rule purges allocations of an ended job (job GC takes it whole): %v", got)
	}

	// The FSM removes only what allocPurgeable allows, and keeps its
	// indexes and the node's view in step.
	h := newFSMHarness(t)
	st := h.f.State()
	h.apply(nodesCmd(&fsmpb.Node{Id: "n1", Name: "one"}))
	h.apply(registerCmd("j", 1))
	plan := func(gen uint64, stop ...string) {
		j := st.Job("j")
		p := &fsmpb.JobPlan{JobId: "j", ExpectModifyIndex: j.ModifyIndex, Status: JobRunning, Generation: gen, WorldSize: 1, StopAllocIds: stop,
			Allocations: []*fsmpb.Allocation{{Id: fmt.Sprintf("j.%d.0", gen), JobId: "j", Generation: gen, Rank: 0, NodeId: "n1"}}}
		h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_ApplyPlans{ApplyPlans: &fsmpb.ApplyPlans{Plans: []*fsmpb.JobPlan{p}}}})
	}
	fail := func(id string) {
		h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{
			Allocations: []*fsmpb.Allocation{{Id: id, ClientStatus: AllocFailed, ExitCode: 1}}}}})
	}
	plan(1)
	fail("j.1.0")
	plan(2, "j.1.0")
	fail("j.2.0") // ended, not told to stop
	plan(3)       // j.3.0 runs: the current generation
	watchFrom := st.Index()
	purge := func(ids ...string) any {
		return h.apply(&fsmpb.Command{Cmd: &fsmpb.Command_PurgeAllocations{PurgeAllocations: &fsmpb.PurgeAllocations{Ids: ids}}})
	}
	if n := purge("j.1.0", "j.2.0", "j.3.0", "missing"); n != 1 {
		t.Fatalf("the FSM removed %v allocations, want 1 (j.1.0)", n)
	}
	if st.Allocation("j.1.0") != nil || st.Allocation("j.2.0") == nil || st.Allocation("j.3.0") == nil {
		t.Fatalf("after the purge: %v", st.Allocations("j"))
	}
	if got := st.AllocationsByNode("n1"); len(got) != 2 || len(st.Allocations("j")) != 2 {
		t.Fatalf("indexes after the purge: by node %v, by job %v", got, st.Allocations("j"))
	}
	ctx := ctxT(t)
	if idx, err := st.WaitNode(ctx, "n1", watchFrom); err != nil || idx != st.Index() {
		t.Fatalf("the node's view did not change with the purge: %d, %v", idx, err)
	}
	if j := st.Job("j"); j.ModifyIndex >= st.Index() {
		t.Fatal("the purge modified the job: a plan computed before it would be skipped")
	}
}

// twoReplicaSpec is a two-replica service whose slots back off from 2s to
// at most 16s.
func twoReplicaSpec(t *testing.T) *fsmpb.JobSpec {
	t.Helper()
	spec, err := jobspec.Parse([]byte("name: svc\ntype: service\nreplicas: 2\nplacement: spread\nrestart: {delay: 2s, max_delay: 16s, reset_after: 1m}\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	return must(twin[fsmpb.JobSpec](spec))
}

// drainThenCrash drives a two-replica service: slot 1's replica fails;
// slot 0's node drains, its replacement fails (the slot's newest replica,
// an own failure) and the drained replica is stopped after it (the slot's
// last end), so slot 0's next try is derived from two allocations, and
// slot 1 is placed again meanwhile (so both are of an older generation
// than the job's). Then both slots fail a few times more. After every
// evaluation gc runs, if not nil. It returns what the scheduler decided
// after each evaluation, and would decide right after the purge.
func drainThenCrash(s *sim, gc func(*sim)) []string {
	t := s.t
	t.Helper()
	s.registerSpec("svc", twoReplicaSpec(t))
	var trace []string
	step := func() Decision {
		t.Helper()
		d := s.step("svc")
		if gc != nil {
			gc(s)
		}
		again := s.eval("svc") // as if anything woke the scheduler now
		var live []string
		for _, a := range s.f.State().Allocations("svc") {
			if a.DesiredStatus == DesiredRun {
				live = append(live, fmt.Sprintf("%d:%s:%s:%d", a.Rank, a.Id, a.ClientStatus, a.SlotFailures))
			}
		}
		trace = append(trace, fmt.Sprintf("%s wake %s again %s %v reason %q live %v", s.now.Format(time.RFC3339Nano), d.WakeAt.Format(time.RFC3339Nano),
			again.WakeAt.Format(time.RFC3339Nano), again.Plan != nil, s.job("svc").StatusReason, live))
		return d
	}
	step()
	first, other := s.liveIn("svc", 0), s.liveIn("svc", 1)
	s.health(first.Id, HealthHealthy)
	s.health(other.Id, HealthHealthy)
	s.report(other.Id, AllocFailed, 1) // slot 1 waits 2s
	step()
	s.now = s.now.Add(500 * time.Millisecond)
	s.nodeStatus(first.NodeId, NodeDraining)
	step() // slot 0's replacement is placed elsewhere; the first serves on
	var repl *controlpb.Allocation
	for _, a := range s.live("svc")[0] {
		if a.Id != first.Id {
			repl = a
		}
	}
	if repl == nil {
		t.Fatal("no replacement for the drained replica")
	}
	s.now = s.now.Add(500 * time.Millisecond)
	s.report(repl.Id, AllocFailed, 1)
	step()
	s.now = s.now.Add(500 * time.Millisecond)
	s.report(first.Id, AllocStopped, -1) // its node stops it: slot 0's last end
	d := step()
	for round := 0; round < 4; round++ {
		for i := 0; s.liveIn("svc", 0) == nil || s.liveIn("svc", 1) == nil; i++ {
			if i > 10 || d.WakeAt.IsZero() {
				t.Fatalf("round %d: the slots are not both replaced", round)
			}
			s.now = d.WakeAt
			d = step()
		}
		for r := range int32(2) {
			a := s.liveIn("svc", r)
			s.report(a.Id, AllocRunning, 0)
			s.report(a.Id, AllocFailed, 1)
			d = step()
			s.now = s.now.Add(time.Second)
		}
	}
	return trace
}

// When a slot's newest replica and the one that ended last differ (a drain
// whose replacement failed), GC keeps both, also once another slot's
// placement made them older than the job's generation and the age limit
// has passed for both: the next try counts from the last end and the
// successor carries the newest one's failures, exactly as without GC.
// (Without the rule's "last ended" the next try moves earlier; without its
// "newest ended" the successor's slot_failures resets: both fail here.)
func TestAllocGCKeepsTheSlotsNewestAndLastEnded(t *testing.T) {
	want := drainThenCrash(newSim(t, "a", "b", "c"), nil)
	for _, c := range []struct {
		name   string
		keep   int
		maxAge time.Duration
	}{{"keep 1", 1, 0}, {"keep 3, 100ms age", 3, 100 * time.Millisecond}} {
		t.Run(c.name, func(t *testing.T) {
			s := newSim(t, "a", "b", "c")
			purged := 0
			got := drainThenCrash(s, func(s *sim) { purged += s.gcAllocs("svc", c.keep, c.maxAge) })
			if !slices.Equal(got, want) {
				for i := range min(len(got), len(want)) {
					if got[i] != want[i] {
						t.Fatalf("evaluation %d differs with GC:\n got %s\nwant %s", i, got[i], want[i])
					}
				}
				t.Fatalf("%d evaluations with GC, %d without", len(got), len(want))
			}
			if purged == 0 {
				t.Fatal("GC purged nothing: the test does not exercise it")
			}
		})
	}
}
