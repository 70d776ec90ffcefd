package main

import (
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// A rolling update as `gpumesh dev` tells it: started, a replica replaced,
// a failing replacement (stalled), then done; an update finished before
// the first look is not news.
func TestUpdateNews(t *testing.T) {
	spec, err := jobspec.Parse([]byte("name: mlp\ntype: service\nreplicas: 2\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	replica := func(rank int32, gen uint64, client, health string) *pb.Allocation {
		return &pb.Allocation{Rank: rank, Generation: gen, NodeName: "node-1", DesiredStatus: "run", ClientStatus: client, Health: health, Message: "exit status 1"}
	}
	state := func(specGen uint64, allocs ...*pb.Allocation) []*pb.GetJobResponse {
		return []*pb.GetJobResponse{{Job: &pb.Job{Id: "mlp-1", Spec: spec, Status: "running", SpecGeneration: specGen}, Allocations: allocs}}
	}
	t0 := time.Unix(1000, 0)
	seen := map[string]*rollout{}
	steps := []struct {
		jobs []*pb.GetJobResponse
		want []string // one substring per line, in order
	}{
		{state(0, replica(0, 1, "running", "healthy"), replica(1, 1, "running", "healthy")), nil},
		{state(2, replica(0, 1, "running", "healthy"), replica(1, 1, "running", "healthy"), replica(0, 2, "pending", "")), []string{"rolling update to spec generation 2: 2 replicas on the previous spec to replace"}},
		{state(2, replica(0, 1, "running", "healthy"), replica(1, 1, "running", "healthy"), replica(0, 2, "failed", "")), []string{"stalled: replica 0 on the new spec failed on node-1 (exit status 1); the 2 old replicas keep serving"}},
		{state(2, replica(0, 1, "running", "healthy"), replica(1, 1, "running", "healthy"), replica(0, 2, "failed", "")), nil}, // said once
		{state(2, replica(1, 1, "running", "healthy"), replica(0, 2, "running", "healthy")), []string{"1 of 2 replicas on the new spec"}},
		{state(2, replica(0, 2, "running", "healthy"), replica(1, 2, "running", "starting")), []string{"2 of 2 replicas on the new spec"}},
		{state(2, replica(0, 2, "running", "healthy"), replica(1, 2, "running", "healthy")), []string{"rolling update done: 2 replicas on spec generation 2, all healthy (5s after it was first seen)"}},
		{state(2, replica(0, 2, "running", "healthy"), replica(1, 2, "running", "healthy")), nil},
	}
	for i, s := range steps {
		got := updateNews(seen, s.jobs, t0.Add(time.Duration(i)*time.Second), i == 0)
		if len(got) != len(s.want) {
			t.Fatalf("step %d: %q, want %d lines like %q", i, got, len(s.want), s.want)
		}
		for k, w := range s.want {
			if !strings.Contains(got[k], w) {
				t.Fatalf("step %d: line %q, want %q in it", i, got[k], w)
			}
		}
	}
	// On the first look an update already done says nothing, one under
	// way says it started.
	if got := updateNews(map[string]*rollout{}, state(2, replica(0, 2, "running", "healthy"), replica(1, 2, "running", "healthy")), t0, true); len(got) != 0 {
		t.Fatalf("a finished update on the first look: %q", got)
	}
	if got := updateNews(map[string]*rollout{}, state(2, replica(0, 1, "running", "healthy"), replica(1, 2, "running", "healthy")), t0, true); len(got) != 1 || !strings.Contains(got[0], "1 replicas on the previous spec to replace") {
		t.Fatalf("an update under way on the first look: %q", got)
	}
}

// gpumesh dev says once that a replica slot crash-loops (from the third
// failure in a row), and once that it stopped.
func TestCrashNews(t *testing.T) {
	spec, err := jobspec.Parse([]byte("name: mlp\ntype: service\nreplicas: 2\nrestart: {delay: 1s, max_delay: 1m}\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Unix(1000, 0)
	at := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(now.Add(d)) }
	failed := func(gen uint64, failures int32) *pb.Allocation {
		return &pb.Allocation{Rank: 0, Generation: gen, DesiredStatus: "stop", ClientStatus: "failed", ExitCode: 1, SlotFailures: failures, FinishTime: at(-time.Second)}
	}
	state := func(allocs ...*pb.Allocation) []*pb.GetJobResponse {
		return []*pb.GetJobResponse{{Job: &pb.Job{Id: "mlp-1", Spec: spec, Status: "running", WorldSize: 2}, Allocations: allocs}}
	}
	healthy := &pb.Allocation{Rank: 0, Generation: 5, DesiredStatus: "run", ClientStatus: "running", Health: "healthy", SlotFailures: 3, HealthyTime: at(-time.Hour)}
	told := map[string]string{}
	for i, s := range []struct {
		jobs []*pb.GetJobResponse
		want string // "" for no line
	}{
		{state(failed(1, 0)), ""},
		{state(failed(2, 1)), ""},
		{state(failed(3, 2)), "==> service mlp: replica 0 is crash-looping (3 failures in a row; its replacements wait up to 1m0s): gpumesh service status mlp"},
		{state(failed(4, 3)), ""}, // said once
		{state(failed(4, 3), healthy), "==> service mlp: replica 0 is no longer crash-looping"},
		{state(healthy), ""},
	} {
		got := crashNews(told, s.jobs, now)
		if (s.want == "" && len(got) != 0) || (s.want != "" && (len(got) != 1 || got[0] != s.want)) {
			t.Fatalf("step %d: %q, want %q", i, got, s.want)
		}
	}
}
