package main

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

func TestAgoUnsetTimesPrintDash(t *testing.T) {
	now := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	cases := []struct {
		name string
		t    *timestamppb.Timestamp
		want string
	}{
		{"nil", nil, "-"},
		{"zero message", &timestamppb.Timestamp{}, "-"},
		{"invalid", &timestamppb.Timestamp{Seconds: 1, Nanos: -1}, "-"},
		{"seconds", timestamppb.New(now.Add(-5 * time.Second)), "5s ago"},
		{"minutes", timestamppb.New(now.Add(-3 * time.Minute)), "3m ago"},
		{"hours", timestamppb.New(now.Add(-2 * time.Hour)), "2h ago"},
		{"days", timestamppb.New(now.Add(-72 * time.Hour)), "3d ago"},
		{"future", timestamppb.New(now.Add(time.Minute)), "0s ago"},
	}
	for _, tc := range cases {
		if got := agoAt(tc.t, now); got != tc.want {
			t.Errorf("%s: agoAt = %q, want %q", tc.name, got, tc.want)
		}
	}
}

// A rank that never started has no start time: its STARTED column is "-",
// not hundreds of thousands of hours since 1970.
func TestJobStatusRankNeverStarted(t *testing.T) {
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "hello-1", Status: "pending", Generation: 1, WorldSize: 2, SubmitTime: timestamppb.Now(),
			Spec: &pb.JobSpec{Name: "hello", Type: "exec"}},
		Allocations: []*pb.Allocation{
			{Generation: 1, Rank: 0, NodeName: "node-1", DesiredStatus: "run", ClientStatus: "running", StartTime: timestamppb.Now()},
			{Generation: 1, Rank: 1, NodeName: "node-2", DesiredStatus: "run", ClientStatus: "pending"},
		},
	}
	var out bytes.Buffer
	printJob(&out, resp)
	s := out.String()
	if strings.Contains(s, "h ago") || strings.Contains(s, "d ago") {
		t.Fatalf("an unset start time printed as a long time ago:\n%s", s)
	}
	var rank1 string
	for _, l := range strings.Split(s, "\n") {
		if f := strings.Fields(l); len(f) > 7 && f[0] == "1" && f[1] == "1" {
			rank1 = l
			if f[7] != "-" {
				t.Errorf("STARTED of a rank that never started = %q, want -", f[7])
			}
		}
	}
	if rank1 == "" {
		t.Fatalf("no row for rank 1:\n%s", s)
	}
}

// fakeJobs answers GetJob with a fixed job; every other call panics.
type fakeJobs struct {
	pb.ControlClient
	resp *pb.GetJobResponse
}

func (f fakeJobs) GetJob(context.Context, *pb.GetJobRequest, ...grpc.CallOption) (*pb.GetJobResponse, error) {
	return f.resp, nil
}

// A failed job is reported once, on followJob's last line, not again as
// "Error: job ... failed: ..." by main.
func TestJobRunSaysAFailureOnce(t *testing.T) {
	reason := "generation 1 failed: rank 1 on node-2 exited with code 3; restart attempts exhausted (0 of 0)"
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "fail-1", Status: "failed", StatusReason: reason, Generation: 1, WorldSize: 2, Spec: &pb.JobSpec{Type: "exec"}},
		Allocations: []*pb.Allocation{
			{Generation: 1, Rank: 0, NodeName: "node-1", ClientStatus: "stopped", ExitCode: -1, Message: "killed by signal 15"},
			{Generation: 1, Rank: 1, NodeName: "node-2", ClientStatus: "failed", ExitCode: 3},
		},
	}
	var out bytes.Buffer
	f := &clientFlags{timeout: time.Second}
	o := followOptions{untilEnd: true}
	final, err := followJob(context.Background(), fakeJobs{resp: resp}, f, "fail-1", o, &out)
	err = finishRun(&out, false, o, final, err)
	var stderr bytes.Buffer
	if code := exitStatus(err, &stderr); code != exitFailed || stderr.Len() != 0 {
		t.Fatalf("exit %d, stderr %q; want 1 and nothing on stderr", code, stderr.String())
	}
	s := out.String()
	if n := strings.Count(s, "exited with code 3"); n != 1 {
		t.Errorf("the reason appears %d times:\n%s", n, s)
	}
	for _, want := range []string{"==> job fail-1 failed: " + reason, "its output: gpumesh job logs fail-1 --rank 1 --generation 1\n"} {
		if !strings.Contains(s, want) {
			t.Errorf("output lacks %q:\n%s", want, s)
		}
	}
}

// A job still pending when the placement deadline passes ends the command
// with exit status 2, the reason and what to do.
func TestJobRunPlaceTimeout(t *testing.T) {
	resp := &pb.GetJobResponse{Job: &pb.Job{Id: "gpu-1", Status: "pending", StatusReason: "waiting for capacity: needs 2 GPUs", Spec: &pb.JobSpec{Type: "exec"}}}
	var out bytes.Buffer
	o := followOptions{placeTimeout: time.Millisecond}
	final, err := followJob(context.Background(), fakeJobs{resp: resp}, &clientFlags{timeout: time.Second}, "gpu-1", o, &out)
	err = finishRun(&out, false, o, final, err)
	var stderr bytes.Buffer
	if code := exitStatus(err, &stderr); code != exitNotPlaced {
		t.Fatalf("exit %d, want %d", code, exitNotPlaced)
	}
	for _, want := range []string{"was not placed within 1ms: waiting for capacity: needs 2 GPUs", "gpumesh job stop gpu-1"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}
	if !strings.Contains(out.String(), "Ctrl-C stops watching and leaves the job queued") {
		t.Errorf("no hint on how to detach:\n%s", out.String())
	}
}

func TestPrintJSONNumbersAndLayout(t *testing.T) {
	resp := &pb.GetJobResponse{
		Job:         &pb.Job{Id: "a", Generation: 7, SubmitTime: timestamppb.New(time.Date(2026, 12, 7, 0, 0, 0, 0, time.UTC)), Spec: &pb.JobSpec{Pipeline: &pb.PipelineSpec{Seed: 1 << 60}}},
		Allocations: []*pb.Allocation{{Generation: 7}},
		Index:       18446744073709551615,
	}
	var a, b bytes.Buffer
	if err := printJSON(&a, resp); err != nil {
		t.Fatal(err)
	}
	_ = printJSON(&b, resp)
	s := a.String()
	if s != b.String() {
		t.Fatal("two prints differ")
	}
	for _, want := range []string{`"generation": 7,`, `"index": 18446744073709551615`, `"seed": 1152921504606846976`, `"submit_time": "2026-12-07T00:00:00Z"`} {
		if !strings.Contains(s, want) {
			t.Errorf("lacks %s:\n%s", want, s)
		}
	}
	if strings.Contains(s, ":  ") || strings.Contains(s, `"7"`) {
		t.Errorf("doubled spaces or a number as a string:\n%s", s)
	}
}

func TestMemberStatusOfADeadMember(t *testing.T) {
	meta := &pb.Node{Status: "ready"}
	if got := memberStatus(&pb.Member{State: "alive", Meta: meta}); got != "ready" {
		t.Errorf("alive: %q", got)
	}
	for _, st := range []string{"dead", "left", "suspect"} {
		if got := memberStatus(&pb.Member{State: st, Meta: meta}); got != "-" {
			t.Errorf("%s member shows %q", st, got)
		}
	}
}

func TestDemoLogsGoToAFile(t *testing.T) {
	t.Setenv("TMPDIR", t.TempDir())
	var stderr, out bytes.Buffer
	w, closeLog, err := devLogOutput(true, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	hclog.New(&hclog.LoggerOptions{Output: w}).Error("connection reset")
	closeLog(&out)
	if stderr.Len() != 0 {
		t.Fatalf("agent logs reached the terminal: %q", stderr.String())
	}
	path := strings.TrimSpace(strings.TrimPrefix(out.String(), "==> agent logs: "))
	b, err := os.ReadFile(path)
	if err != nil || !strings.Contains(string(b), "[ERROR] connection reset") {
		t.Fatalf("log file %q: %v %q", path, err, b)
	}
	// Nothing logged: no file left behind, nothing printed.
	out.Reset()
	w, closeLog, _ = devLogOutput(true, &stderr)
	f := w.(*os.File).Name()
	closeLog(&out)
	if _, err := os.Stat(f); !os.IsNotExist(err) || out.Len() != 0 {
		t.Fatalf("an empty log file is kept (%v) or named (%q)", err, out.String())
	}
	// Without --demo the logs stay on standard error.
	w, _, _ = devLogOutput(false, &stderr)
	if w != io.Writer(&stderr) {
		t.Fatal("dev without --demo logs elsewhere than standard error")
	}
}

func TestSecondsReadable(t *testing.T) {
	for in, want := range map[float64]string{0.00079276: "793µs", 0.0123456: "12.3ms", 1.2549: "1.25s", 0: "0s", 125.4: "2m5s"} {
		if got := seconds(in); got != want {
			t.Errorf("seconds(%g) = %q, want %q", in, got, want)
		}
	}
}

// `job run` of a new service whose replica slot crash-loops stops watching
// (a service never ends, and replicas that die at once are never seen
// running): exit status 1, the crash loop with the command that shows its
// output, and what to do next. Before, it watched for ever.
func TestJobRunStopsWatchingACrashLoopingService(t *testing.T) {
	spec, err := jobspec.Parse([]byte("name: broken\ntype: service\nreplicas: 1\nrestart: {delay: 1s}\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	now := timestamppb.Now()
	resp := &pb.GetJobResponse{
		Job: &pb.Job{Id: "broken-1", Spec: spec, Status: "running", WorldSize: 1, Generation: 3},
		Allocations: []*pb.Allocation{
			{Rank: 0, Generation: 3, NodeName: "node-1", DesiredStatus: "stop", ClientStatus: "failed", ExitCode: 3, SlotFailures: consensus.CrashLoopAt - 1, StartTime: now, FinishTime: now},
		},
	}
	// It saw generation 2 first: a replacement, which counts no restart.
	gen2 := &pb.GetJobResponse{
		Job: &pb.Job{Id: "broken-1", Spec: spec, Status: "running", WorldSize: 1, Generation: 2},
		Allocations: []*pb.Allocation{
			{Rank: 0, Generation: 2, NodeName: "node-1", DesiredStatus: "stop", ClientStatus: "failed", ExitCode: 3, SlotFailures: consensus.CrashLoopAt - 2, StartTime: now, FinishTime: now},
		},
	}
	var out bytes.Buffer
	o := followOptions{placeTimeout: time.Minute}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	final, err := followJob(ctx, &jobSeq{resps: []*pb.GetJobResponse{gen2, resp}}, &clientFlags{timeout: time.Second}, "broken-1", o, &out)
	if !errors.Is(err, errCrashLoop) {
		t.Fatalf("followJob: %v; want errCrashLoop", err)
	}
	err = finishRun(&out, false, o, final, err)
	var stderr bytes.Buffer
	if code := exitStatus(err, &stderr); code != exitFailed {
		t.Fatalf("exit %d, want %d", code, exitFailed)
	}
	if strings.Contains(out.String(), "restart 0") || !strings.Contains(out.String(), "generation 3 placed (a replacement replica)\n") {
		t.Errorf("a service's new generation, want a replacement and no restart count:\n%s", out.String())
	}
	for _, want := range []string{"replica 0 crash-looping: 3 failures in a row", "its output: gpumesh job logs broken-1 --rank 0 --generation 3\n"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}
	for _, want := range []string{"service broken is crash-looping", "gpumesh service status broken", "gpumesh job stop broken-1"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("stderr lacks %q:\n%s", want, stderr.String())
		}
	}
	// Fewer failures in a row (SlotFailures counts those before the
	// replica's own), or a stopped service: not a crash loop.
	resp.Allocations[0].SlotFailures = consensus.CrashLoopAt - 2
	if crashLooping(resp, time.Now()) {
		t.Errorf("%d failures in a row counted as a crash loop", consensus.CrashLoopAt-1)
	}
	resp.Allocations[0].SlotFailures = consensus.CrashLoopAt - 1
	resp.Job.Status = "stopped"
	if crashLooping(resp, time.Now()) {
		t.Error("a stopped service counted as crash-looping")
	}
}

// jobSeq answers GetJob with its responses in turn, then the last one for
// ever; every other call panics.
type jobSeq struct {
	pb.ControlClient
	mu    sync.Mutex
	resps []*pb.GetJobResponse
}

func (f *jobSeq) GetJob(context.Context, *pb.GetJobRequest, ...grpc.CallOption) (*pb.GetJobResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := f.resps[0]
	if len(f.resps) > 1 {
		f.resps = f.resps[1:]
	}
	return r, nil
}

// `job run` says a job runs in its own words: ranks of an exec job, counted
// right; replicas of a service, with where to watch them.
func TestJobRunSaysRunningInItsOwnWords(t *testing.T) {
	svc, err := jobspec.Parse([]byte("name: web\ntype: service\nreplicas: 1\nexec: {command: [srv]}\n"))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		job  *pb.Job
		want string
	}{
		{&pb.Job{Id: "one-1", Status: "running", WorldSize: 1, Generation: 1, Spec: &pb.JobSpec{Type: "exec"}},
			"==> job one-1 running: 1 rank, generation 1 (follow with `gpumesh job logs one-1 -f`)\n"},
		{&pb.Job{Id: "web-1", Status: "running", WorldSize: 1, Generation: 4, Spec: svc},
			"==> service web (job web-1) running: 1 replica (see `gpumesh service status web`; their logs: `gpumesh job logs web-1 --all -f`)\n"},
	} {
		resp := &pb.GetJobResponse{Job: tc.job, Allocations: []*pb.Allocation{
			{Rank: 0, Generation: tc.job.Generation, NodeName: "node-1", DesiredStatus: "run", ClientStatus: "running"},
		}}
		var out bytes.Buffer
		if _, err := followJob(context.Background(), fakeJobs{resp: resp}, &clientFlags{timeout: time.Second}, tc.job.Id, followOptions{}, &out); err != nil {
			t.Fatal(err)
		}
		if !strings.HasSuffix(out.String(), tc.want) {
			t.Errorf("output ends %q, want %q", out.String(), tc.want)
		}
	}
}
