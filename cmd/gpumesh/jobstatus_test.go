package main

import (
	"strings"
	"testing"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"google.golang.org/protobuf/types/known/structpb"
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

// result is an allocation's result as the agent reports it (JSON-like).
func result(t *testing.T, m map[string]any) *structpb.Struct {
	t.Helper()
	s, err := structpb.NewStruct(m)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Job status shows where the last generation resumed, the steps lost
// (the previous generation's last step minus that), and the prefetch.
func TestPrintJobShowsCheckpointResumeAndLostSteps(t *testing.T) {
	ck := func(resumed, last float64) map[string]any {
		return map[string]any{"resumed_step": resumed, "last_step": last}
	}
	pre := map[string]any{"found": true, "seconds": 2.5, "step": 99.0, "part": 0.0, "bytes": float64(1 << 30)}
	cases := []struct {
		name   string
		allocs []*pb.Allocation
		want   string
	}{
		{"kill -9: 4 steps since the periodic checkpoint lost", []*pb.Allocation{
			{Generation: 1, Rank: 0, ClientStatus: "stopped", Result: result(t, map[string]any{"checkpoint": ck(-1, 103)})},
			{Generation: 1, Rank: 1, ClientStatus: "lost"},
			{Generation: 2, Rank: 0, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(99, 199), "checkpoint_prefetch": pre})},
			{Generation: 2, Rank: 1, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(99, 199), "checkpoint_prefetch": pre})},
		}, "Checkpoint  generation 2 resumed at step 99, 4 steps lost (generation 1 finished step 103), prefetch 1024.0 MiB in 2.50 s"},
		{"spot notice: nothing lost", []*pb.Allocation{
			{Generation: 1, Rank: 0, ClientStatus: "stopped", Result: result(t, map[string]any{"checkpoint": ck(-1, 612)})},
			{Generation: 2, Rank: 0, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(612, 2999)})},
		}, "Checkpoint  generation 2 resumed at step 612, 0 steps lost (generation 1 finished step 612)\n"},
		{"first generation", []*pb.Allocation{
			{Generation: 1, Rank: 0, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(-1, 39), "checkpoint_prefetch": map[string]any{"found": false, "seconds": 0.01}})},
		}, "Checkpoint  generation 1 started without a checkpoint\n"},
		{"previous generation lost with its nodes", []*pb.Allocation{
			{Generation: 1, Rank: 0, ClientStatus: "lost"},
			{Generation: 2, Rank: 0, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(49, 99), "checkpoint_prefetch": map[string]any{"found": false, "seconds": 0.0, "error": "access denied"}})},
		}, "Checkpoint  generation 2 resumed at step 49, steps lost unknown (no earlier generation reported its last step), prefetch failed: access denied\n"},
		{"a checkpoint that names no job", []*pb.Allocation{
			{Generation: 1, Rank: 0, ClientStatus: "complete", Result: result(t, map[string]any{"checkpoint": ck(9, 19), "checkpoint_prefetch": map[string]any{"found": true, "step": 9.0, "bytes": 1048576.0, "seconds": 0.5, "warning": "resuming from a checkpoint that names no job"}})},
		}, "Checkpoint  generation 1 resumed at step 9, prefetch 1.0 MiB in 0.50 s, warning: resuming from a checkpoint that names no job\n"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			var b strings.Builder
			printJob(&b, &pb.GetJobResponse{Job: &pb.Job{Id: "j-1", Status: "complete", Generation: 2, Spec: &pb.JobSpec{Name: "j", Type: "exec"}}, Allocations: c.allocs})
			if !strings.Contains(b.String(), c.want) {
				t.Fatalf("job status lacks %q:\n%s", c.want, b.String())
			}
		})
	}
	var b strings.Builder
	printJob(&b, &pb.GetJobResponse{Job: &pb.Job{Id: "j-1", Status: "running", Generation: 1, Spec: &pb.JobSpec{Name: "j", Type: "exec"}},
		Allocations: []*pb.Allocation{{Generation: 1, Rank: 0, ClientStatus: "running"}}})
	if strings.Contains(b.String(), "Checkpoint") {
		t.Fatalf("a job without checkpoint reports shows a Checkpoint line:\n%s", b.String())
	}
}

// Ranks sharing a GPU (ranks_per_gpu) show it: the GPU of each rank and
// how many ranks of the generation share it on that node.
func TestPrintJobShowsSharedGPUs(t *testing.T) {
	var b strings.Builder
	printJob(&b, &pb.GetJobResponse{
		Job: &pb.Job{Id: "j-1", Status: "running", Generation: 2, WorldSize: 3, Spec: &pb.JobSpec{Name: "j", Type: "exec", GpusPerRank: 1, RanksPerGpu: 2}},
		Allocations: []*pb.Allocation{
			{Generation: 1, Rank: 0, NodeId: "n1", NodeName: "a", Gpus: []int32{0}, ClientStatus: "stopped"},
			{Generation: 2, Rank: 0, NodeId: "n1", NodeName: "a", Gpus: []int32{0}, ClientStatus: "running"},
			{Generation: 2, Rank: 1, NodeId: "n1", NodeName: "a", Gpus: []int32{0}, ClientStatus: "running"},
			{Generation: 2, Rank: 2, NodeId: "n1", NodeName: "a", Gpus: []int32{1}, ClientStatus: "running"},
		},
	})
	out := b.String()
	if !strings.Contains(out, "Ranks per GPU  2\n") {
		t.Errorf("no ranks per GPU line:\n%s", out)
	}
	want := map[string]string{"1/0": "0", "2/0": "0 (shared by 2)", "2/1": "0 (shared by 2)", "2/2": "1"}
	for _, line := range strings.Split(out, "\n") {
		f := strings.Fields(line)
		if len(f) < 4 {
			continue
		}
		key := f[0] + "/" + f[1]
		w, ok := want[key]
		if !ok {
			continue
		}
		if got := strings.Join(f[3:3+len(strings.Fields(w))], " "); got != w {
			t.Errorf("generation/rank %s: GPUS %q, want %q (line %q)", key, got, w, line)
		}
		delete(want, key)
	}
	if len(want) != 0 {
		t.Fatalf("no lines for %v:\n%s", want, out)
	}
}

// A failed job's status names the command that shows why a rank failed:
// its output (stdout and stderr, where a Python traceback goes), of the
// newest generation with a failure. Jobs without a failed rank print no
// such line.
func TestPrintJobPointsAtFailedRankStderr(t *testing.T) {
	var b strings.Builder
	printJob(&b, &pb.GetJobResponse{
		Job: &pb.Job{Id: "ddp-1", Status: "failed", Generation: 2, Spec: &pb.JobSpec{Name: "ddp", Type: "exec"}},
		Allocations: []*pb.Allocation{
			{Generation: 2, Rank: 0, ClientStatus: "stopped", ExitCode: -1},
			{Generation: 2, Rank: 2, ClientStatus: "failed", ExitCode: 2},
			{Generation: 2, Rank: 1, ClientStatus: "failed", ExitCode: 1},
			{Generation: 1, Rank: 0, ClientStatus: "failed", ExitCode: 2},
		},
	})
	want := "rank 1 of generation 2 failed (exit 1); its output: gpumesh job logs ddp-1 --rank 1 --generation 2\n"
	if !strings.Contains(b.String(), want) {
		t.Fatalf("job status lacks %q:\n%s", want, b.String())
	}
	b.Reset()
	printJob(&b, &pb.GetJobResponse{
		Job:         &pb.Job{Id: "hello-1", Status: "complete", Generation: 1, Spec: &pb.JobSpec{Name: "hello", Type: "exec"}},
		Allocations: []*pb.Allocation{{Generation: 1, Rank: 0, ClientStatus: "complete"}},
	})
	if strings.Contains(b.String(), "its output") {
		t.Fatalf("a job without a failed rank points at logs:\n%s", b.String())
	}
}

// The collectives the ranks ran through their agents are one table: one
// header, a row per rank and operation, columns aligned across ranks.
func TestPrintClientCollectivesOneTable(t *testing.T) {
	coll := func(op string, ops float64) map[string]any {
		return map[string]any{"collectives": []any{map[string]any{"op": op, "ops": ops, "bytes": 1024.0, "mean_latency_ms": 0.5, "max_latency_ms": 1.0}}}
	}
	var b strings.Builder
	shown := printClientCollectives(&b, []*pb.Allocation{
		{Rank: 0, NodeName: "node-1", Result: result(t, coll("all_reduce", 20))},
		{Rank: 1, NodeName: "node-22", Result: result(t, coll("broadcast", 4))},
	})
	out := b.String()
	if !shown || strings.Count(out, "RANK") != 1 {
		t.Fatalf("want one table with one header:\n%s", out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	last := lines[len(lines)-1]
	if !strings.HasPrefix(last, "1") || strings.Index(last, "broadcast") != strings.Index(lines[len(lines)-2], "all_reduce") {
		t.Fatalf("rows not aligned in one table:\n%s", out)
	}
}
