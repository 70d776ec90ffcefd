//go:build cuda

package localapi

import (
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective/cudabuf"
)

// CUDA tensors of 2 ranks on one agent through CUDA IPC
// (python/tests/check_cuda.py: every collective and dtype, views inside an
// allocation, DDP against Gloo, hostile registrations): the handles were
// opened, the operations ran on device memory, and once the ranks are gone
// the agent holds no IPC mapping, connection or goroutine. Needs a GPU and
// PyTorch with CUDA ($GPUMESH_TORCH_PYTHON).
func TestPythonCUDA(t *testing.T) {
	if !cudabuf.Available() {
		t.Skip("no CUDA device")
	}
	script, _ := filepath.Abs("../../python/tests/check_cuda.py")
	pythonTimeout = 180 * time.Second // CUDA start-up, every dtype, two DDP trainings
	t.Cleanup(func() { pythonTimeout = 40 * time.Second })
	s := startServer(t, 2)
	outs := runPython(t, s, 2, script)
	for r, out := range outs {
		t.Logf("rank %d: %s", r, strings.TrimSpace(out))
		if !strings.Contains(out, "CUDA CHECK OK") {
			t.Fatalf("rank %d: %s", r, out)
		}
	}
	waitIdle(t, s)
	st := s.CUDA()
	t.Logf("agent: %+v", st)
	if st.Opened == 0 || st.Ops == 0 {
		t.Fatalf("the agent opened %d handles and ran %d device operations", st.Opened, st.Ops)
	}
}

// Sends and receives in flight beside collectives on CUDA tensors of 2
// ranks on one agent (python/tests/check_order.py cuda): the CUDA IPC path
// runs a group's operations in issue order as the host path does, and
// consecutive sends and receives at once. Needs a GPU.
func TestPythonCUDAOrder(t *testing.T) {
	if !cudabuf.Available() {
		t.Skip("no CUDA device")
	}
	script, _ := filepath.Abs("../../python/tests/check_order.py")
	pythonTimeout = 180 * time.Second // CUDA start-up
	t.Cleanup(func() { pythonTimeout = 40 * time.Second })
	s := startServer(t, 2)
	outs := runPython(t, s, 2, script, "20", "cuda")
	for r, out := range outs {
		t.Logf("rank %d: %s", r, strings.TrimSpace(out))
		if !strings.Contains(out, "ORDER OK") {
			t.Fatalf("rank %d: %s", r, out)
		}
	}
	waitIdle(t, s)
	if st := s.CUDA(); st.Ops == 0 {
		t.Fatalf("no operation ran on device memory: %+v", st)
	}
}
