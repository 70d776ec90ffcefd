package main

import (
	"bytes"
	"strings"
	"testing"

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

func TestUpdateMessage(t *testing.T) {
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "registered"}); m != "" {
		t.Fatalf("a new job got an update message: %q", m)
	}
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "updated"}); !strings.Contains(m, "mlp-1") || !strings.Contains(m, "one at a time") {
		t.Fatalf("update message: %q", m)
	}
	if m := updateMessage("mlp", &pb.SubmitJobResponse{Id: "mlp-1", Outcome: "unchanged"}); !strings.Contains(m, "nothing to do") {
		t.Fatalf("unchanged message: %q", m)
	}
}
