package consensus

import (
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/internal/controlpb"
)

// Scaling a service by load (service.max_replicas set).
const (
	// ScaleEvery is how often the leader reconsiders the replica count of
	// a service scaled by load; routers report their load as often.
	ScaleEvery = time.Second
	// LoadFresh is how long a router's report counts: a router silent for
	// longer (gone, or cut off) no longer adds to a service's load.
	LoadFresh = 3 * ScaleEvery
	// scaleOutTolerance: a load up to 10% above the target does not add a
	// replica (a load hovering at the target does not flap).
	scaleOutTolerance = 0.1
	// scaleInHeadroom: replicas are removed only down to a count that would
	// have carried the peak of the cooldown window at 80% of the target, so
	// a removal does not by itself push the load over the target again.
	scaleInHeadroom = 0.8
	// loadKeep bounds the history of a service's load that the leader keeps
	// (the longest scale_in_cooldown a spec may give: jobspec's
	// MaxScaleInCooldown).
	loadKeep = time.Hour
)

// LoadView is the load of services as the routers reported it: the
// leader's memory (LoadTable), not the replicated state. The Evaluator
// reads it to scale services by load. Its methods are safe for concurrent
// use.
type LoadView interface {
	// InFlight returns the requests in flight on jobID's replicas: the
	// sum, over every router heard from within LoadFresh, of its latest
	// report (each a time average over its report window).
	InFlight(jobID string, now time.Time) float64
	// PeakInFlight returns the highest InFlight seen since since, and
	// whether the reports cover all of that time (a new leader has not
	// listened long enough: false).
	PeakInFlight(jobID string, since, now time.Time) (float64, bool)
}

var _ LoadView = (*LoadTable)(nil)

// LoadTable holds the routers' latest load reports and, per service job,
// the peak of its summed load in every second, for an hour. The leader's
// Server owns one; ReportLoad fills it.
type LoadTable struct {
	mu    sync.Mutex
	since time.Time                  // when this table began listening
	nodes map[string]nodeLoad        // node ID → its latest report
	peaks map[string][]loadPeak      // job ID → per-second peaks, oldest first
	jobs  map[string]map[string]bool // job ID → nodes whose latest report names it
}

type nodeLoad struct {
	at       time.Time
	inFlight map[string]float64 // job ID → in flight
}

type loadPeak struct {
	sec int64 // Unix second
	v   float64
}

// NewLoadTable returns an empty table that listens from now.
func NewLoadTable(now time.Time) *LoadTable {
	t := &LoadTable{}
	t.Reset(now)
	return t
}

// Reset forgets every report and starts listening at now (a new leader).
func (t *LoadTable) Reset(now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.since = now
	t.nodes = map[string]nodeLoad{}
	t.peaks = map[string][]loadPeak{}
	t.jobs = map[string]map[string]bool{}
}

// Report records one router's load: in flight per service job ID, averaged
// over its report window. A job the node reported before and not now has
// no load from it any more.
func (t *LoadTable) Report(nodeID string, inFlight map[string]float64, now time.Time) {
	t.mu.Lock()
	defer t.mu.Unlock()
	touched := map[string]bool{}
	for id := range t.nodes[nodeID].inFlight {
		touched[id] = true
		delete(t.jobs[id], nodeID)
	}
	cp := make(map[string]float64, len(inFlight))
	for id, v := range inFlight {
		cp[id] = v
		touched[id] = true
		if t.jobs[id] == nil {
			t.jobs[id] = map[string]bool{}
		}
		t.jobs[id][nodeID] = true
	}
	t.nodes[nodeID] = nodeLoad{at: now, inFlight: cp}
	sec := now.Unix()
	for id := range touched {
		v := t.sumLocked(id, now)
		ps := t.peaks[id]
		if n := len(ps); n > 0 && ps[n-1].sec == sec {
			ps[n-1].v = math.Max(ps[n-1].v, v)
		} else {
			ps = append(ps, loadPeak{sec: sec, v: v})
		}
		cut := 0
		for cut < len(ps) && ps[cut].sec < sec-int64(loadKeep/time.Second) {
			cut++
		}
		t.peaks[id] = ps[cut:]
		if len(t.jobs[id]) == 0 {
			delete(t.jobs, id)
		}
	}
	// Forget services no router has named for loadKeep (stopped ones).
	for id, ps := range t.peaks {
		if len(ps) == 0 || ps[len(ps)-1].sec < sec-int64(loadKeep/time.Second) {
			delete(t.peaks, id)
		}
	}
}

func (t *LoadTable) sumLocked(jobID string, now time.Time) float64 {
	sum := 0.0
	for n := range t.jobs[jobID] {
		if r := t.nodes[n]; now.Sub(r.at) <= LoadFresh {
			sum += r.inFlight[jobID]
		}
	}
	return sum
}

// InFlight implements LoadView.
func (t *LoadTable) InFlight(jobID string, now time.Time) float64 {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.sumLocked(jobID, now)
}

// PeakInFlight implements LoadView.
func (t *LoadTable) PeakInFlight(jobID string, since, now time.Time) (float64, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	peak := t.sumLocked(jobID, now)
	for _, p := range t.peaks[jobID] {
		if p.sec >= since.Unix() {
			peak = math.Max(peak, p.v)
		}
	}
	return peak, !t.since.After(since)
}

// serviceReplicas returns how many replicas the service j should run now,
// and a note for the leader's log when that changes the count.
//
// A service with a fixed count runs spec.replicas. One scaled by load
// (service.max_replicas > 0) runs its current count (the job's world size),
// kept between min_replicas and max_replicas, and
//   - adds replicas when the requests in flight exceed target_in_flight per
//     replica by more than 10%, to ceil(in flight / target), but only while no
//     replica is starting (replicas just added count once they can take
//     requests, so one burst does not add twice);
//   - removes replicas when the peak of the last scale_in_cooldown would
//     have fitted in fewer at 80% of the target; a leader that has listened
//     for less than the cooldown removes none. The slots removed are the
//     highest; their replicas are drained before they stop.
func (e *Evaluator) serviceReplicas(j *controlpb.Job, allocs []*controlpb.Allocation, now time.Time) (int, string) {
	spec := j.Spec
	fixed := int(spec.GetReplicas())
	if fixed == 0 {
		fixed = int(spec.GetRanks())
	}
	v := spec.GetService()
	lo, hi := int(v.GetMinReplicas()), int(v.GetMaxReplicas())
	if hi == 0 {
		return fixed, ""
	}
	cur := int(j.WorldSize)
	if cur == 0 {
		cur = fixed
	}
	cur = min(max(cur, lo), hi)
	if e.load == nil {
		return cur, ""
	}
	target := v.GetTargetInFlight()
	if target <= 0 {
		return cur, ""
	}
	load := e.load.InFlight(j.Id, now)
	if cur < hi && load > target*float64(cur)*(1+scaleOutTolerance) && noneStarting(allocs) {
		n := min(hi, int(math.Ceil(load/target)))
		return n, fmt.Sprintf("scaling out from %d to %d replicas: %.1f requests in flight, target %g per replica", cur, n, load, target)
	}
	if cur > lo {
		cooldown := v.GetScaleInCooldown().AsDuration()
		peak, ok := e.load.PeakInFlight(j.Id, now.Add(-cooldown), now)
		if n := max(lo, int(math.Ceil(peak/(target*scaleInHeadroom)))); ok && n < cur {
			return n, fmt.Sprintf("scaling in from %d to %d replicas: at most %.1f requests in flight over the last %s, target %g per replica", cur, n, peak, cooldown, target)
		}
	}
	return cur, ""
}

// noneStarting says whether no replica of the service is on its way up
// (placed, or running and not healthy yet within its grace period).
func noneStarting(allocs []*controlpb.Allocation) bool {
	for _, a := range allocs {
		if a.DesiredStatus != DesiredRun || AllocTerminal(a.ClientStatus) {
			continue
		}
		if a.ClientStatus == AllocPending || a.Health == "" || a.Health == HealthStarting {
			return false
		}
	}
	return true
}
