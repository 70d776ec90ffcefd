package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// torchPython is Debian's python3-torch interpreter.
const torchPython = "/usr/bin/python3"

func needTorch(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("runs PyTorch processes; skipped with -short")
	}
	if out, err := exec.Command(torchPython, "-c", "import torch").CombinedOutput(); err != nil {
		t.Skipf("%s has no PyTorch (install Debian's python3-torch): %v: %s", torchPython, err, out)
	}
}

// ckptEnv is the environment a rank of a job with checkpoint {uri, keep,
// every} gets from its agent, plus the test S3 server's endpoint and
// credentials (the agent's environment passes into its tasks).
func ckptEnv(t *testing.T, uri string, keep, every int, s3 *s3test.Server) []string {
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	env := []string{
		"PATH=/usr/bin:/bin",
		"HOME=" + t.TempDir(),
		"PYTHONPATH=" + filepath.Join(wd, "..", "..", "python"),
		"PYTHONUNBUFFERED=1",
		"OMP_NUM_THREADS=1",
		"GPUMESH_BIN=" + procs.Binary(t),
		"GPUMESH_CHECKPOINT_URI=" + uri,
		"GPUMESH_CHECKPOINT_KEEP=" + strconv.Itoa(keep),
		"GPUMESH_CHECKPOINT_EVERY=" + strconv.Itoa(every),
		// Nothing but the test server: no IMDS, no shared AWS files.
		"AWS_EC2_METADATA_DISABLED=true",
		"AWS_CONFIG_FILE=/dev/null",
		"AWS_SHARED_CREDENTIALS_FILE=/dev/null",
	}
	if s3 != nil {
		env = append(env, "GPUMESH_S3_ENDPOINT="+s3.URL, "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_REGION=us-east-1")
	}
	return env
}

// ddpRun is one run of testdata/ckpt_train.py as a Gloo world of
// processes on 127.0.0.1.
type ddpRun struct {
	cmds []*exec.Cmd
	outs []*syncBuffer
	done []chan error
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func startDDP(t *testing.T, world int, env []string, args ...string) *ddpRun {
	t.Helper()
	port := procs.FreePorts(t, "127.0.0.1", 1)[0]
	r := &ddpRun{}
	for rank := 0; rank < world; rank++ {
		cmd := exec.Command(torchPython, append([]string{"testdata/ckpt_train.py"}, args...)...)
		cmd.Env = append(append([]string{}, env...),
			"MASTER_ADDR=127.0.0.1", fmt.Sprintf("MASTER_PORT=%d", port),
			fmt.Sprintf("RANK=%d", rank), fmt.Sprintf("LOCAL_RANK=%d", rank), fmt.Sprintf("WORLD_SIZE=%d", world))
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		r.cmds, r.outs, r.done = append(r.cmds, cmd), append(r.outs, out), append(r.done, done)
	}
	t.Cleanup(func() {
		for i, c := range r.cmds {
			select {
			case <-r.done[i]:
			default:
				_ = c.Process.Kill()
				<-r.done[i]
			}
		}
	})
	return r
}

// wait waits for every rank to exit and returns their errors.
func (r *ddpRun) wait(t *testing.T, timeout time.Duration) []error {
	t.Helper()
	errs := make([]error, len(r.cmds))
	deadline := time.After(timeout)
	for i := range r.cmds {
		select {
		case errs[i] = <-r.done[i]:
			r.done[i] <- errs[i] // for Cleanup
		case <-deadline:
			t.Fatalf("rank %d still running after %v; output:\n%s", i, timeout, r.outs[i])
		}
	}
	return errs
}

func (r *ddpRun) mustSucceed(t *testing.T) {
	t.Helper()
	for i, err := range r.wait(t, 2*time.Minute) {
		if err != nil {
			t.Fatalf("rank %d: %v; output:\n%s", i, err, r.outs[i])
		}
	}
}

var stepRE = regexp.MustCompile(`(?m)^rank (\d+) step (\d+) `)

// lastStep is the last step a rank printed as done, or -1.
func lastStep(out string) int {
	m := stepRE.FindAllStringSubmatch(out, -1)
	if len(m) == 0 {
		return -1
	}
	n, _ := strconv.Atoi(m[len(m)-1][2])
	return n
}

func resumedFrom(t *testing.T, out string) int {
	t.Helper()
	m := regexp.MustCompile(`resumed from (-?\d+)`).FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no 'resumed from' in:\n%s", out)
	}
	n, _ := strconv.Atoi(m[1])
	return n
}

type paramsJSON struct {
	Step   int      `json:"step"`
	World  int      `json:"world"`
	Params []string `json:"params"`
}

func readParams(t *testing.T, path string) paramsJSON {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var p paramsJSON
	if err := json.Unmarshal(b, &p); err != nil {
		t.Fatal(err)
	}
	return p
}

// differing counts the parameters whose bits differ.
func differing(a, b paramsJSON) int {
	n := 0
	for i := range a.Params {
		if i >= len(b.Params) || a.Params[i] != b.Params[i] {
			n++
		}
	}
	return n + max(0, len(b.Params)-len(a.Params))
}

// A preemption that reaches one rank of a 2-rank DDP job (SIGTERM, as the
// agent sends on a spot notice or drain) makes both ranks save the same
// step and exit 0; the job resumed from that checkpoint loses no step and
// ends with parameters bit-identical to a reference that saved a
// checkpoint of the same step with the same world size and resumed from
// it. Checkpoints go to S3 (gofakes3 through the AWS SDK).
func TestPythonPreemptSavesAndResumesWithoutLoss(t *testing.T) {
	needTorch(t)
	const steps = 30
	s3 := s3test.NewServer(t, "ckpt")
	env := ckptEnv(t, "s3://ckpt/runs/preempted", 2, 0, s3)
	dir := t.TempDir()

	run := startDDP(t, 2, env, "--steps", strconv.Itoa(steps), "--step-sleep", "0.05")
	poll.Until(t, 90*time.Second, func() error {
		if n := lastStep(run.outs[1].String()); n < 10 {
			return fmt.Errorf("rank 1 at step %d", n)
		}
		return nil
	})
	if err := run.cmds[1].Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	run.mustSucceed(t)
	stopped := regexp.MustCompile(`rank 0 stopped at (\d+)`).FindStringSubmatch(run.outs[0].String())
	if stopped == nil {
		t.Fatalf("rank 0 did not stop on rank 1's preemption:\n%s", run.outs[0])
	}
	saved, _ := strconv.Atoi(stopped[1])
	for i, o := range run.outs {
		if last := lastStep(o.String()); last != saved {
			t.Fatalf("rank %d ran step %d but the checkpoint is of step %d: %d steps lost", i, last, saved, last-saved)
		}
	}
	if saved >= steps-1 {
		t.Fatalf("the run finished (step %d) before the preemption took effect", saved)
	}

	resumed := startDDP(t, 2, env, "--steps", strconv.Itoa(steps), "--out", filepath.Join(dir, "resumed.json"))
	resumed.mustSucceed(t)
	if got := resumedFrom(t, resumed.outs[0].String()); got != saved {
		t.Fatalf("resumed from %d, want %d (the checkpoint saved on preemption)", got, saved)
	}

	// Reference: save at the same step on purpose, resume from it.
	refEnv := ckptEnv(t, "s3://ckpt/runs/reference", 2, 0, s3)
	startDDP(t, 2, refEnv, "--steps", strconv.Itoa(steps), "--stop-at", strconv.Itoa(saved)).mustSucceed(t)
	ref := startDDP(t, 2, refEnv, "--steps", strconv.Itoa(steps), "--out", filepath.Join(dir, "reference.json"))
	ref.mustSucceed(t)
	a, b := readParams(t, filepath.Join(dir, "resumed.json")), readParams(t, filepath.Join(dir, "reference.json"))
	if a.Step != steps-1 || b.Step != steps-1 {
		t.Fatalf("final steps %d and %d, want %d", a.Step, b.Step, steps-1)
	}
	if n := differing(a, b); n != 0 {
		t.Fatalf("%d of %d parameters differ from the reference resumed at step %d", n, len(a.Params), saved)
	}
	// An uninterrupted run, for comparison (DDP may sum gradients in
	// another order after a restart; that is reported, not asserted).
	plain := startDDP(t, 2, ckptEnv(t, "s3://ckpt/runs/plain", 2, 0, s3), "--steps", strconv.Itoa(steps), "--out", filepath.Join(dir, "plain.json"))
	plain.mustSucceed(t)
	t.Logf("preempted at step %d, resumed, 0 steps lost; bit-identical to the reference resumed at %d; an uninterrupted run differs in %d of %d parameters",
		saved, saved, differing(a, readParams(t, filepath.Join(dir, "plain.json"))), len(a.Params))
}

// Kill -9 without notice: the job resumes from the last periodic
// checkpoint and loses at most `every` steps.
func TestPythonKillResumesFromPeriodicCheckpoint(t *testing.T) {
	needTorch(t)
	const every = 5
	uri := "file://" + t.TempDir()
	env := ckptEnv(t, uri, 2, every, nil)
	run := startDDP(t, 2, env, "--steps", "100", "--step-sleep", "0.05")
	poll.Until(t, 90*time.Second, func() error {
		if n := lastStep(run.outs[0].String()); n < 12 {
			return fmt.Errorf("rank 0 at step %d", n)
		}
		return nil
	})
	for _, c := range run.cmds {
		_ = c.Process.Kill()
	}
	run.wait(t, time.Minute)
	last := max(lastStep(run.outs[0].String()), lastStep(run.outs[1].String()))
	resumed := startDDP(t, 2, env, "--steps", strconv.Itoa(last+3))
	resumed.mustSucceed(t)
	from := resumedFrom(t, resumed.outs[0].String())
	if (from+1)%every != 0 || last-from > every || from > last {
		t.Fatalf("killed after step %d, resumed from %d: want the last periodic checkpoint (every %d)", last, from, every)
	}
	t.Logf("killed after step %d; resumed from step %d: %d steps lost (every %d)", last, from, last-from, every)
}

// A checkpoint write killed mid-upload (kill -9 of the process that
// uploads) leaves the previous checkpoint the newest, and nothing of the
// dead write is visible.
func TestCheckpointPutKilledMidUpload(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	uri := "file://" + filepath.Join(dir, "store")
	bin := procs.Binary(t)
	commitStep(t, bin, uri, 1)
	// The next write reads from a pipe that the test fills part way, so it
	// is certainly in the middle of its upload when it is killed.
	fifo := filepath.Join(dir, "fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	put := exec.Command(bin, "checkpoint", "--uri", uri, "put", "--step", "2", fifo)
	if err := put.Start(); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(fifo, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	if _, err := w.Write(bytes.Repeat([]byte("x"), 1<<20)); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 30*time.Second, func() error {
		m, _ := filepath.Glob(filepath.Join(dir, "store", "step-*2", "part-*.tmp-upload"))
		if len(m) == 0 {
			return fmt.Errorf("upload of step 2 not under way")
		}
		return nil
	})
	_ = put.Process.Kill()
	_ = put.Wait()

	st, err := checkpoint.NewFileStore(filepath.Join(dir, "store"))
	if err != nil {
		t.Fatal(err)
	}
	c, err := checkpoint.New(st, checkpoint.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	m, err := c.Latest(ctx)
	if err != nil || m.Step != 1 {
		t.Fatalf("Latest after a killed write = %d, %v; want step 1", m.Step, err)
	}
	if _, err := st.Size(ctx, checkpoint.PartKey(2, 0)); err == nil {
		t.Fatal("the killed upload's part is visible")
	}
	var lat latestJSON
	o, err := exec.Command(bin, "checkpoint", "--uri", uri, "latest").Output()
	if err != nil || json.Unmarshal(o, &lat) != nil || !lat.Found || lat.Manifest.Step != 1 {
		t.Fatalf("gpumesh checkpoint latest = %s, %v; want step 1", o, err)
	}
}

// commitStep saves a small state file as step of the checkpoints at uri
// through `gpumesh checkpoint put` and `commit`, as a rank without the
// agent's local API does; env (a job's variables) is added to the
// commands' environment.
func commitStep(t *testing.T, bin, uri string, step int, env ...string) {
	t.Helper()
	state := filepath.Join(t.TempDir(), "state")
	if err := os.WriteFile(state, fmt.Appendf(nil, "step %d state", step), 0o644); err != nil {
		t.Fatal(err)
	}
	run := func(args ...string) string {
		cmd := exec.Command(bin, append([]string{"checkpoint", "--uri", uri}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("gpumesh checkpoint %s: %v\n%s", args[0], err, stderr.Bytes())
		}
		return string(out)
	}
	part := run("put", "--step", strconv.Itoa(step), state)
	run("commit", "--step", strconv.Itoa(step), "--parts", "["+strings.TrimSpace(part)+"]")
}
