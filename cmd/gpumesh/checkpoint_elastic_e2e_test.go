package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// Issue 19's elastic test: a DDP job with min_ranks 2 and max_ranks 3 runs
// with 2 ranks (only two agents offer spot capacity, one rank each); a
// third spot agent joins; the scheduler regrows the job, its ranks are
// told (SIGTERM), save the step they are at, and generation 2 runs with 3
// ranks from that checkpoint, losing no step.
func TestElasticJobGrowsFromCheckpointWhenANodeJoins(t *testing.T) {
	needTorch(t)
	const steps = 3000
	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < 4; i++ {
		lifecycle := "spot"
		if i == 2 {
			lifecycle = "on-demand" // a server the job's constraint keeps out
		}
		as = append(as, procs.NewAgent(t, dir, fmt.Sprintf("agent-%d", i+1), fmt.Sprintf("127.0.0.%d", i+2),
			"--bootstrap-expect", "3", "--max-ranks-per-node", "1", "--ec2", "off", "--lifecycle", lifecycle, "--az", "us-east-1a"))
	}
	procs.StartJoined(as[:3])
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 5000))
			}
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as[:3]); return err })

	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(dir, "final.json")
	spec := map[string]any{
		"name": "elastic-ddp", "min_ranks": 2, "max_ranks": 3, "placement": "spread",
		"constraints": map[string]any{"lifecycle": "spot"},
		"checkpoint":  map[string]any{"uri": "file://" + filepath.Join(dir, "ckpt")},
		"exec": map[string]any{
			"command": []string{torchPython, filepath.Join(wd, "testdata", "ckpt_train.py"), "--steps", strconv.Itoa(steps), "--step-sleep", "0.05", "--slow-generation", "1", "--out", out},
			"env":     map[string]string{"PYTHONPATH": filepath.Join(wd, "..", "..", "python")},
		},
	}
	sub, logs := runDetached(ctx, t, as[0].RPCAddr(), dir, spec)
	var j jobJSON
	poll.Until(t, 90*time.Second, func() error {
		if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.Generation != 1 || j.Job.WorldSize != 2 {
			return fmt.Errorf("generation %d with %d ranks (%s)", j.Job.Generation, j.Job.WorldSize, j.Job.Status)
		}
		for r := 0; r < 2; r++ {
			if n := lastStep(logs(r, 1)); n < 1 {
				return fmt.Errorf("rank %d of generation 1 at step %d", r, n)
			}
		}
		return nil
	}, "generation 1 training with 2 ranks")

	as[3].Args = append(as[3].Args, "--join", as[0].GossipAddr())
	joined := time.Now()
	as[3].Start()
	var grownAt time.Duration
	poll.Until(t, 2*time.Minute, func() error {
		if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.WorldSize != 3 {
			return fmt.Errorf("generation %d with %d ranks (%s)", j.Job.Generation, j.Job.WorldSize, j.Job.Status)
		}
		for r := 0; r < 3; r++ {
			if lastStep(logs(r, j.Job.Generation)) < 0 {
				return fmt.Errorf("rank %d of generation %d has not stepped", r, j.Job.Generation)
			}
		}
		if grownAt == 0 {
			grownAt = time.Since(joined)
		}
		return nil
	}, "the job to grow to 3 ranks")
	gen := j.Job.Generation
	saved := -1
	for r := 0; r < 2; r++ {
		l := logs(r, gen-1)
		m := regexp.MustCompile(`stopped at (\d+)`).FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("rank %d of generation %d did not save and stop:\n%s", r, gen-1, tail(l, 2000))
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
		if got := resumedFrom(t, logs(r, gen)); got != saved {
			t.Fatalf("rank %d of generation %d resumed from %d, want %d", r, gen, got, saved)
		}
	}
	poll.Until(t, 2*time.Minute, func() error {
		if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.Status != "complete" {
			return fmt.Errorf("job %s", j.Job.Status)
		}
		return nil
	}, "the grown job to complete")
	// Job status shows what each generation did: the last step the old
	// ranks finished and the step the new ones resumed from (no step lost).
	var st struct {
		Allocations []struct {
			Generation uint64         `json:"generation"`
			Rank       int            `json:"rank"`
			Result     map[string]any `json:"result"`
		} `json:"allocations"`
	}
	if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &st, "job", "status", sub.ID); err != nil {
		t.Fatal(err)
	}
	for _, al := range st.Allocations {
		c, _ := al.Result["checkpoint"].(map[string]any)
		switch al.Generation {
		case gen - 1:
			if c["last_step"] != float64(saved) {
				t.Fatalf("job status: generation %d rank %d last_step %v, want %d (%v)", al.Generation, al.Rank, c["last_step"], saved, al.Result)
			}
		case gen:
			if c["resumed_step"] != float64(saved) {
				t.Fatalf("job status: generation %d rank %d resumed_step %v, want %d (%v)", al.Generation, al.Rank, c["resumed_step"], saved, al.Result)
			}
		}
	}
	if p := readParams(t, out); p.World != 3 || p.Step != steps-1 {
		t.Fatalf("the job ended at step %d with world %d, want %d and 3", p.Step, p.World, steps-1)
	}
	t.Logf("agent-4 joined; %v later the job ran 3 ranks as generation %d from the checkpoint of step %d, 0 steps lost", grownAt.Round(time.Millisecond), gen, saved)
}
