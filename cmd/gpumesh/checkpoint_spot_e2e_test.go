package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	"github.com/gpumesh/gpumesh/deploy/aemmtest"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// Issue 19's spot test: a 3-rank CPU DDP job (Debian's PyTorch, Gloo) with
// a checkpoint block runs on three agents; ec2-metadata-mock gives agent-1
// a spot interruption notice. The ranks save the step they are at and stop;
// generation 2 runs on the two other agents from that checkpoint (in S3,
// gofakes3 through the AWS SDK) to the end. No step is lost, and the final
// parameters are bit-identical to a reference that saved a checkpoint of
// the same step with the same world size and resumed from it.
func TestSpotNoticeResumesDDPFromCheckpoint(t *testing.T) {
	needTorch(t)
	const noticeDelay = 45 * time.Second
	const steps = 3000
	procs.Binary(t)
	aemmtest.Binary(t)
	s3 := s3test.NewServer(t, "ckpt")
	mock := aemmtest.Start(t, aemmtest.Options{SpotDelay: noticeDelay, RebalanceDelay: time.Hour, IPCount: -1, Values: map[string]string{
		"instance-life-cycle": "spot", "instance-type": "c7i.large", "placement-availability-zone": "us-east-1a",
	}})
	noticeAt := time.Now().Add(noticeDelay)

	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < 3; i++ {
		args := []string{"--bootstrap-expect", "3", "--max-ranks-per-node", "4"}
		if i == 0 {
			args = append(args, "--imds-endpoint", mock, "--imds-poll", "500ms")
		} else {
			args = append(args, "--ec2", "off", "--lifecycle", "spot", "--az", "us-east-1a")
		}
		as = append(as, procs.NewAgent(t, dir, fmt.Sprintf("agent-%d", i+1), fmt.Sprintf("127.0.0.%d", i+2), args...))
	}
	procs.StartJoined(as)
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 6000))
			}
		}
	})
	victim := as[0]
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })

	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "final.json")
	spec := map[string]any{
		"name": "spot-ddp", "ranks": 3, "placement": "spread", "kill_timeout": "60s",
		"checkpoint": map[string]any{"uri": "s3://ckpt/spot-ddp"},
		"exec": map[string]any{
			"command": []string{torchPython, filepath.Join(wd, "testdata", "ckpt_train.py"), "--steps", strconv.Itoa(steps), "--step-sleep", "0.05", "--slow-generation", "1", "--out", out},
			"env":     s3JobEnv(t, s3),
		},
	}
	sub, logs := runDetached(ctx, t, as[1].RPCAddr(), dir, spec)
	final := trainThenComplete(ctx, t, as[1].RPCAddr(), sub.ID, logs, noticeDelay, 4*time.Minute)
	var hist struct {
		Allocations []struct {
			Generation   uint64 `json:"generation"`
			Rank         int    `json:"rank"`
			NodeName     string `json:"node_name"`
			ClientStatus string `json:"client_status"`
			ExitCode     int    `json:"exit_code"`
			Message      string `json:"message"`
		} `json:"allocations"`
	}
	if err := procs.CLIJSON(ctx, t, as[1].RPCAddr(), &hist, "job", "status", sub.ID); err == nil {
		for _, al := range hist.Allocations {
			t.Logf("generation %d rank %d on %s: %s exit %d %s", al.Generation, al.Rank, al.NodeName, al.ClientStatus, al.ExitCode, al.Message)
			if al.Generation > 1 && al.Generation < final.Job.Generation {
				t.Logf("its log:\n%s", tail(logs(al.Rank, al.Generation), 1500))
			}
		}
	}
	if final.Job.Generation < 2 {
		t.Fatalf("the job completed in generation %d: the notice never reached it (steps too few?)", final.Job.Generation)
	}
	for _, al := range final.Allocations {
		if al.Generation == final.Job.Generation && al.NodeName == victim.Name {
			t.Fatalf("generation %d placed rank %d on the interrupted node", al.Generation, al.Rank)
		}
	}
	if time.Now().Before(noticeAt) {
		t.Fatal("the job moved before the notice was due")
	}
	saved := -1
	for r := 0; r < 3; r++ {
		l := logs(r, 1)
		m := regexp.MustCompile(`stopped at (\d+)`).FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("rank %d of generation 1 did not save and stop:\n%s", r, tail(l, 2000))
		}
		s, _ := strconv.Atoi(m[1])
		if saved >= 0 && s != saved {
			t.Fatalf("ranks saved different steps: %d and %d", saved, s)
		}
		saved = s
		if last := lastStep(l); last != saved {
			t.Fatalf("rank %d ran step %d, checkpoint of step %d: %d steps lost", r, last, saved, last-saved)
		}
	}
	for r := 0; r < 3; r++ {
		l := logs(r, final.Job.Generation)
		if got := resumedFrom(t, l); got != saved {
			t.Fatalf("rank %d of generation %d resumed from %d, want %d", r, final.Job.Generation, got, saved)
		}
		// The agent had fetched it before the rank asked.
		m := regexp.MustCompile(`resumed from -?\d+ (\{.*\})`).FindStringSubmatch(l)
		var load struct {
			Source          string  `json:"source"`
			PrefetchSeconds float64 `json:"prefetch_seconds"`
		}
		if m == nil || json.Unmarshal([]byte(m[1]), &load) != nil || load.Source != "prefetch" {
			t.Fatalf("rank %d did not load the agent's prefetched copy: %q", r, m)
		}
		t.Logf("rank %d: checkpoint prefetched by its agent in %.3f s", r, load.PrefetchSeconds)
	}
	// The download time is in the job's status (the allocation's result).
	var st struct {
		Allocations []struct {
			Generation uint64         `json:"generation"`
			Rank       int            `json:"rank"`
			Result     map[string]any `json:"result"`
		} `json:"allocations"`
	}
	if err := procs.CLIJSON(ctx, t, as[1].RPCAddr(), &st, "job", "status", sub.ID); err != nil {
		t.Fatal(err)
	}
	for _, al := range st.Allocations {
		if al.Generation != final.Job.Generation {
			continue
		}
		p, ok := al.Result["checkpoint_prefetch"].(map[string]any)
		if !ok || p["found"] != true || p["step"] != float64(saved) {
			t.Fatalf("job status of rank %d shows no prefetch of step %d: %v", al.Rank, saved, al.Result)
		}
	}
	t.Logf("notice at %s; generation 1 saved step %d and stopped; generation %d resumed from it, 0 steps lost",
		noticeAt.Format(time.TimeOnly), saved, final.Job.Generation)

	// Reference: the same world size saves at the same step on purpose and
	// resumes from it.
	refEnv := ckptEnv(t, "file://"+filepath.Join(dir, "ref"), 3, 0, nil)
	startDDP(t, 3, refEnv, "--steps", strconv.Itoa(steps), "--stop-at", strconv.Itoa(saved)).mustSucceed(t)
	ref := filepath.Join(dir, "reference.json")
	startDDP(t, 3, refEnv, "--steps", strconv.Itoa(steps), "--out", ref).mustSucceed(t)
	a, r := readParams(t, out), readParams(t, ref)
	if a.Step != steps-1 || a.World != 3 {
		t.Fatalf("the job ended at step %d with world %d, want %d and 3", a.Step, a.World, steps-1)
	}
	if n := differing(a, r); n != 0 {
		t.Fatalf("%d of %d parameters differ from the reference resumed at step %d", n, len(a.Params), saved)
	}
}

// submitted is the part of `job run --detach --json` the tests read.
type submitted struct {
	ID string `json:"id"`
}

// s3JobEnv is the exec.env of a test job whose ranks use this checkout's
// Python package and the test S3 server s3, and nothing else of AWS (no
// IMDS, no shared AWS files).
func s3JobEnv(t *testing.T, s3 *s3test.Server) map[string]string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	return map[string]string{
		"PYTHONPATH":          filepath.Join(wd, "..", "..", "python"),
		"GPUMESH_S3_ENDPOINT": s3.URL, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
		"AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
	}
}

// runDetached writes spec as a JSON job file in dir, submits it through the
// agent at addr with `job run --detach` and flags, and returns what the
// submission answered and a reader of one rank's log of one generation.
func runDetached(ctx context.Context, t *testing.T, addr, dir string, spec any, flags ...string) (submitted, func(rank int, gen uint64) string) {
	t.Helper()
	specPath := filepath.Join(dir, "job.json")
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(specPath, b, 0o644); err != nil {
		t.Fatal(err)
	}
	var sub submitted
	if err := procs.CLIJSON(ctx, t, addr, &sub, append(append([]string{"job", "run", "--detach"}, flags...), specPath)...); err != nil {
		t.Fatal(err)
	}
	logs := func(rank int, gen uint64) string {
		o, _, _ := procs.CLI(ctx, t, addr, "job", "logs", sub.ID, "--rank", strconv.Itoa(rank), "--generation", strconv.FormatUint(gen, 10))
		return o
	}
	return sub, logs
}

// trainThenComplete waits until every rank of the job's 3-rank generation 1
// has logged a training step (within first: before the spot notice comes),
// then until the job completes (within total), and returns its final state.
func trainThenComplete(ctx context.Context, t *testing.T, addr, id string, logs func(rank int, gen uint64) string, first, total time.Duration) jobJSON {
	t.Helper()
	poll.Until(t, first, func() error {
		for r := 0; r < 3; r++ {
			if n := lastStep(logs(r, 1)); n < 1 {
				return fmt.Errorf("rank %d of generation 1 at step %d", r, n)
			}
		}
		return nil
	}, "generation 1 training before the notice")
	var final jobJSON
	poll.Until(t, total, func() error {
		if err := procs.CLIJSON(ctx, t, addr, &final, "job", "status", id); err != nil {
			return err
		}
		if final.Job.Status != "complete" {
			return fmt.Errorf("job %s at generation %d", final.Job.Status, final.Job.Generation)
		}
		return nil
	}, "the job to complete after the notice")
	return final
}
