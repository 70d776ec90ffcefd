package node

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// An agent whose data dir is too long for a Unix socket runs without its
// local API. A rank that asks for the gpumesh backend there is told which
// agent, why, and what to do, not that it is "not an exec rank".
func TestRankWithoutLocalAPISaysWhy(t *testing.T) {
	needTorch(t)
	dc := startCluster(t, 1, func(i int, c *Config) {
		c.CollectiveTimeout = torchCollectiveTimeout
		c.DataDir = filepath.Join(c.DataDir, strings.Repeat("d", 110))
	})
	a := dc.Agents[0]
	if a.local != nil {
		t.Fatalf("local API on at %s; want it off", a.local.srv.SocketPath())
	}
	c := client(t, a)
	id := torchJob(t, c, 1, "pack", 0, "-c", `import torch.distributed as dist, gpumesh.torch
dist.init_process_group("gpumesh")`)
	j := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if j.Job.Status != consensus.JobFailed {
		t.Fatalf("job %s: %s (%s); want failed", id, j.Job.Status, j.Job.StatusReason)
	}
	logs := rankLogs(t, c, id, 1, 1)
	for _, want := range []string{
		"gpumesh backend: agent " + a.Name() + " runs without its local API: ",
		"The backend needs that API",
		"use a shorter data dir",
		"backend 'gloo'",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("the rank's output does not say %q:\n%s", want, logs)
		}
	}
}

// Without its local API the agent still checks, at a rank's start, that the
// newest checkpoint under the job's checkpoint.uri is the job's own: a job
// of another name fails at once, with the refusal as its reason and no
// restarts, as it does with the local API (the rank's own `gpumesh
// checkpoint` would refuse too, but only as an exit code that restarts).
func TestCheckpointOfAnotherJobRefusedWithoutLocalAPI(t *testing.T) {
	store := filepath.Join(t.TempDir(), "store")
	fs, err := checkpoint.NewFileStore(store)
	if err != nil {
		t.Fatal(err)
	}
	ck, err := checkpoint.New(fs, checkpoint.Config{})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	part, err := ck.PutPart(ctx, 4, 0, strings.NewReader("state"))
	if err != nil {
		t.Fatal(err)
	}
	if err := ck.Commit(ctx, checkpoint.Manifest{Step: 4, WorldSize: 1, Parts: []checkpoint.Part{part}, Job: "train-0000000a", JobName: "train"}); err != nil {
		t.Fatal(err)
	}

	dc := startCluster(t, 1, func(i int, c *Config) {
		c.DataDir = filepath.Join(c.DataDir, strings.Repeat("d", 110))
	})
	a := dc.Agents[0]
	if a.local != nil {
		t.Fatalf("local API on at %s; want it off", a.local.srv.SocketPath())
	}
	c := client(t, a)
	spec := &pb.JobSpec{Name: "eval", Type: "exec", Ranks: 1,
		Checkpoint: &pb.CheckpointSpec{Uri: "file://" + store},
		Exec:       &pb.ExecSpec{Command: []string{"sleep", "600"}}}
	jobspec.ApplyDefaults(spec)
	spec.Restart = &pb.RestartPolicy{Attempts: 2, Delay: durationpb.New(100 * time.Millisecond)}
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	j := waitJob(t, c, resp.Id, time.Minute, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if j.Job.Status != consensus.JobFailed || j.Job.Generation != 1 || j.Job.Restarts != 0 {
		t.Fatalf("job %s: %s at generation %d after %d restarts (%s); want failed at 1 without restarts", resp.Id, j.Job.Status, j.Job.Generation, j.Job.Restarts, j.Job.StatusReason)
	}
	for _, want := range []string{`written by job "train"`, `this is job "eval"`, "resume_from: train"} {
		if !strings.Contains(j.Job.StatusReason, want) {
			t.Errorf("status reason does not say %q: %s", want, j.Job.StatusReason)
		}
	}
}
