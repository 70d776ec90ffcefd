package consensus

import (
	"bytes"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// backoffSpec is a one-replica service whose slot backs off from 2s to at
// most 16s and starts its count again after a replica healthy for 1m.
func backoffSpec(t *testing.T, cmd string) *fsmpb.JobSpec {
	t.Helper()
	spec, err := jobspec.Parse(fmt.Appendf(nil, "name: svc\ntype: service\nreplicas: 1\nrestart: {delay: 2s, max_delay: 16s, reset_after: 1m}\nexec: {command: [%s]}\n", cmd))
	if err != nil {
		t.Fatal(err)
	}
	return must(twin[fsmpb.JobSpec](spec))
}

func (s *sim) registerSpec(id string, spec *fsmpb.JobSpec) {
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: spec}}})
}

// only returns the one live replica of slot 0, failing the test otherwise.
func (s *sim) only(id string) *controlpb.Allocation {
	s.t.Helper()
	live := s.live(id)[0]
	if len(live) != 1 {
		s.t.Fatalf("slot 0 holds %d replicas told to run, want 1: %v", len(live), live)
	}
	return live[0]
}

// crash plays a replica that starts and exits with 1 at once, never
// healthy, and returns when the scheduler places its successor: the wait
// it asked for since the end, and the successor.
func (s *sim) crash(id string) (time.Duration, *controlpb.Allocation) {
	s.t.Helper()
	a := s.only(id)
	s.report(a.Id, AllocRunning, 0)
	s.health(a.Id, HealthStarting)
	s.report(a.Id, AllocFailed, 1)
	end := s.now
	d := s.step(id)
	if len(s.live(id)[0]) != 0 {
		s.t.Fatalf("a failed replica was replaced at once")
	}
	wait := d.WakeAt.Sub(end)
	// One tick before the wake: nothing yet, even for an evaluation
	// woken by something else.
	s.now = d.WakeAt.Add(-time.Millisecond)
	s.step(id)
	if len(s.live(id)[0]) != 0 {
		s.t.Fatalf("replaced %s after the end, before the back-off's %s", s.now.Sub(end), wait)
	}
	s.now = d.WakeAt
	s.step(id)
	return wait, s.only(id)
}

// A replica slot whose replicas keep failing before they are healthy
// waits twice as long after each failure in a row, up to max_delay; job
// status's reason and ServiceBackoffs say it is crash-looping, how often
// in a row and when the next try is. A replica that stays healthy for
// reset_after starts the count again; one healthy for less does not.
func TestServiceCrashLoopBacksOff(t *testing.T) {
	s := newSim(t, "a", "b")
	s.registerSpec("svc", backoffSpec(t, "srv"))
	s.step("svc")
	for i, want := range []time.Duration{2, 4, 8, 16, 16} {
		want *= time.Second
		wait, next := s.crash("svc")
		if wait != want {
			t.Fatalf("failure %d in a row: the next replica waited %s, want %s", i+1, wait, want)
		}
		if next.SlotFailures != int32(i+1) {
			t.Fatalf("failure %d in a row: the next replica carries slot_failures %d", i+1, next.SlotFailures)
		}
	}
	// Waiting after the sixth: shown.
	a := s.only("svc")
	s.report(a.Id, AllocFailed, 1)
	s.step("svc")
	j := s.job("svc")
	if !strings.Contains(j.StatusReason, "replica 0 is crash-looping (6 failures in a row); next try at") {
		t.Fatalf("job status reason %q does not say the replica is crash-looping", j.StatusReason)
	}
	bs := ServiceBackoffs(j, s.f.State().Allocations("svc"), s.now)
	if len(bs) != 1 || bs[0].Slot != 0 || bs[0].Failures != 6 || !bs[0].Waiting || !bs[0].NextTry.Equal(s.now.Add(16*time.Second)) || bs[0].Delay != 16*time.Second {
		t.Fatalf("ServiceBackoffs: %+v", bs)
	}
	s.now = s.now.Add(16 * time.Second)
	s.step("svc")

	// Healthy for less than reset_after: still in the loop.
	a = s.only("svc")
	s.health(a.Id, HealthHealthy)
	s.now = s.now.Add(30 * time.Second)
	s.report(a.Id, AllocFailed, 1)
	if d := s.step("svc"); d.WakeAt.Sub(s.now) != 16*time.Second {
		t.Fatalf("a replica healthy for 30s (reset_after 1m) ended: next try in %s, want 16s", d.WakeAt.Sub(s.now))
	}
	s.now = s.now.Add(16 * time.Second)
	s.step("svc")

	// Healthy for reset_after: the count starts again with its end.
	a = s.only("svc")
	s.health(a.Id, HealthHealthy)
	s.now = s.now.Add(30 * time.Second)
	s.health(a.Id, HealthUnhealthy) // healthy_time is the first healthy report
	s.health(a.Id, HealthHealthy)
	if bs := ServiceBackoffs(s.job("svc"), s.f.State().Allocations("svc"), s.now); len(bs) != 1 || bs[0].Failures != 7 || bs[0].Waiting {
		t.Fatalf("while the replica runs healthy for less than reset_after: %+v", bs)
	}
	s.now = s.now.Add(30 * time.Second)
	if bs := ServiceBackoffs(s.job("svc"), s.f.State().Allocations("svc"), s.now); len(bs) != 0 {
		t.Fatalf("a replica healthy for reset_after still shows a crash loop: %+v", bs)
	}
	s.report(a.Id, AllocFailed, 1)
	if d := s.step("svc"); d.WakeAt.Sub(s.now) != 2*time.Second {
		t.Fatalf("after a replica healthy for reset_after: next try in %s, want restart.delay 2s", d.WakeAt.Sub(s.now))
	}
	s.now = s.now.Add(2 * time.Second)
	s.step("svc")
	if got := s.only("svc").SlotFailures; got != 1 {
		t.Fatalf("after the reset the replica carries slot_failures %d, want 1", got)
	}
	if j := s.job("svc"); j.Status != JobRunning || j.Restarts != 0 {
		t.Fatalf("a crash-looping service is %s with %d restarts; services never fail", j.Status, j.Restarts)
	}
}

// The back-off lives in the Raft state: a new leader (a fresh FSM restored
// from a snapshot taken mid-back-off) waits for the same next try and gives
// the next replica the same count.
func TestServiceCrashLoopSurvivesLeaderChange(t *testing.T) {
	s := newSim(t, "a", "b")
	s.registerSpec("svc", backoffSpec(t, "srv"))
	s.step("svc")
	for range 3 {
		s.crash("svc")
	}
	a := s.only("svc")
	s.report(a.Id, AllocFailed, 1)
	end := s.now
	d := s.step("svc")
	if d.WakeAt.Sub(end) != 16*time.Second {
		t.Fatalf("4th failure in a row: wait %s, want 16s", d.WakeAt.Sub(end))
	}
	g := NewFSM(nil)
	if err := g.Restore(io.NopCloser(bytes.NewReader(snapshotBytes(t, s.f)))); err != nil {
		t.Fatal(err)
	}
	s.f = g
	s.now = end.Add(10 * time.Second)
	if d := s.step("svc"); len(s.live("svc")[0]) != 0 || !d.WakeAt.Equal(end.Add(16*time.Second)) {
		t.Fatalf("the new leader placed early or forgot the back-off: wake %v, want %v; %v", d.WakeAt, end.Add(16*time.Second), s.live("svc")[0])
	}
	s.now = end.Add(16 * time.Second)
	s.step("svc")
	if got := s.only("svc").SlotFailures; got != 4 {
		t.Fatalf("the new leader's replica carries slot_failures %d, want 4", got)
	}
}

// Ends that are not the replica's fault (its node lost, a drain) neither
// add to the count nor reset it; a rolling update to a new spec starts it
// again (the old spec's failures are not the new one's).
func TestServiceCrashLoopCountsOnlyOwnFailures(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	s.registerSpec("svc", backoffSpec(t, "srv"))
	s.step("svc")
	s.crash("svc")
	_, a := s.crash("svc")
	if a.SlotFailures != 2 {
		t.Fatalf("slot_failures %d after two failures", a.SlotFailures)
	}
	// Its node is lost: replaced with the same count.
	s.report(a.Id, AllocRunning, 0)
	s.nodeStatus(a.NodeId, NodeDown)
	s.now = s.now.Add(time.Minute)
	s.step("svc")
	if got := s.f.State().Allocation(a.Id).ClientStatus; got != AllocLost {
		t.Fatalf("the replica on the silent node is %s", got)
	}
	s.now = s.now.Add(2 * time.Second)
	s.step("svc")
	b := s.only("svc")
	if b.SlotFailures != 2 {
		t.Fatalf("after a lost node the replica carries slot_failures %d, want 2 (unchanged)", b.SlotFailures)
	}
	// Its node drains: the replacement carries the count, and the
	// replica stopped after it is healthy adds nothing.
	s.serveAll("svc")
	s.nodeStatus(b.NodeId, NodeDraining)
	s.step("svc")
	var c *controlpb.Allocation
	for _, x := range s.live("svc")[0] {
		if x.Id != b.Id {
			c = x
		}
	}
	if c == nil || c.SlotFailures != 2 {
		t.Fatalf("the drain's replacement: %v, want slot_failures 2", c)
	}
	s.serveAll("svc")
	s.step("svc")
	s.report(b.Id, AllocStopped, -1)
	s.step("svc")
	if bs := ServiceBackoffs(s.job("svc"), s.f.State().Allocations("svc"), s.now); len(bs) != 1 || bs[0].Failures != 2 || bs[0].Waiting {
		t.Fatalf("after the drain: %+v, want 2 failures in a row, not waiting", bs)
	}
	// A new spec: its first replica's failure is its first.
	s.report(c.Id, AllocFailed, 1)
	s.step("svc")
	if res := s.updateService("svc", backoffSpec(t, "srv2")); res != nil {
		if err, ok := res.(error); ok {
			t.Fatal(err)
		}
	}
	end := s.now
	d := s.step("svc")
	if len(s.live("svc")[0]) == 0 {
		if d.WakeAt.Sub(end) > 2*time.Second {
			t.Fatalf("after a spec update the slot waits %s, want at most restart.delay", d.WakeAt.Sub(end))
		}
		s.now = d.WakeAt
		s.step("svc")
	}
	if got := s.only("svc"); got.SlotFailures != 0 || got.Generation < s.job("svc").SpecGeneration {
		t.Fatalf("the new spec's first replica: %v, want slot_failures 0", got)
	}
}

// The FSM records when a replica was first healthy, at the commit of that
// report, and keeps it through later health changes.
func TestFSMRecordsFirstHealthyTime(t *testing.T) {
	s := newSim(t, "a")
	s.registerSpec("svc", backoffSpec(t, "srv"))
	s.step("svc")
	a := s.only("svc")
	s.report(a.Id, AllocRunning, 0)
	s.health(a.Id, HealthStarting)
	if got := s.f.State().Allocation(a.Id).HealthyTime; got != nil {
		t.Fatalf("healthy_time %v before any healthy report", got)
	}
	first := s.now.Add(time.Second)
	s.now = first
	s.health(a.Id, HealthHealthy)
	s.now = s.now.Add(time.Second)
	s.health(a.Id, HealthUnhealthy)
	s.health(a.Id, HealthHealthy)
	if got := s.f.State().Allocation(a.Id).HealthyTime; got == nil || !got.AsTime().Equal(first) {
		t.Fatalf("healthy_time %v, want the first healthy report's %v", got, first)
	}
}

// The back-off's numbers: doubling from restart.delay, capped, defaults
// when the spec leaves them out, and never below restart.delay.
func TestBackoffPolicy(t *testing.T) {
	b := serviceBackoff(&controlpb.JobSpec{Type: jobspec.TypeService})
	if b.delay != DefaultRestartDelay || b.max != jobspec.DefaultRestartMaxDelay || b.resetAfter != jobspec.DefaultRestartResetAfter {
		t.Fatalf("defaults: %+v", b)
	}
	for n, want := range map[int]time.Duration{0: 5 * time.Second, 1: 5 * time.Second, 2: 10 * time.Second, 7: 5 * time.Minute, 1000: 5 * time.Minute} {
		if got := b.wait(n); got != want {
			t.Errorf("wait(%d) = %s, want %s", n, got, want)
		}
	}
	zero := backoffPolicy{delay: 0, max: time.Minute}
	if got := zero.wait(10); got != 0 {
		t.Errorf("restart.delay 0 backs off to %s; want 0 (no back-off)", got)
	}
}

// The job's status reason says "crash-looping" from CrashLoopAt failures in
// a row, as every command does; before that it counts the failures.
func TestServiceCrashLoopReasonFromCrashLoopAt(t *testing.T) {
	s := newSim(t, "a")
	s.registerSpec("svc", backoffSpec(t, "srv"))
	s.step("svc")
	for n := 1; n <= CrashLoopAt; n++ {
		a := s.only("svc")
		s.report(a.Id, AllocRunning, 0)
		s.report(a.Id, AllocFailed, 1)
		d := s.step("svc")
		reason := s.job("svc").StatusReason
		want := "replica 0 ended; replacing it at"
		switch {
		case n >= CrashLoopAt:
			want = fmt.Sprintf("replica 0 is crash-looping (%d failures in a row); next try at", n)
		case n > 1:
			want = fmt.Sprintf("replica 0 ended, %d failures in a row; replacing it at", n)
		}
		if !strings.HasPrefix(reason, want) {
			t.Fatalf("after %d failures in a row: reason %q, want %q...", n, reason, want)
		}
		s.now = d.WakeAt
		s.step("svc")
	}
}
