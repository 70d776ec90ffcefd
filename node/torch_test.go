package node

import (
	"context"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/ddpout"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node/driver"
	"github.com/gpumesh/gpumesh/node/localapi"
)

// torchPython is Debian's python3-torch interpreter; tests that run real
// PyTorch skip (saying why) only when it lacks torch.
const torchPython = "/usr/bin/python3"

func needTorch(t *testing.T) {
	t.Helper()
	out, err := exec.Command(torchPython, "-c", "import torch, torch.distributed; print(torch.__version__)").CombinedOutput()
	if err != nil {
		t.Skipf("%s has no PyTorch (install Debian's python3-torch): %v: %s", torchPython, err, strings.TrimSpace(string(out)))
	}
}

// startTorchCluster starts n agents with a collective timeout that leaves
// room for Python processes on a loaded 2-core machine (importing torch
// takes seconds there).
func startTorchCluster(t *testing.T, n int) *DevCluster {
	return startCluster(t, n, func(i int, c *Config) { c.CollectiveTimeout = torchCollectiveTimeout })
}

const torchCollectiveTimeout = 30 * time.Second

func repoPath(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func readOutputs(t *testing.T, dir string, n int) []ddpout.RankOutput {
	t.Helper()
	out, err := ddpout.Read(dir, n)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// torchJob submits a Python script as an exec job with the gpumesh package
// on PYTHONPATH.
func torchJob(t *testing.T, c pb.ControlClient, ranks int, placement string, attempts int32, args ...string) string {
	t.Helper()
	spec := &pb.JobSpec{Name: "torch", Type: "exec", Ranks: int32(ranks), Placement: placement,
		// MASTER_PORT: a free port of the test's own, since the scheduler's
		// pick (29500 first) may be held by another torch process on the
		// machine.
		Exec: &pb.ExecSpec{Command: append([]string{"env", fmt.Sprintf("MASTER_PORT=%d", procs.FreePorts(t, "127.0.0.1", 1)[0]), torchPython}, args...), Env: map[string]string{"PYTHONPATH": repoPath(t, "python"), "PYTHONFAULTHANDLER": "1"}}}
	jobspec.ApplyDefaults(spec)
	spec.Restart = &pb.RestartPolicy{Attempts: attempts}
	jobspec.ApplyDefaults(spec)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	return resp.Id
}

func rankLogs(t *testing.T, c pb.ControlClient, id string, ranks int, gen uint64) string {
	var b strings.Builder
	for r := range ranks {
		for _, stderr := range []bool{false, true} {
			fmt.Fprintf(&b, "--- rank %d (stderr %v):\n", r, stderr)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: int32(r), Generation: gen, Stderr: stderr})
			for err == nil {
				var ch *pb.LogChunk
				if ch, err = st.Recv(); err == nil {
					b.Write(ch.Data)
				}
			}
			cancel()
		}
	}
	return b.String()
}

// taskStderr returns what every exec task of the cluster wrote to stderr
// (read from the agents' data dirs, so that a stopped node's tasks count).
func taskStderr(dc *DevCluster) string {
	var b strings.Builder
	for _, a := range dc.Agents {
		root := filepath.Join(mustAbs(a.cfg.DataDir), "alloc")
		_ = filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && !d.IsDir() && strings.Contains(d.Name(), "stderr") {
				if data, err := os.ReadFile(p); err == nil && len(data) > 0 {
					fmt.Fprintf(&b, "--- %s:\n%s\n", strings.TrimPrefix(p, root), data)
				}
			}
			return nil
		})
	}
	return b.String()
}

// The tolerance between Gloo's and gpumesh's all-reduce results: both sum
// the three ranks' float32 gradients, but in a different order (Gloo's ring
// versus ours), so an element may differ in its last bits each step; 20
// steps of SGD with momentum carry such differences forward without
// amplifying them much on this small, smooth problem.
const ddpRelTol, ddpAbsTol = 1e-4, 1e-6

func closeEnough(a, b float64) bool {
	return math.Abs(a-b) <= ddpAbsTol+ddpRelTol*math.Max(math.Abs(a), math.Abs(b))
}

// A standard DDP script as a 3-rank exec job on 3 agents with backend
// "gpumesh" trains exactly as the same script under torchrun with Gloo.
func TestTorchDDPOnMeshMatchesGloo(t *testing.T) {
	needTorch(t)
	script := repoPath(t, "examples/ddp/train.py")
	ref := t.TempDir()
	// Hidden layers of 512: DDP's gradient buckets (1 MiB) are large
	// enough to move into agent-mapped segments, so the zero-copy path is
	// what is compared.
	cmd := exec.Command("/usr/bin/torchrun", "--standalone", "--nproc_per_node", "3", "--redirects", "1", "--tee", "1",
		script, "--backend", "gloo", "--hidden", "512", "--out", ref)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("torchrun with gloo: %v\n%s", err, out)
	}
	want := readOutputs(t, ref, 3)

	dc := startTorchCluster(t, 3)
	c := client(t, follower(dc))
	got := t.TempDir()
	// Attempts: a generation may fail before training when another process
	// on this machine holds the job's MASTER_PORT; the last one writes the
	// outputs.
	id := torchJob(t, c, 3, "spread", 2, script, "--backend", "gpumesh", "--hidden", "512", "--out", got)
	final := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if final.Job.Status != "complete" {
		t.Fatalf("job %s (%s):\n%s", final.Job.Status, final.Job.StatusReason, taskStderr(dc))
	}
	have := readOutputs(t, got, 3)
	for r := range 3 {
		if len(have[r].Losses) != 20 || len(have[r].Params) != len(want[r].Params) {
			t.Fatalf("rank %d: %d losses, %d params; want 20 and %d", r, len(have[r].Losses), len(have[r].Params), len(want[r].Params))
		}
		for s := range have[r].Losses {
			if !closeEnough(have[r].Losses[s], want[r].Losses[s]) {
				t.Fatalf("rank %d step %d: loss %v with gpumesh, %v with gloo", r, s, have[r].Losses[s], want[r].Losses[s])
			}
		}
		maxDiff := 0.0
		for i := range have[r].Params {
			if !closeEnough(have[r].Params[i], want[r].Params[i]) {
				t.Fatalf("rank %d parameter %d: %v with gpumesh, %v with gloo", r, i, have[r].Params[i], want[r].Params[i])
			}
			maxDiff = math.Max(maxDiff, math.Abs(have[r].Params[i]-want[r].Params[i]))
		}
		t.Logf("rank %d: final loss %.6f (gloo %.6f), largest parameter difference %.3g", r, have[r].Losses[19], want[r].Losses[19], maxDiff)
	}
	// Every rank's all-reduces went through its agent.
	for _, a := range dc.Agents {
		var ops uint64
		for _, st := range a.local.srv.Snapshot() {
			if st.Job == id {
				ops += st.Ops["all_reduce"]
			}
		}
		if ops < 20 {
			t.Fatalf("agent %s served %d all-reduces of the job, want >= 20", a.Name(), ops)
		}
		if l := a.local.srv.Live(); l.Conns != 0 || l.Regions != 0 || l.Goroutines != 0 {
			t.Fatalf("agent %s holds %+v after the job", a.Name(), l)
		}
	}
}

// mappedSegments counts the gpumesh shared-memory segments this process
// (the test's agents) has mapped.
func mappedSegments(t *testing.T) int {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Count(string(b), "/memfd:gpumesh")
}

// A rank's node dies (agent stopped, its tasks SIGKILLed) in the middle of
// a DDP training on gpumesh: the other ranks raise an exception within the
// collective timeout, the job's restart policy runs generation 2 (3 ranks
// on the 2 survivors: two share their agent), and no agent holds a
// connection, goroutine or shared-memory segment afterwards.
func TestTorchNodeKilledMidTraining(t *testing.T) {
	needTorch(t)
	dc := startTorchCluster(t, 3)
	leader := dc.Leader()
	c := client(t, leader)
	script := repoPath(t, "examples/ddp/train.py")
	// Attempts: a generation may also fail before training when another
	// process on this machine holds the job's MASTER_PORT.
	// Hidden layers of 512: the gradient buckets live in agent-mapped
	// segments (zero copy), which must not leak either.
	id := torchJob(t, c, 3, "spread", 3, script, "--backend", "gpumesh", "--steps", "60", "--step-sleep", "0.05", "--hidden", "512")
	// Wait until every rank trains, then kill the node of a rank that is
	// not the leader.
	var victim *Agent
	var victimRank int32
	var gen uint64
	waitJob(t, c, id, 90*time.Second, func(r *pb.GetJobResponse) bool {
		if consensus.JobTerminal(r.Job.Status) {
			t.Fatalf("the job ended before the kill: %s (%s)\n%s", r.Job.Status, r.Job.StatusReason, taskStderr(dc))
		}
		for _, al := range r.Allocations {
			if al.Generation == r.Job.Generation && al.ClientStatus == "running" && al.NodeId != leader.NodeID() &&
				strings.Contains(readLogs(t, c, id, al.Rank, al.Generation), "step 3 ") {
				for _, a := range dc.Agents {
					if a.NodeID() == al.NodeId {
						victim, victimRank, gen = a, al.Rank, al.Generation
					}
				}
				return true
			}
		}
		return false
	})
	_ = victim.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := driver.KillAll(ctx, mustAbs(victim.cfg.DataDir)); err != nil {
		t.Fatal(err)
	}
	killed := time.Now()
	t.Logf("killed node %s (rank %d of generation %d)", victim.Name(), victimRank, gen)
	// The survivors' ranks of that generation fail with gpumesh's exception
	// (the first to fail fails the generation; the scheduler may stop the
	// other before it exits on its own).
	var failedAfter time.Duration
	waitJob(t, c, id, 60*time.Second, func(r *pb.GetJobResponse) bool {
		failed, ended := 0, 0
		for _, al := range r.Allocations {
			if al.Generation == gen && al.Rank != victimRank && consensus.AllocTerminal(al.ClientStatus) {
				ended++
				if al.ClientStatus == "failed" {
					failed++
				}
			}
		}
		if failed > 0 && failedAfter == 0 {
			failedAfter = time.Since(killed)
		}
		if r.Job.Status == "failed" {
			t.Fatalf("job failed: %s\n%s", r.Job.StatusReason, taskStderr(dc))
		}
		return ended == 2 && failed > 0
	})
	timeout := leader.cfg.CollectiveTimeout
	if failedAfter > timeout+10*time.Second {
		t.Fatalf("the surviving ranks failed %v after the kill; want within the collective timeout (%v) plus reporting", failedAfter, timeout)
	}
	logs := taskStderr(dc)
	if !strings.Contains(logs, "gpumesh:") || !strings.Contains(logs, "RuntimeError") {
		t.Fatalf("the surviving ranks did not raise gpumesh's RuntimeError:\n%s", logs)
	}
	t.Logf("surviving ranks failed %v after the kill", failedAfter)
	final := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	if final.Job.Status != "complete" || final.Job.Generation < gen+1 {
		t.Fatalf("job %s at generation %d (%s); want complete at the next one:\n%s", final.Job.Status, final.Job.Generation, final.Job.StatusReason, taskStderr(dc))
	}
	for _, a := range dc.Agents {
		if a == victim {
			continue
		}
		poll.Until(t, 10*time.Second, func() error {
			if l := a.local.srv.Live(); l != (localapi.Live{}) {
				return fmt.Errorf("agent %s still holds %+v", a.Name(), l)
			}
			return nil
		})
	}
	if n := mappedSegments(t); n != 0 {
		t.Fatalf("%d gpumesh shared-memory segments are still mapped by the agents", n)
	}
}

// Every collective and dtype of the backend against a local reference,
// with ranks across nodes (3 ranks on 3 agents) and on one node (2 ranks
// sharing an agent), and the errors it must raise (check_collectives.py;
// check_composed.py for all_to_all, gather, scatter and
// all_reduce_coalesced; check_order.py for sends and receives in flight
// beside collectives).
func TestTorchCollectivesAgainstReference(t *testing.T) {
	needTorch(t)
	dc := startTorchCluster(t, 3)
	c := client(t, follower(dc))
	// One after the other, so that the second job's two ranks fit on one
	// node (a node takes as many ranks as it has cores: 2 here).
	// check_zerocopy.py: the same for host tensors moved into agent-mapped
	// segments (python/gpumesh/_zerocopy.py).
	for _, tc := range []struct {
		script, ok string
		ranks      int
		placement  string
		nodes      int
	}{
		{"check_collectives.py", "ALL OK", 3, "spread", 3}, {"check_collectives.py", "ALL OK", 2, "pack", 1},
		{"check_zerocopy.py", "ZEROCOPY OK", 3, "spread", 3}, {"check_zerocopy.py", "ZEROCOPY OK", 2, "pack", 1},
		// all_to_all, gather, scatter, all_reduce_coalesced.
		{"check_composed.py", "COMPOSED OK", 3, "spread", 3}, {"check_composed.py", "COMPOSED OK", 2, "pack", 1},
		// Sends and receives in flight beside collectives: issue order.
		{"check_order.py", "ORDER OK", 3, "spread", 3},
	} {
		id := torchJob(t, c, tc.ranks, tc.placement, 2, repoPath(t, "python/tests/"+tc.script))
		final := waitJob(t, c, id, 180*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
		logs := rankLogs(t, c, id, tc.ranks, final.Job.Generation)
		if final.Job.Status != "complete" || strings.Count(logs, tc.ok) != tc.ranks {
			t.Fatalf("job of %d ranks: %s (%s):\n%s\n%s", tc.ranks, final.Job.Status, final.Job.StatusReason, logs, taskStderr(dc))
		}
		nodes := map[string]bool{}
		for _, al := range final.Allocations {
			if al.Generation == final.Job.Generation {
				nodes[al.NodeId] = true
			}
		}
		// Spread jobs must cross nodes; the leader may leave out a node
		// whose log replica is briefly behind (a loaded machine), so 3
		// spread ranks on 2 nodes still test the hops between agents.
		if len(nodes) != tc.nodes && (tc.placement != "spread" || len(nodes) < 2) {
			t.Fatalf("%d ranks ran on %d nodes, want %d", tc.ranks, len(nodes), tc.nodes)
		}
		t.Logf("%s, %d ranks on %d nodes: all checks passed", tc.script, tc.ranks, len(nodes))
	}
	for _, a := range dc.Agents {
		poll.Until(t, 10*time.Second, func() error {
			if l := a.local.srv.Live(); l != (localapi.Live{}) {
				return fmt.Errorf("agent %s still holds %+v", a.Name(), l)
			}
			return nil
		})
	}
	if n := mappedSegments(t); n != 0 {
		t.Fatalf("%d gpumesh shared-memory segments are still mapped by the agents", n)
	}
}

// Exec tasks run as an unprivileged task user while the agent runs as
// root: the task must still reach its agent's local API socket and run a
// collective through it (a socket only root can open would refuse it).
func TestTorchTaskUserReachesLocalAPI(t *testing.T) {
	needTorch(t)
	if os.Geteuid() != 0 {
		t.Skip("running tasks as another user needs root")
	}
	dc := startCluster(t, 2, func(i int, c *Config) {
		c.CollectiveTimeout = torchCollectiveTimeout
		c.TaskUser = "nobody"
	})
	// The tasks reach their allocation directories through the test's
	// temporary folders (0700 by default).
	for p := dc.DataDir(); p != filepath.Clean(os.TempDir()); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	c := client(t, follower(dc))
	script := `import os, torch, torch.distributed as dist, gpumesh.torch
dist.init_process_group("gpumesh")
x = torch.full((8,), float(dist.get_rank() + 1))
dist.all_reduce(x)
assert x.tolist() == [3.0] * 8, x
print("ALL OK uid", os.getuid())
dist.destroy_process_group()`
	id := torchJob(t, c, 2, "spread", 0, "-c", script)
	final := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return consensus.JobTerminal(r.Job.Status) })
	logs := rankLogs(t, c, id, 2, final.Job.Generation)
	if final.Job.Status != consensus.JobComplete || strings.Count(logs, "ALL OK uid 65534") != 2 {
		t.Fatalf("job as task user nobody: %s (%s):\n%s\n%s", final.Job.Status, final.Job.StatusReason, logs, taskStderr(dc))
	}
}
