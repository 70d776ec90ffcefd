//go:build linux

package driver

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// envTorchPython names a Python with PyTorch; the tests below run real
// torch.distributed code through the driver when it is set (the GPU test
// machines have one). Example:
//
//	GPUMESH_TEST_TORCH_PYTHON=python3 go test -run Torch ./node/driver/
const envTorchPython = "GPUMESH_TEST_TORCH_PYTHON"

func torchPython(t *testing.T) string {
	py := os.Getenv(envTorchPython)
	if py == "" {
		t.Skipf("set %s to a Python with PyTorch to run real torch.distributed code through the driver", envTorchPython)
	}
	return py
}

func freePort(t *testing.T) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func writeScript(t *testing.T, body string) string {
	p := filepath.Join(t.TempDir(), "script.py")
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

// A script written for torchrun (init from env://, LOCAL_RANK for the
// device) runs unchanged: two ranks, gloo all-reduce, one rank given the
// GPU (if any) and one hidden from all GPUs.
func TestTorchScriptRunsUnchanged(t *testing.T) {
	py := torchPython(t)
	d := newTestDriver(t, "")
	script := writeScript(t, `
import os, torch, torch.distributed as dist
dist.init_process_group("gloo")
r, n = dist.get_rank(), dist.get_world_size()
x = torch.tensor([r + 1.0])
dist.all_reduce(x)
print(f"rank {r} of {n} sum {x.item()} local {os.environ['LOCAL_RANK']}/{os.environ['LOCAL_WORLD_SIZE']} cuda_devices {torch.cuda.device_count()}")
dist.destroy_process_group()
`)
	port := freePort(t)
	var hs []*Handle
	for rank := range 2 {
		id := TaskID{JobID: "torch-env", Generation: 1, Rank: rank}
		var gpus []int
		if rank == 0 {
			gpus = []int{0}
		}
		env, err := BuildEnv(RankEnv{
			JobID: id.JobID, Generation: 1, Rank: rank, WorldSize: 2, LocalRank: rank, LocalWorldSize: 2,
			GroupRank: 0, GroupWorldSize: 1, MasterAddr: "127.0.0.1", MasterPort: port, GPUs: gpus,
			AllocDir: AllocDir(d.cfg.DataDir, id),
		}, os.Environ(), nil)
		if err != nil {
			t.Fatal(err)
		}
		h, err := d.Start(context.Background(), TaskSpec{ID: id, Command: []string{py, script}, Env: env})
		if err != nil {
			t.Fatal(err)
		}
		cleanupTask(t, h)
		hs = append(hs, h)
	}
	for rank, h := range hs {
		res := wait(t, h)
		out := readLog(t, h, Stdout)
		t.Logf("rank %d: %s stdout %q stderr %q", rank, res, out, readLog(t, h, Stderr))
		if !res.Success() {
			t.Fatalf("rank %d: %+v", rank, res)
		}
		want := []string{"rank 0 of 2 sum 3.0 local 0/2", "rank 1 of 2 sum 3.0 local 1/2 cuda_devices 0"}[rank]
		if !strings.Contains(out, want) {
			t.Fatalf("rank %d stdout %q, want %q", rank, out, want)
		}
	}
}

// The checkpoint-on-preemption recipe of the package documentation, in
// real PyTorch: SIGTERM, read the deadline, save, exit 0 before SIGKILL.
func TestTorchCheckpointOnPreemption(t *testing.T) {
	py := torchPython(t)
	d := newTestDriver(t, "")
	script := writeScript(t, `
import os, signal, time, torch
stop = False
def on_sigterm(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_sigterm)
w = torch.zeros(1000)
step = 0
print("training", flush=True)
while True:
    w += 1.0
    step += 1
    if stop:
        with open(os.environ["GPUMESH_PREEMPT_DEADLINE_FILE"]) as f:
            left = float(f.read()) - time.time()
        torch.save({"step": step, "w": w}, os.path.join(os.environ["GPUMESH_ALLOC_DIR"], "ckpt.pt"))
        print(f"checkpointed step {step} with {left:.0f}s left", flush=True)
        break
    time.sleep(0.01)
`)
	id := TaskID{JobID: "torch-ckpt", Generation: 1, Rank: 0}
	env, err := BuildEnv(RankEnv{
		JobID: id.JobID, Generation: 1, WorldSize: 1, LocalWorldSize: 1, GroupWorldSize: 1,
		MasterAddr: "127.0.0.1", MasterPort: freePort(t), AllocDir: AllocDir(d.cfg.DataDir, id),
	}, os.Environ(), nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := d.Start(context.Background(), TaskSpec{ID: id, Command: []string{py, script}, Env: env})
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "training")
	res, err := h.Stop(context.Background(), StopOptions{Deadline: time.Now().Add(60 * time.Second), Reason: "spot interruption"})
	if err != nil {
		t.Fatal(err)
	}
	out := readLog(t, h, Stdout)
	t.Logf("%s stdout %q stderr %q", res, out, readLog(t, h, Stderr))
	if !res.Success() || !res.Stopped || res.Killed {
		t.Fatalf("result %+v, want a clean exit after SIGTERM", res)
	}
	if !strings.Contains(out, "checkpointed step") || !strings.Contains(out, "s left") {
		t.Fatalf("stdout %q", out)
	}
	if !exists(filepath.Join(h.AllocDir(), "ckpt.pt")) {
		t.Fatal("no checkpoint written")
	}
}

// torch's @record writes TORCHELASTIC_ERROR_FILE; the exit result carries
// its message.
func TestTorchRecordErrorFile(t *testing.T) {
	py := torchPython(t)
	d := newTestDriver(t, "")
	script := writeScript(t, `
from torch.distributed.elastic.multiprocessing.errors import record
@record
def main():
    raise RuntimeError("boom from the training loop")
main()
`)
	id := TaskID{JobID: "torch-err", Generation: 1, Rank: 0}
	env, err := BuildEnv(RankEnv{
		JobID: id.JobID, Generation: 1, WorldSize: 1, LocalWorldSize: 1, GroupWorldSize: 1,
		MasterAddr: "127.0.0.1", MasterPort: 29500, AllocDir: AllocDir(d.cfg.DataDir, id),
	}, os.Environ(), nil)
	if err != nil {
		t.Fatal(err)
	}
	h, err := d.Start(context.Background(), TaskSpec{ID: id, Command: []string{py, script}, Env: env})
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	res := wait(t, h)
	t.Logf("%s", res)
	if res.ExitCode != 1 || !strings.Contains(res.Error, "boom from the training loop") {
		t.Fatalf("result %+v, want exit 1 with the exception's message", res)
	}
}
