package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// A rank's agent restarts (an upgrade, a crash: the rank lives on and is
// adopted) between the rank's first checkpoint request and its save: the
// save waits for the agent to come back and goes through, instead of
// failing the generation on the dropped connection.
func TestPythonCheckpointSurvivesAgentRestart(t *testing.T) {
	needTorch(t)
	procs.Binary(t)
	as := startAgents(t, 3, "--node-loss-grace", "60s")
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	sync := filepath.Join(dir, "sync")
	if err := os.Mkdir(sync, 0o755); err != nil {
		t.Fatal(err)
	}
	script := `import os, time, torch, gpumesh.checkpoint as ck
state, step = ck.load()
print("LOADED", step, flush=True)
d = os.environ["SYNC_DIR"]
open(os.path.join(d, "ready"), "w").close()
while not os.path.exists(os.path.join(d, "go")):
    time.sleep(0.05)
ck.save({"w": torch.ones(3)}, step=4)
print("SAVED", flush=True)`
	spec := map[string]any{
		"name": "ckpt-agent-restart", "ranks": 1, "restart": map[string]any{"attempts": 0},
		"checkpoint": map[string]any{"uri": "file://" + filepath.Join(dir, "store")},
		"exec": map[string]any{
			"command": []string{torchPython, "-c", script},
			"env":     map[string]string{"PYTHONPATH": filepath.Join(wd, "..", "..", "python"), "SYNC_DIR": sync},
		},
	}
	sub, _ := runDetached(ctx, t, as[0].RPCAddr(), dir, spec)
	poll.Until(t, 90*time.Second, func() error {
		_, err := os.Stat(filepath.Join(sync, "ready"))
		return err
	}, "the rank connected to its agent")
	var j jobJSON
	if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
		t.Fatal(err)
	}
	var victim *procs.Agent
	for _, a := range as {
		if len(j.Allocations) == 1 && a.Name == j.Allocations[0].NodeName {
			victim = a
		}
	}
	if victim == nil {
		t.Fatalf("no agent runs the rank: %+v", j.Allocations)
	}
	// Only the agent dies: its tasks live under supervisors.
	if err := victim.Signal(syscall.SIGKILL, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sync, "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	victim.Start()
	var final jobJSON
	poll.Until(t, 2*time.Minute, func() error {
		if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &final, "job", "status", sub.ID); err != nil {
			return err
		}
		if final.Job.Status != "complete" && final.Job.Status != "failed" {
			return fmt.Errorf("job %s at generation %d", final.Job.Status, final.Job.Generation)
		}
		return nil
	}, "the job ends")
	// The rank's logs live on the restarted agent, which the agent asked
	// may still be reconnecting to: read them once the commands succeed.
	var out, stderr string
	poll.Until(t, 30*time.Second, func() error {
		var errOut string
		var err error
		if out, errOut, err = procs.CLI(ctx, t, as[0].RPCAddr(), "job", "logs", sub.ID, "--rank", "0", "--generation", "1"); err != nil {
			return fmt.Errorf("job logs: %v: %s", err, errOut)
		}
		if stderr, errOut, err = procs.CLI(ctx, t, as[0].RPCAddr(), "job", "logs", sub.ID, "--rank", "0", "--generation", "1", "--stderr"); err != nil {
			return fmt.Errorf("job logs --stderr: %v: %s", err, errOut)
		}
		return nil
	}, "the rank's logs can be read")
	if final.Job.Status != "complete" || final.Job.Generation != 1 || !strings.Contains(out, "SAVED") {
		t.Fatalf("job %s at generation %d; rank output:\n%s\nstderr:\n%s", final.Job.Status, final.Job.Generation, out, stderr)
	}
	if !strings.Contains(stderr, "waiting up to") {
		t.Fatalf("the rank did not say it waited for its agent:\n%s", stderr)
	}
	if _, err := os.Stat(filepath.Join(dir, "store", filepath.FromSlash(checkpoint.ManifestKey(4)))); err != nil {
		t.Fatalf("the checkpoint of step 4 is not committed: %v", err)
	}
}
