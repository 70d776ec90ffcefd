package consensus

import (
	"fmt"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// registerScaled registers a service scaled by load: min..max replicas,
// target in flight per replica, scale-in cooldown.
func (s *sim) registerScaled(id string, lo, hi int, target float64, cooldown time.Duration) {
	s.t.Helper()
	spec, err := jobspec.Parse(fmt.Appendf(nil, "name: %s\ntype: service\nplacement: spread\nexec: {command: [srv]}\nservice: {min_replicas: %d, max_replicas: %d, target_in_flight: %g, scale_in_cooldown: %s}\n", id, lo, hi, target, cooldown))
	if err != nil {
		s.t.Fatal(err)
	}
	logSpec, err := twin[fsmpb.JobSpec](spec)
	if err != nil {
		s.t.Fatal(err)
	}
	s.apply(&fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: logSpec}}})
}

// liveSlots returns the slots that hold a replica told to run.
func (s *sim) liveSlots(id string) int { return len(s.live(id)) }

// A service scaled by load grows to max_replicas while the routers report
// more in flight than the target, not twice for one burst (it waits for
// the replicas it added), holds while the load hovers at the target,
// keeps its replicas through the cooldown once the load stops, then
// shrinks to min_replicas, its extra replicas told to stop (drained).
func TestServiceScalesByLoad(t *testing.T) {
	s := newSim(t, "a", "b", "c", "d")
	loads := NewLoadTable(s.now)
	s.load = loads
	report := func(v float64) { loads.Report("router", map[string]float64{"svc": v}, s.now) }
	s.registerScaled("svc", 1, 4, 2, time.Minute)
	s.step("svc")
	s.serveAll("svc")
	if n := s.liveSlots("svc"); n != 1 {
		t.Fatalf("started with %d replicas, want min_replicas 1", n)
	}
	// Hovering at the target (within 10%): nothing moves.
	report(2.1)
	if d := s.step("svc"); d.Plan != nil || d.WakeAt.IsZero() {
		t.Fatalf("a load at the target changed the service: %v (wake %v)", d.Plan, d.WakeAt)
	}
	// 5 in flight for a target of 2: 3 replicas.
	s.now = s.now.Add(time.Second)
	report(5)
	if d := s.step("svc"); d.Note == "" {
		t.Fatalf("scaling out says nothing for the log: %+v", d)
	}
	if n, ws := s.liveSlots("svc"), s.job("svc").WorldSize; n != 3 || ws != 3 {
		t.Fatalf("after 5 in flight: %d replicas (world size %d), want 3", n, ws)
	}
	// The new replicas' WORLD_SIZE is the new count (the agent refuses a
	// rank outside its world: the old count would fail them at start).
	for _, as := range s.live("svc") {
		for _, a := range as {
			if a.Generation > 1 && a.WorldSize != 3 {
				t.Fatalf("replica %d placed by the scale-out has world size %d, want 3", a.Rank, a.WorldSize)
			}
		}
	}
	// More load while the new replicas start: they are waited for.
	s.now = s.now.Add(time.Second)
	report(20)
	s.step("svc")
	if n := s.liveSlots("svc"); n != 3 {
		t.Fatalf("scaled again while replicas were starting: %d replicas", n)
	}
	s.serveAll("svc")
	s.now = s.now.Add(time.Second)
	report(20)
	s.step("svc")
	s.serveAll("svc")
	if n := s.liveSlots("svc"); n != 4 {
		t.Fatalf("20 in flight: %d replicas, want max_replicas 4", n)
	}
	// The load stops: nothing is removed within the cooldown.
	for i := 0; i < 50; i++ {
		s.now = s.now.Add(time.Second)
		report(0)
		s.step("svc")
	}
	if n := s.liveSlots("svc"); n != 4 {
		t.Fatalf("%d replicas 50s after the load stopped, cooldown 1m: want 4", n)
	}
	for i := 0; i < 15; i++ {
		s.now = s.now.Add(time.Second)
		report(0)
		s.step("svc")
	}
	live := s.live("svc")
	if len(live) != 1 || len(live[0]) != 1 || s.job("svc").WorldSize != 1 {
		t.Fatalf("after the cooldown: %v, want slot 0 alone", live)
	}
	for _, a := range s.f.State().Allocations("svc") {
		if a.Rank > 0 && a.DesiredStatus != DesiredStop {
			t.Fatalf("replica %s of a removed slot is not told to stop", a.Id)
		}
	}
}

// A new leader knows no load history: it removes no replica until it has
// listened for a whole cooldown, and a router gone silent stops counting.
func TestServiceScaleInWaitsForAFullWindow(t *testing.T) {
	s := newSim(t, "a", "b", "c")
	loads := NewLoadTable(s.now)
	s.load = loads
	s.registerScaled("svc", 1, 3, 1, time.Minute)
	s.step("svc")
	s.serveAll("svc")
	loads.Report("r1", map[string]float64{"svc": 2}, s.now)
	loads.Report("r2", map[string]float64{"svc": 2}, s.now)
	s.step("svc")
	s.serveAll("svc")
	if n := s.liveSlots("svc"); n != 3 {
		t.Fatalf("4 in flight for a target of 1: %d replicas, want 3", n)
	}
	// Leadership moves: the new leader's table starts empty.
	s.now = s.now.Add(10 * time.Second)
	loads.Reset(s.now)
	for i := 0; i < 59; i++ {
		s.now = s.now.Add(time.Second)
		loads.Report("r1", map[string]float64{"svc": 0}, s.now)
		s.step("svc")
	}
	if n := s.liveSlots("svc"); n != 3 {
		t.Fatalf("a leader that listened 59s of a 1m cooldown removed replicas: %d left", n)
	}
	s.now = s.now.Add(2 * time.Second)
	s.step("svc")
	if n := s.liveSlots("svc"); n != 1 {
		t.Fatalf("after a full quiet window: %d replicas, want 1", n)
	}
}

func TestLoadTableSumsFreshReports(t *testing.T) {
	t0 := time.Date(2026, 12, 7, 6, 0, 0, 0, time.UTC)
	lt := NewLoadTable(t0)
	lt.Report("r1", map[string]float64{"a": 3, "b": 1}, t0)
	lt.Report("r2", map[string]float64{"a": 2}, t0.Add(time.Second))
	if got := lt.InFlight("a", t0.Add(time.Second)); got != 5 {
		t.Fatalf("a: %g in flight, want 5", got)
	}
	// r1 no longer reports b: its share is gone.
	lt.Report("r1", map[string]float64{"a": 3}, t0.Add(2*time.Second))
	if got := lt.InFlight("b", t0.Add(2*time.Second)); got != 0 {
		t.Fatalf("b: %g in flight after its router dropped it", got)
	}
	// r2 falls silent: it stops counting after LoadFresh.
	later := t0.Add(time.Second + LoadFresh + time.Millisecond)
	if got := lt.InFlight("a", later); got != 3 {
		t.Fatalf("a: %g in flight with r2 silent, want 3", got)
	}
	if peak, ok := lt.PeakInFlight("a", t0, later); peak != 5 || !ok {
		t.Fatalf("peak of a: %g (covered %v), want 5", peak, ok)
	}
	if _, ok := lt.PeakInFlight("a", t0.Add(-time.Second), later); ok {
		t.Fatalf("a window older than the table is said to be covered")
	}
	// A service no router names any more is forgotten after loadKeep.
	lt.Report("r1", map[string]float64{"c": 1}, t0.Add(loadKeep+time.Minute))
	if _, ok := lt.peaks["b"]; ok || len(lt.peaks) != 2 {
		t.Fatalf("the history of b, unreported for over %s, is kept (%d services known, want a and c)", loadKeep, len(lt.peaks))
	}
}
