package node

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
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
		"this node's gpumesh agent runs without the local API the backend needs",
		"agent " + a.Name() + " runs without its local API",
		"use a shorter data dir",
		"backend 'gloo'",
	} {
		if !strings.Contains(logs, want) {
			t.Errorf("the rank's output does not say %q:\n%s", want, logs)
		}
	}
}
