package main

import (
	"strings"
	"testing"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// A rank lost with its node has no exit code: job status shows "-" and
// the cause, never "EXIT 0".
func TestPrintJobLostRankShowsCause(t *testing.T) {
	var b strings.Builder
	printJob(&b, &pb.GetJobResponse{
		Job: &pb.Job{Id: "j-1", Status: "pending", Generation: 1, Spec: &pb.JobSpec{Name: "j", Type: "exec"}},
		Allocations: []*pb.Allocation{
			{Generation: 1, Rank: 0, NodeName: "a", DesiredStatus: "stop", ClientStatus: "stopped", ExitCode: -1},
			{Generation: 1, Rank: 1, NodeName: "b", DesiredStatus: "stop", ClientStatus: "lost", Message: "lost: node b was silent for 30s"},
		},
	})
	for _, line := range strings.Split(b.String(), "\n") {
		f := strings.Fields(line)
		if len(f) >= 7 && f[1] == "1" && f[2] == "b" {
			if f[5] != "lost" || f[6] != "-" || !strings.Contains(line, "node b was silent") {
				t.Fatalf("lost rank line %q: want status lost, exit -, and the cause", line)
			}
			return
		}
	}
	t.Fatalf("no line for rank 1:\n%s", b.String())
}
