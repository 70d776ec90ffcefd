//go:build linux

package localapi

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"testing"
)

// REGISTER_CUDA round-trips through its codec, and malformed ones are
// refused with a protocol error.
func TestRegisterCUDACodec(t *testing.T) {
	r := &RegisterCUDA{What: CUDAMemory, ID: 7, Size: 1 << 20}
	for i := range r.Device {
		r.Device[i] = byte(i + 1)
	}
	for i := range r.Handle {
		r.Handle[i] = byte(200 - i)
	}
	b := EncodeRegisterCUDA(r)
	req, err := DecodeRequest(b)
	if err != nil || req.RegisterCUDA == nil || *req.RegisterCUDA != *r {
		t.Fatalf("decoded %+v, %v; want %+v", req.RegisterCUDA, err, r)
	}
	for _, bad := range [][]byte{b[:len(b)-1], append(append([]byte(nil), b...), 0)} {
		if _, err := DecodeRequest(bad); !errors.Is(err, ErrProtocol) {
			t.Fatalf("%d bytes: err %v, want a protocol error", len(bad), err)
		}
	}
	kind := append([]byte(nil), b...)
	kind[1] = 3
	if _, err := DecodeRequest(kind); !errors.Is(err, ErrProtocol) {
		t.Fatalf("kind 3: err %v, want a protocol error", err)
	}
	if got := FormatGPUUUID(r.Device); got != "GPU-01020304-0506-0708-090a-0b0c0d0e0f10" {
		t.Fatalf("uuid %q", got)
	}
}

// An agent without CUDA answers REGISTER_CUDA with StatusUnsupported and
// the reason, keeps the connection usable, and an operation naming the
// refused region is answered as a bad request.
func TestRegisterCUDAWithoutCUDA(t *testing.T) {
	if newCUDAOpener != nil {
		t.Skip("built with the cuda tag")
	}
	s := startServer(t, 1)
	cl := dial(t, s)
	if r := cl.hello(0, 1, "ok-0"); r.Type != MsgWelcome {
		t.Fatalf("hello: %+v", r)
	}
	for _, what := range []uint8{CUDAMemory, CUDAEvent} {
		cl.send(EncodeRegisterCUDA(&RegisterCUDA{What: what, ID: 5, Size: 4096}))
		r := cl.recv()
		if r.Type != MsgRegistered || r.Status != StatusUnsupported || r.ID != 5 || !bytes.Contains([]byte(r.Message), []byte("no CUDA")) {
			t.Fatalf("what %d: got %+v, want REGISTERED with status unsupported", what, r)
		}
	}
	cl.send(EncodeOp(&Op{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 9, A: BufRef{Region: 5, Count: 4}}))
	if r := cl.recv(); r.Type != MsgDone || r.Status != StatusBadRequest || r.ID != 9 {
		t.Fatalf("op on a refused region: %+v", r)
	}
	cl.send(EncodeOp(&Op{Kind: OpBarrier, ID: 10}))
	if r := cl.recv(); r.Type != MsgDone || r.Status != StatusOK {
		t.Fatalf("barrier after: %+v", r)
	}
	cl.send(EncodeBye())
	cl.close()
	waitIdle(t, s)
}

// The Python package against an agent without CUDA: its CUDA IPC path
// turns itself off, says so once on stderr, and the group keeps working
// (python/tests/check_cuda_fallback.py).
func TestPythonCUDAFallback(t *testing.T) {
	if newCUDAOpener != nil {
		t.Skip("built with the cuda tag")
	}
	script, _ := filepath.Abs("../../python/tests/check_cuda_fallback.py")
	s := startServer(t, 1)
	out := runPython(t, s, 1, script)[0]
	if !strings.Contains(out, "CUDA FALLBACK OK") {
		t.Fatalf("output: %s", out)
	}
	if n := strings.Count(out, "CUDA tensors are staged through host memory: the agent refused a CUDA IPC handle: this agent has no CUDA"); n != 1 {
		t.Fatalf("the fallback was said %d times, want once:\n%s", n, out)
	}
	waitIdle(t, s)
}

// The Python side's bookkeeping of CUDA IPC registrations, with stand-ins
// for the driver and the connection (python/tests/check_cudaipc_cache.py):
// registered once and found again, registered again after a block is
// reallocated at the same address, least recently used dropped, a handle
// the agent cannot open staged alone.
func TestPythonCUDAIPCCache(t *testing.T) {
	runPythonCheck(t, "check_cudaipc_cache.py", "CUDAIPC CACHE OK")
}
