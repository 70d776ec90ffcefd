package node

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// A rank running as its job's own dynamic user (the agent's default on a
// real host) saves and loads a checkpoint through its agent into a file://
// store it has no permission to touch itself (the agent writes it), and
// the second generation finds it.
func TestTorchDynamicUserCheckpoints(t *testing.T) {
	needTorch(t)
	if os.Geteuid() != 0 {
		t.Skip("running tasks as another user needs root")
	}
	dc := startCluster(t, 1, func(i int, c *Config) {
		c.CollectiveTimeout = torchCollectiveTimeout
		c.TaskUser = DynamicTaskUser
		c.TaskUIDs = UIDRange{First: 2_200_000, Last: 2_200_999}
	})
	for p := dc.DataDir(); p != filepath.Clean(os.TempDir()); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	store := t.TempDir() // 0700, owned by the agent's user
	c := client(t, dc.Agents[0])
	// Generation 1 saves step 7 and fails on purpose; generation 2 loads it.
	script := `import os, sys, torch, gpumesh.checkpoint as ck
state, step = ck.load()
if step < 0:
    ck.save({"w": torch.arange(6, dtype=torch.float32), "uid": os.getuid()}, step=7)
    print("SAVED uid", os.getuid(), flush=True)
    sys.exit(3)
assert step == 7 and state["w"].tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0], (step, state)
print("LOADED step", step, "saved by uid", state["uid"], "read by uid", os.getuid(), flush=True)`
	spec := &pb.JobSpec{Name: "ckpt-as-job-user", Type: "exec", Ranks: 1,
		Checkpoint: &pb.CheckpointSpec{Uri: "file://" + store, Keep: 2},
		Exec: &pb.ExecSpec{Command: []string{torchPython, "-c", script},
			Env: map[string]string{"PYTHONPATH": repoPath(t, "python"), "PYTHONFAULTHANDLER": "1"}}}
	jobspec.ApplyDefaults(spec)
	spec.Restart = &pb.RestartPolicy{Attempts: 1}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Id
	j := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if j.Job.Status != consensus.JobComplete {
		t.Fatalf("job %s (%s):\n%s\n%s", j.Job.Status, j.Job.StatusReason, rankLogs(t, c, id, 1, 1), taskStderr(dc))
	}
	gen1, gen2 := rankLogs(t, c, id, 1, 1), rankLogs(t, c, id, 1, 2)
	if !strings.Contains(gen1, "SAVED uid 22") || !strings.Contains(gen2, "LOADED step 7 saved by uid 22") {
		t.Fatalf("want generation 1 to save and generation 2 to load as dynamic users:\n%s\n%s", gen1, gen2)
	}
}
