package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// Issue 19's kill -9 test through the agents: a 3-rank Gloo DDP job saves
// a checkpoint every 5 steps (each rank's agent stores it, over the local
// API); the agent of rank 1 and its processes are killed with SIGKILL, no
// notice. The job resumes on the other two agents from the newest periodic
// checkpoint, at most `every` steps are lost, and job status says how
// many.
func TestKilledNodeResumesFromPeriodicCheckpoint(t *testing.T) {
	needTorch(t)
	const every, steps = 5, 300
	procs.Binary(t)
	as := startAgents(t, 3, "--max-ranks-per-node", "4", "--node-loss-grace", "1s")
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	spec := map[string]any{
		"name": "kill-ddp", "ranks": 3, "placement": "spread", "kill_timeout": "5s",
		"checkpoint": map[string]any{"uri": "file://" + filepath.Join(dir, "store"), "every": every},
		"exec": map[string]any{
			"command": []string{torchPython, filepath.Join(wd, "testdata", "ckpt_train.py"), "--steps", strconv.Itoa(steps), "--step-sleep", "0.1", "--slow-generation", "1"},
			"env":     map[string]string{"PYTHONPATH": filepath.Join(wd, "..", "..", "python")},
		},
	}
	sub, logs := runDetached(ctx, t, as[0].RPCAddr(), dir, spec)
	poll.Until(t, 90*time.Second, func() error {
		for r := 0; r < 3; r++ {
			if n := lastStep(logs(r, 1)); n < 3*every {
				return fmt.Errorf("rank %d of generation 1 at step %d", r, n)
			}
		}
		return nil
	}, "generation 1 past two periodic checkpoints")
	var victim, survivor *procs.Agent
	var j jobJSON
	if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
		t.Fatal(err)
	}
	for _, al := range j.Allocations {
		for _, a := range as {
			if al.Generation == 1 && al.Rank == 1 && a.Name == al.NodeName {
				victim = a
			}
		}
	}
	for _, a := range as {
		if a != victim {
			survivor = a
		}
	}
	if victim == nil {
		t.Fatalf("no node runs rank 1: %+v", j.Allocations)
	}
	// A node that dies takes its tasks with it; the agent's own SIGKILL
	// would not (tasks run under supervisors that outlive an agent).
	tasks := regexp.MustCompile(`task started: task=`+regexp.QuoteMeta(sub.ID)+`/\S+ pid=(\d+) supervisor_pid=(\d+)`).FindAllStringSubmatch(victim.Logs(), -1)
	if len(tasks) == 0 {
		t.Fatalf("%s logged no task of the job", victim.Name)
	}
	victim.Kill()
	for _, m := range tasks {
		for _, p := range m[1:] {
			pid, _ := strconv.Atoi(p)
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
	// Logs are read through a live agent from here on.
	logs = func(rank int, gen uint64) string {
		o, _, _ := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "logs", sub.ID, "--rank", strconv.Itoa(rank), "--generation", strconv.FormatUint(gen, 10))
		return o
	}

	var final jobJSON
	poll.Until(t, 3*time.Minute, func() error {
		if err := procs.CLIJSON(ctx, t, survivor.RPCAddr(), &final, "job", "status", sub.ID); err != nil {
			return err
		}
		if final.Job.Status != "complete" {
			return fmt.Errorf("job %s at generation %d", final.Job.Status, final.Job.Generation)
		}
		return nil
	}, "the job to complete on the two other agents")
	last := -1
	for r := 0; r < 3; r++ {
		if r != 1 {
			last = max(last, lastStep(logs(r, 1)))
		}
	}
	gen := final.Job.Generation
	from := resumedFrom(t, logs(0, gen))
	if from < 0 || (from+1)%every != 0 || last-from > every || last-from < 0 {
		t.Fatalf("generation %d resumed from step %d; generation 1 finished step %d (every %d)", gen, from, last, every)
	}
	for r := 0; r < 3; r++ {
		l := logs(r, gen)
		if got := resumedFrom(t, l); got != from {
			t.Fatalf("rank %d of generation %d resumed from %d, rank 0 from %d", r, gen, got, from)
		}
		if !regexp.MustCompile(`"source": "prefetch"`).MatchString(l) {
			t.Fatalf("rank %d of generation %d did not load its agent's copy:\n%s", r, gen, tail(l, 1500))
		}
	}
	out, _, err := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "status", sub.ID)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf("generation %d resumed at step %d, %d steps lost", gen, from, last-from)
	if !regexp.MustCompile(regexp.QuoteMeta(want)).MatchString(out) {
		t.Fatalf("job status does not say %q:\n%s", want, out)
	}
	t.Logf("killed after step %d; generation %d resumed from step %d: %d steps lost (every %d)", last, gen, from, last-from, every)
}
