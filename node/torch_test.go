package node

import (
	"context"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
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

func repoPath(t *testing.T, rel string) string {
	t.Helper()
	p, err := filepath.Abs(filepath.Join("..", rel))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// rankOutput is what examples/ddp/train.py writes with --out.
type rankOutput struct {
	Rank   int       `json:"rank"`
	World  int       `json:"world"`
	Losses []float64 `json:"losses"`
	Params []float64 `json:"params"`
}

func readOutputs(t *testing.T, dir string, n int) []rankOutput {
	t.Helper()
	out := make([]rankOutput, n)
	for r := range n {
		b, err := os.ReadFile(filepath.Join(dir, fmt.Sprintf("rank%d.json", r)))
		if err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(b, &out[r]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

// torchJob submits a Python script as an exec job with the gpumesh package
// on PYTHONPATH.
func torchJob(t *testing.T, c pb.ControlClient, ranks int, placement string, attempts int32, args ...string) string {
	t.Helper()
	spec := &pb.JobSpec{Name: "torch", Type: "exec", Ranks: int32(ranks), Placement: placement,
		Exec: &pb.ExecSpec{Command: append([]string{torchPython}, args...), Env: map[string]string{"PYTHONPATH": repoPath(t, "python")}}}
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
		fmt.Fprintf(&b, "--- rank %d stdout:\n%s", r, readLogs(t, c, id, int32(r), gen))
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: int32(r), Generation: gen, Stderr: true})
		if err == nil {
			for {
				ch, err := st.Recv()
				if err != nil {
					break
				}
				b.Write(ch.Data)
			}
		}
		cancel()
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
	cmd := exec.Command("/usr/bin/torchrun", "--standalone", "--nproc_per_node", "3", "--redirects", "1", "--tee", "1",
		script, "--backend", "gloo", "--out", ref)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("torchrun with gloo: %v\n%s", err, out)
	}
	want := readOutputs(t, ref, 3)

	dc := startCluster(t, 3, nil)
	c := client(t, follower(dc))
	got := t.TempDir()
	id := torchJob(t, c, 3, "spread", 0, script, "--backend", "gpumesh", "--out", got)
	final := waitJob(t, c, id, 120*time.Second, func(r *pb.GetJobResponse) bool { return terminal(r.Job.Status) })
	if final.Job.Status != "complete" {
		t.Fatalf("job %s (%s):\n%s", final.Job.Status, final.Job.StatusReason, rankLogs(t, c, id, 3, 1))
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
