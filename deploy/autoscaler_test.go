package deploy

import (
	"context"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// The whole loop against the EC2 fake: a waiting gang job raises the
// target, the new instances count as launching until they join, and idle
// ones are removed after IdleAfter and the cooldown.
func TestAutoscalerSteps(t *testing.T) {
	fake, c := newFakeEC2(t)
	ctx := context.Background()
	cfg := spotConfig()
	cfg.Count, cfg.OnDemandBase = 3, 1
	res, err := Launch(ctx, c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewFleetScaler(c, ScalerConfig{FleetID: res.FleetID, Policy: DefaultScalePolicy(3, 8), OnDemandBase: 1})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	var mu sync.Mutex
	demand := Demand{Members: map[string]time.Time{}}
	for _, in := range res.Instances {
		demand.Members[in.InstanceID] = time.Time{} // busy
	}
	var changes []ScaleDecision
	a, err := NewAutoscaler(s, func(context.Context) (Demand, error) {
		mu.Lock()
		defer mu.Unlock()
		return demand, nil
	}, AutoscalerConfig{Now: func() time.Time { return now }, OnChange: func(d ScaleDecision) { changes = append(changes, d) }})
	if err != nil {
		t.Fatal(err)
	}

	// A gang job waits for 2 nodes: 3 → 5.
	demand.WaitingJobs, demand.NodesNeeded = 1, 2
	d, err := a.Step(ctx)
	if err != nil || d.Target != 5 {
		t.Fatalf("step 1: %+v, %v", d, err)
	}
	// The new instances have not joined yet: no second raise.
	now = now.Add(time.Minute)
	d, err = a.Step(ctx)
	if err != nil || d.Target != 5 || !strings.Contains(d.Reason, "already launching") {
		t.Fatalf("step 2: %+v, %v", d, err)
	}
	if n := len(fake.Requests("ModifyFleet")); n != 1 {
		t.Fatalf("%d ModifyFleet calls, want 1", n)
	}
	// They join, the job runs and ends; everything is idle from now on.
	insts, _ := s.Instances(ctx)
	demand.WaitingJobs, demand.NodesNeeded = 0, 0
	for _, in := range insts {
		demand.Members[in.InstanceID] = now
	}
	now = now.Add(11 * time.Minute)
	d, err = a.Step(ctx)
	if err != nil || d.Target != 3 || len(d.Remove) != 2 {
		t.Fatalf("step 3: %+v, %v", d, err)
	}
	f, _ := fake.Fleet(res.FleetID)
	if f.Total != 3 || len(f.Instances) != 3 {
		t.Fatalf("fleet after scale-in: target %d, %d instances", f.Total, len(f.Instances))
	}
	if len(changes) != 2 || changes[0].Target != 5 || changes[1].Target != 3 {
		t.Fatalf("OnChange saw %+v", changes)
	}
	if last, at := a.Last(); last.Target != 3 || !at.Equal(now) {
		t.Fatalf("Last() = %+v at %s", last, at)
	}
}

func TestAutoscalerStartStop(t *testing.T) {
	_, c := newFakeEC2(t)
	ctx := context.Background()
	cfg := spotConfig()
	cfg.Count, cfg.OnDemandBase = 2, 0
	res, err := Launch(ctx, c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, _ := NewFleetScaler(c, ScalerConfig{FleetID: res.FleetID, Policy: DefaultScalePolicy(1, 4)})
	var mu sync.Mutex
	calls := 0
	a, err := NewAutoscaler(s, func(context.Context) (Demand, error) {
		mu.Lock()
		defer mu.Unlock()
		calls++
		return Demand{}, errors.New("no leader yet")
	}, AutoscalerConfig{Interval: 5 * time.Millisecond, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	a.Start(ctx)
	poll.Until(t, 10*time.Second, func() bool { mu.Lock(); defer mu.Unlock(); return calls >= 3 })
	a.Stop()
	a.Stop()
	// Stop returns after the goroutine has exited: no step can follow.
	select {
	case <-a.done:
	default:
		t.Fatal("Stop returned before the goroutine exited")
	}
	b, _ := NewAutoscaler(s, func(context.Context) (Demand, error) { return Demand{}, nil }, AutoscalerConfig{})
	b.Stop() // never started: returns at once
	if _, err := NewAutoscaler(nil, nil, AutoscalerConfig{}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("nil scaler: %v", err)
	}
}
