package main

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

func TestPrintServiceReplicas(t *testing.T) {
	spec, err := jobspec.Parse([]byte("name: mlp\ntype: service\nreplicas: 2\nexec: {command: [srv]}\nservice: {ports: [http, admin]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "mlp-1", Spec: spec, Status: "running", SpecGeneration: 3},
		Allocations: []*pb.Allocation{
			{Rank: 0, Generation: 2, NodeName: "node-1", RankAddr: "127.0.0.1:7947", DesiredStatus: "run", ClientStatus: "running", Health: "healthy", Ports: map[string]int32{"http": 31000, "admin": 31001}},
			{Rank: 1, Generation: 3, NodeName: "node-2", RankAddr: "127.0.0.2:7947", DesiredStatus: "run", ClientStatus: "running", Health: "starting", Ports: map[string]int32{"http": 32000, "admin": 32001}},
			{Rank: 1, NodeName: "node-3", DesiredStatus: "stop", ClientStatus: "stopped"},
		},
	}
	var b bytes.Buffer
	printServiceReplicas(&b, resp)
	out := b.String()
	for _, want := range []string{"HEALTH", "127.0.0.1:31000", "admin=31001,http=31000", "healthy", "127.0.0.2:32000", "starting"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "node-3") {
		t.Fatalf("a stopped replica is listed:\n%s", out)
	}
	// The replica of generation 2 runs the spec before generation 3's.
	for _, line := range strings.Split(out, "\n") {
		if strings.Contains(line, "node-1") && !strings.Contains(line, " old ") || strings.Contains(line, "node-2") && !strings.Contains(line, " current ") {
			t.Fatalf("replica line %q: want node-1 old, node-2 current:\n%s", line, out)
		}
	}
	if old, live := oldSpecReplicas(resp); old != 1 || live != 2 {
		t.Fatalf("oldSpecReplicas = %d, %d; want 1 of 2", old, live)
	}
	var exec bytes.Buffer
	printServiceReplicas(&exec, &pb.GetJobResponse{Job: &pb.Job{Spec: &pb.JobSpec{Type: "exec"}}})
	if exec.Len() != 0 {
		t.Fatalf("an exec job printed replicas: %q", exec.String())
	}
}

// job status and service status say which replica slot crash-loops, how
// often in a row, how the last replica ended and when the next one starts.
func TestPrintCrashLoops(t *testing.T) {
	spec, err := jobspec.Parse([]byte("name: mlp\ntype: service\nreplicas: 3\nrestart: {delay: 2s}\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 12, 7, 17, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *timestamppb.Timestamp { return timestamppb.New(now.Add(d)) }
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "mlp-1", Spec: spec, Status: "running", WorldSize: 3, Generation: 7},
		Allocations: []*pb.Allocation{
			{Rank: 0, Generation: 4, DesiredStatus: "stop", ClientStatus: "failed", ExitCode: 1, SlotFailures: 2, FinishTime: at(-30 * time.Second)},
			{Rank: 0, Generation: 5, DesiredStatus: "stop", ClientStatus: "failed", ExitCode: 3, Message: "no model file", SlotFailures: 3, StartTime: at(-12 * time.Second), FinishTime: at(-10 * time.Second)},
			{Rank: 1, Generation: 6, DesiredStatus: "run", ClientStatus: "running", Health: "healthy", SlotFailures: 1, HealthyTime: at(-time.Minute)},
			{Rank: 2, Generation: 1, DesiredStatus: "run", ClientStatus: "running", Health: "healthy", HealthyTime: at(-time.Hour)},
		},
	}
	var b bytes.Buffer
	printCrashLoops(&b, resp, now)
	out := b.String()
	// Slot 0: a 4th failure in a row waits 2s×2³ = 16s from its end, 6s from now.
	for _, want := range []string{
		"replica 0 crash-looping: 4 failures in a row (the last failed, exit 3: no model file; never healthy); next try in 6s (17:00:06 UTC, back-off 16s)\n" +
			"    its output: gpumesh job logs mlp-1 --rank 0 --generation 5\n",
		"replica 1: 1 failure in a row before the running one; the count ends once it stays healthy for 10m0s",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "replica 2") {
		t.Fatalf("a slot without failures is listed:\n%s", out)
	}
	// service list counts slot 0 (4 failures in a row); slot 1's 1 is a
	// failure, not a crash loop (consensus.CrashLoopAt, as for dev and
	// job run).
	b.Reset()
	printServiceList(&b, []*pb.GetJobResponse{resp}, now)
	if !strings.Contains(b.String(), "running, 1 crash-looping") {
		t.Fatalf("service list:\n%s", b.String())
	}
	// A slot waiting after 2 failures in a row has failed; after 3 it
	// crash-loops.
	resp.Allocations[1].SlotFailures = consensus.CrashLoopAt - 2
	b.Reset()
	printCrashLoops(&b, resp, now)
	if want := fmt.Sprintf("replica 0 failed: %d failures in a row", consensus.CrashLoopAt-1); !strings.Contains(b.String(), want) {
		t.Fatalf("output lacks %q:\n%s", want, b.String())
	}
	resp.Allocations[1].SlotFailures = consensus.CrashLoopAt - 1
	b.Reset()
	printCrashLoops(&b, resp, now)
	if want := fmt.Sprintf("replica 0 crash-looping: %d failures in a row", consensus.CrashLoopAt); !strings.Contains(b.String(), want) {
		t.Fatalf("output lacks %q:\n%s", want, b.String())
	}
}

// service status lists a URL per live node: its serve port where it has
// one, its HTTP port otherwise; none for nodes that are down.
func TestPrintServiceURLs(t *testing.T) {
	nodes := []*pb.Node{
		{Name: "node-1", Status: "ready", HttpAddr: "10.0.0.1:7949", ServeAddr: "10.0.0.1:7950"},
		{Name: "node-2", Status: "draining", HttpAddr: "10.0.0.2:7949"},
		{Name: "node-3", Status: "down", HttpAddr: "10.0.0.3:7949", ServeAddr: "10.0.0.3:7950"},
	}
	var b bytes.Buffer
	printServiceURLs(&b, nodes, "mlp", false)
	out := b.String()
	for _, want := range []string{"reach it through any node:", "node-1  http://10.0.0.1:7950/svc/mlp/  (serve port)", "node-2  http://10.0.0.2:7949/svc/mlp/  (HTTP port)"} {
		if !strings.Contains(out, want) {
			t.Fatalf("output lacks %q:\n%s", want, out)
		}
	}
	if strings.Contains(out, "node-3") {
		t.Fatalf("a down node is listed:\n%s", out)
	}
	b.Reset()
	printServiceURLs(&b, nodes[:1], "mlp", true)
	if !strings.Contains(b.String(), "https://10.0.0.1:7950/svc/mlp/") {
		t.Fatalf("with TLS: %s", b.String())
	}
}

func TestUpdateMessage(t *testing.T) {
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "registered"}); m != "" {
		t.Fatalf("a new job got an update message: %q", m)
	}
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "updated"}); !strings.Contains(m, "mlp-1") || !strings.Contains(m, "one at a time") {
		t.Fatalf("update message: %q", m)
	}
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "scaled"}); !strings.Contains(m, "mlp-1") || !strings.Contains(m, "keep running") {
		t.Errorf("scaled: %q", m)
	}
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "unchanged"}); !strings.Contains(m, "nothing to do") {
		t.Fatalf("unchanged message: %q", m)
	}
}

// The scale note of a service scaled by load names its target in flight
// per replica in the right number.
func TestScaleNote(t *testing.T) {
	for _, tc := range []struct {
		min, max int32
		target   float64
		want     string
	}{
		{0, 0, 0, ""},
		{1, 4, 1, " (scaled by load: 1 to 4, 1 request in flight per replica)"},
		{1, 3, 2, " (scaled by load: 1 to 3, 2 requests in flight per replica)"},
		{2, 8, 0.5, " (scaled by load: 2 to 8, 0.5 requests in flight per replica)"},
	} {
		j := &pb.Job{Spec: &pb.JobSpec{Service: &pb.ServiceSpec{MinReplicas: tc.min, MaxReplicas: tc.max, TargetInFlight: tc.target}}}
		if got := scaleNote(j); got != tc.want {
			t.Errorf("scaleNote(min %d max %d target %g) = %q, want %q", tc.min, tc.max, tc.target, got, tc.want)
		}
	}
}
