package deploy

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
)

func TestDecideScale(t *testing.T) {
	now := time.Date(2026, 1, 1, 12, 0, 0, 0, time.UTC)
	p := ScalePolicy{Min: 3, Max: 10, IdleAfter: 10 * time.Minute, ScaleDownCooldown: 5 * time.Minute}
	idle := func(id string, ago time.Duration) IdleNode { return IdleNode{InstanceID: id, Since: now.Add(-ago)} }
	cases := []struct {
		name       string
		s          ScaleState
		target     int
		remove     string
		reasonPart string
	}{
		{"steady", ScaleState{Now: now, Target: 5, Joined: 5}, 5, "", "no job waits"},
		{"below min", ScaleState{Now: now, Target: 1, Joined: 1}, 3, "", "below the minimum 3"},
		{"above max", ScaleState{Now: now, Target: 12, Joined: 12}, 10, "", "above the maximum 10"},
		{"gang job waits", ScaleState{Now: now, Target: 5, Joined: 5, WaitingJobs: 1, NodesNeeded: 2}, 7, "",
			"1 gang job waits for 2 nodes: raising target 5 → 7"},
		{"some already launching", ScaleState{Now: now, Target: 6, Joined: 5, WaitingJobs: 2, NodesNeeded: 3}, 8, "",
			"2 gang jobs wait for 3 nodes (1 launching): raising target 6 → 8"},
		{"all launching", ScaleState{Now: now, Target: 7, Joined: 5, WaitingJobs: 1, NodesNeeded: 2}, 7, "",
			"2 are already launching"},
		{"capped at max", ScaleState{Now: now, Target: 9, Joined: 9, WaitingJobs: 1, NodesNeeded: 4}, 10, "",
			"capped at the maximum 10"},
		{"at max", ScaleState{Now: now, Target: 10, Joined: 10, WaitingJobs: 1, NodesNeeded: 1}, 10, "",
			"at its maximum 10"},
		{"waiting beats idle", ScaleState{Now: now, Target: 5, Joined: 5, WaitingJobs: 1, NodesNeeded: 1,
			Idle: []IdleNode{idle("i-a", time.Hour)}}, 6, "", "raising"},
		{"idle not long enough", ScaleState{Now: now, Target: 5, Joined: 5, Idle: []IdleNode{idle("i-a", 9*time.Minute)}}, 5, "",
			"no node has been idle for 10m0s"},
		{"idle long: lower", ScaleState{Now: now, Target: 6, Joined: 6,
			Idle: []IdleNode{idle("i-b", 11*time.Minute), idle("i-a", 30*time.Minute), idle("i-c", time.Minute)}},
			4, "i-a,i-b", "2 nodes idle for 10m0s and no job waits: lowering target 6 → 4, terminating i-a,i-b"},
		{"lower down to min only", ScaleState{Now: now, Target: 4, Joined: 4,
			Idle: []IdleNode{idle("i-b", time.Hour), idle("i-a", time.Hour), idle("i-c", time.Hour)}},
			3, "i-a", "lowering target 4 → 3"},
		{"at min", ScaleState{Now: now, Target: 3, Joined: 3, Idle: []IdleNode{idle("i-a", time.Hour)}}, 3, "",
			"at its minimum 3"},
		{"cooldown", ScaleState{Now: now, Target: 6, Joined: 6, LastChange: now.Add(-time.Minute),
			Idle: []IdleNode{idle("i-a", time.Hour)}}, 6, "", "cooldown"},
		{"members above target: terminate, keep target", ScaleState{Now: now, Target: 4, Joined: 6, LastChange: now.Add(-time.Minute),
			Idle: []IdleNode{idle("i-b", time.Hour), idle("i-a", 2*time.Hour), idle("i-c", 20*time.Minute)}},
			4, "i-a,i-b", "2 members above the target 4: terminating idle i-a,i-b"},
		{"members above target, few idle", ScaleState{Now: now, Target: 4, Joined: 7,
			Idle: []IdleNode{idle("i-a", time.Hour)}}, 4, "i-a", "3 members above the target 4"},
		{"after cooldown", ScaleState{Now: now, Target: 6, Joined: 6, LastChange: now.Add(-6 * time.Minute),
			Idle: []IdleNode{idle("i-a", time.Hour)}}, 5, "i-a", "lowering target 6 → 5"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			d := DecideScale(p, c.s)
			if d.Target != c.target || strings.Join(d.Remove, ",") != c.remove {
				t.Fatalf("decision %+v, want target %d remove %q", d, c.target, c.remove)
			}
			if !strings.Contains(d.Reason, c.reasonPart) {
				t.Fatalf("reason %q does not contain %q", d.Reason, c.reasonPart)
			}
			if d.Changed(c.s) != (c.target != c.s.Target) {
				t.Fatal("Changed disagrees with the target")
			}
		})
	}
}

func TestScalePolicyValidate(t *testing.T) {
	if err := DefaultScalePolicy(1, 4).Validate(); err != nil {
		t.Fatal(err)
	}
	for _, p := range []ScalePolicy{
		DefaultScalePolicy(-1, 4), DefaultScalePolicy(0, 0), DefaultScalePolicy(5, 4),
		{Min: 1, Max: 2}, {Min: 1, Max: 2, IdleAfter: time.Minute, ScaleDownCooldown: -1},
	} {
		if err := p.Validate(); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("Validate(%+v) = %v", p, err)
		}
	}
}

// A waiting gang job raises the fleet's target through ModifyFleet; the new
// instances join by tag; idle ones are later removed with the target
// lowered first, so the maintain fleet does not replace them.
func TestFleetScalerAgainstEC2(t *testing.T) {
	fake, c := newFakeEC2(t)
	ctx := context.Background()
	cfg := spotConfig()
	cfg.Count, cfg.OnDemandBase = 3, 1
	cfg.Template = LaunchTemplateRef{}
	cfg.NewTemplate = &NewLaunchTemplate{AMI: "ami-1"}
	res, err := Launch(ctx, c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewFleetScaler(c, ScalerConfig{FleetID: res.FleetID, Policy: DefaultScalePolicy(2, 6), OnDemandBase: 1, Logger: testLogger(t)})
	if err != nil {
		t.Fatal(err)
	}
	st, err := s.Status(ctx)
	if err != nil || st.TotalTarget != 3 {
		t.Fatalf("status %+v, %v", st, err)
	}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	d := s.Decide(ScaleState{Now: now, Target: st.TotalTarget, Joined: 3, WaitingJobs: 1, NodesNeeded: 2})
	if d.Target != 5 {
		t.Fatalf("decision %+v", d)
	}
	if err := s.Apply(ctx, st.TotalTarget, d); err != nil {
		t.Fatal(err)
	}
	mods := fake.Requests("ModifyFleet")
	if len(mods) != 1 {
		t.Fatalf("%d ModifyFleet calls", len(mods))
	}
	wantForm(t, mods[0].Form, map[string]string{
		"FleetId": res.FleetID,
		"TargetCapacitySpecification.TotalTargetCapacity":    "5",
		"TargetCapacitySpecification.OnDemandTargetCapacity": "1",
		"ExcessCapacityTerminationPolicy":                    "no-termination",
	})
	d2, _ := NewTagDiscoverer(c, TagDiscoveryConfig{Tag: cfg.Tag})
	addrs, err := d2.Addrs(ctx)
	if err != nil || len(addrs) != 5 {
		t.Fatalf("after raising: %v, %v", addrs, err)
	}
	insts, err := s.Instances(ctx)
	if err != nil || len(insts) != 5 {
		t.Fatalf("instances %v, %v", insts, err)
	}

	// An unchanged decision makes no call.
	if err := s.Apply(ctx, 5, ScaleDecision{Target: 5}); err != nil || len(fake.Requests("ModifyFleet")) != 1 {
		t.Fatalf("no-op Apply called ModifyFleet: %v", err)
	}

	// Two nodes idle for an hour: lower 5 → 3 and terminate exactly them.
	later := now.Add(time.Hour)
	idle := []IdleNode{{insts[0].InstanceID, now}, {insts[4].InstanceID, now.Add(time.Minute)}}
	d = s.Decide(ScaleState{Now: later, Target: 5, Joined: 5, Idle: idle, LastChange: now})
	if d.Target != 3 || len(d.Remove) != 2 {
		t.Fatalf("decision %+v", d)
	}
	if err := s.Apply(ctx, 5, d); err != nil {
		t.Fatal(err)
	}
	f, _ := fake.Fleet(res.FleetID)
	if f.Total != 3 || len(f.Instances) != 3 {
		t.Fatalf("fleet after lowering: target %d, %d instances (the fleet replaced terminated nodes?)", f.Total, len(f.Instances))
	}
	for _, id := range d.Remove {
		if in, _ := fake.Instance(id); in.State != "terminated" {
			t.Fatalf("%s is %s, want terminated", id, in.State)
		}
	}
	term := fake.Requests("TerminateInstances")
	if len(term) != 1 {
		t.Fatalf("%d TerminateInstances calls", len(term))
	}

	fake.FailNext("ModifyFleet", "UnauthorizedOperation", "not authorized to perform ec2:ModifyFleet")
	if err := s.Apply(ctx, 3, ScaleDecision{Target: 4}); err == nil || !strings.Contains(err.Error(), "ModifyFleet") {
		t.Fatalf("err = %v", err)
	}
}

func TestNewFleetScalerValidates(t *testing.T) {
	_, c := newFakeEC2(t)
	for _, cfg := range []ScalerConfig{
		{FleetID: "nope", Policy: DefaultScalePolicy(1, 3)},
		{FleetID: "fleet-1", Policy: DefaultScalePolicy(4, 3)},
		{FleetID: "fleet-1", Policy: DefaultScalePolicy(1, 3), OnDemandBase: 4},
	} {
		if _, err := NewFleetScaler(c, cfg); !errors.Is(err, ErrInvalidConfig) {
			t.Errorf("NewFleetScaler(%+v) = %v", cfg, err)
		}
	}
}

// A lowering whose TerminateInstances fails leaves members above the target;
// the next decision terminates idle ones without lowering the target again.
func TestFleetScalerRecoversFromFailedTermination(t *testing.T) {
	fake, c := newFakeEC2(t)
	ctx := context.Background()
	cfg := spotConfig()
	cfg.Count, cfg.OnDemandBase = 5, 1
	res, err := Launch(ctx, c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	s, err := NewFleetScaler(c, ScalerConfig{FleetID: res.FleetID, Policy: DefaultScalePolicy(2, 6), OnDemandBase: 1})
	if err != nil {
		t.Fatal(err)
	}
	insts, _ := s.Instances(ctx)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	idle := []IdleNode{{insts[1].InstanceID, now}, {insts[2].InstanceID, now}}
	d := s.Decide(ScaleState{Now: now.Add(time.Hour), Target: 5, Joined: 5, Idle: idle})
	if d.Target != 3 || len(d.Remove) != 2 {
		t.Fatalf("decision %+v", d)
	}
	// Not a throttling code, so the SDK does not retry it.
	fake.FailNext("TerminateInstances", "UnauthorizedOperation", "not authorized to perform ec2:TerminateInstances")
	if err := s.Apply(ctx, 5, d); err == nil || !strings.Contains(err.Error(), "TerminateInstances") {
		t.Fatalf("Apply = %v, want the termination error", err)
	}
	st, _ := s.Status(ctx)
	f, _ := fake.Fleet(res.FleetID)
	if st.TotalTarget != 3 || len(f.Instances) != 5 {
		t.Fatalf("after the failed termination: target %d with %d instances, want 3 with 5", st.TotalTarget, len(f.Instances))
	}
	mods := len(fake.Requests("ModifyFleet"))
	d = s.Decide(ScaleState{Now: now.Add(2 * time.Hour), Target: 3, Joined: len(f.Instances), Idle: idle})
	if d.Target != 3 || len(d.Remove) != 2 {
		t.Fatalf("recovery decision %+v", d)
	}
	if err := s.Apply(ctx, 3, d); err != nil {
		t.Fatal(err)
	}
	if n := len(fake.Requests("ModifyFleet")); n != mods {
		t.Fatalf("recovery changed the target again (%d ModifyFleet calls, was %d)", n, mods)
	}
	f, _ = fake.Fleet(res.FleetID)
	if f.Total != 3 || len(f.Instances) != 3 {
		t.Fatalf("fleet target %d with %d instances, want 3 and 3", f.Total, len(f.Instances))
	}
}
