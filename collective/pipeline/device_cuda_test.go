//go:build cuda

package pipeline

import (
	"context"
	"errors"
	"fmt"
	"math/rand"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/cuda"
)

func openCUDA(t *testing.T) []*CUDADevice {
	t.Helper()
	rt, err := cuda.Open(cuda.DefaultConfig())
	if err != nil {
		t.Skipf("no CUDA device: %v", err)
	}
	t.Cleanup(func() { rt.Close() }) // runs last: cleanups run in reverse order
	var out []*CUDADevice
	for _, d := range rt.Devices() {
		c, err := NewCUDADevice(d)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		out = append(out, c)
	}
	return out
}

func randT(r *rand.Rand, rows, cols int) []float32 {
	v := make([]float32, rows*cols)
	for i := range v {
		v[i] = float32(r.Float64()*2 - 1)
	}
	return v
}

// TestCUDAKernelsMatchCPU runs every Device operation on the GPU and the
// CPU with the same inputs, awkward shapes included.
func TestCUDAKernelsMatchCPU(t *testing.T) {
	gpu := openCUDA(t)[0]
	cpu := CPU{}
	r := rand.New(rand.NewSource(1))
	put := func(d Device, rows, cols int, v []float32) Tensor {
		x, err := d.New(rows, cols)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Upload(x, v); err != nil {
			t.Fatal(err)
		}
		return x
	}
	get := func(d Device, x Tensor) []float32 {
		out := make([]float32, x.Rows()*x.Cols())
		if err := d.Download(out, x); err != nil {
			t.Fatal(err)
		}
		return out
	}
	same := func(what string, a, b []float32, tol float64) {
		t.Helper()
		for i := range a {
			if !relClose(float64(a[i]), float64(b[i]), tol) {
				t.Fatalf("%s: element %d: gpu %v, cpu %v", what, i, a[i], b[i])
			}
		}
	}
	for _, sh := range [][3]int{{1, 1, 1}, {17, 33, 9}, {64, 128, 48}, {5, 300, 2}} {
		m, k, n := sh[0], sh[1], sh[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				for _, beta := range []float32{0, 1} {
					ar, ac := m, k
					if ta {
						ar, ac = k, m
					}
					br, bc := k, n
					if tb {
						br, bc = n, k
					}
					av, bv, cv := randT(r, ar, ac), randT(r, br, bc), randT(r, m, n)
					res := [2][]float32{}
					for i, d := range []Device{gpu, cpu} {
						c := put(d, m, n, cv)
						if err := d.Gemm(ta, tb, 0.5, put(d, ar, ac, av), put(d, br, bc, bv), beta, c); err != nil {
							t.Fatal(err)
						}
						res[i] = get(d, c)
					}
					same("gemm", res[0], res[1], 1e-4)
				}
			}
		}
		// Bias, column sums, activations, gradients, axpy on m×n.
		xv, vv, yv := randT(r, m, n), randT(r, 1, n), randT(r, m, n)
		res := [2][][]float32{}
		for i, d := range []Device{gpu, cpu} {
			x := put(d, m, n, xv)
			if err := d.AddRowVector(x, put(d, 1, n, vv)); err != nil {
				t.Fatal(err)
			}
			s := put(d, 1, n, vv)
			if err := d.SumRows(s, x, 1); err != nil {
				t.Fatal(err)
			}
			var outs [][]float32
			outs = append(outs, get(d, x), get(d, s))
			for _, act := range []string{ActTanh, ActReLU} {
				y := put(d, m, n, xv)
				if err := d.Activate(act, y); err != nil {
					t.Fatal(err)
				}
				dy := put(d, m, n, yv)
				if err := d.ActivationGrad(act, y, dy); err != nil {
					t.Fatal(err)
				}
				outs = append(outs, get(d, y), get(d, dy))
			}
			z := put(d, m, n, yv)
			if err := d.Axpy(-0.25, x, z); err != nil {
				t.Fatal(err)
			}
			outs = append(outs, get(d, z))
			res[i] = outs
		}
		for j := range res[0] {
			same("elementwise", res[0][j], res[1][j], 1e-5)
		}
	}
}

func cudaSpec() JobSpec {
	return JobSpec{Layers: []int{64, 256, 256, 128, 64, 16}, BatchSize: 128, MicroBatches: 8, Steps: 10, Seed: 5, LearningRate: 0.05, Device: DeviceCUDA}
}

// TestCUDAPipelineMatchesReference trains the same model three ways: the
// single-process CPU reference, the single-GPU reference, and a 2-stage
// pipeline with one stage per GPU (both stages on GPU 0 when there is one),
// linked by TCP on loopback. Losses and weights must agree.
func TestCUDAPipelineMatchesReference(t *testing.T) {
	devs := openCUDA(t)
	spec := cudaSpec()
	cpuRef, err := RunReference(spec, CPU{})
	if err != nil {
		t.Fatal(err)
	}
	gpuRef, err := RunReference(spec, devs[0])
	if err != nil {
		t.Fatal(err)
	}
	for i := range cpuRef.Losses {
		if !relClose(gpuRef.Losses[i], cpuRef.Losses[i], 1e-4) {
			t.Fatalf("step %d: GPU loss %v, CPU loss %v", i, gpuRef.Losses[i], cpuRef.Losses[i])
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	hashes := map[string]string{}
	for _, run := range []struct {
		sched    string
		sync     bool
		pageable bool
	}{{Schedule1F1B, true, false}, {Schedule1F1B, false, false}, {Schedule1F1B, false, true}, {ScheduleGPipe, false, false}} {
		sched := run.sched
		s := spec
		s.Schedule = sched
		links := tcpPipeline(t, ctx, "cuda-job", 1, 2)
		// a CUDADevice per stage (as the bench and the node give them):
		// a Device is used from one goroutine at a time
		stageDevs := make([]*CUDADevice, 2)
		for st := range stageDevs {
			d, err := NewCUDADevice(devs[st%len(devs)].dev)
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			stageDevs[st] = d
		}
		reps := make([]*Report, 2)
		errs := make([]error, 2)
		done := make(chan int, 2)
		for st := 0; st < 2; st++ {
			go func(st int) {
				reps[st], errs[st] = RunJob(ctx, RunConfig{JobID: "cuda-job", Generation: 1, Stage: st, Stages: 2, Links: links[st], Device: stageDevs[st], KeepParams: true, SyncMessages: run.sync, PinnedRecv: !run.pageable}, s)
				done <- st
			}(st)
		}
		<-done
		<-done
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("%s (sync messages %v): %v", sched, run.sync, err)
		}
		// staged messages (the device computes the loss gradient) change
		// no bit of the result
		key := reps[0].ParamHash + reps[1].ParamHash + fmt.Sprint(reps[1].Losses)
		if h, ok := hashes[sched]; ok && h != key {
			t.Fatalf("%s (sync %v, pageable receives %v): staged and synchronous messages, pinned and pageable receives, give different results", sched, run.sync, run.pageable)
		}
		// pinned receives unless synchronous or asked for pageable
		if want := !run.sync && !run.pageable; reps[0].PinnedRecv != want || reps[1].PinnedRecv != want {
			t.Fatalf("%s (sync %v, pageable %v): pinned receives %v, %v; want %v", sched, run.sync, run.pageable, reps[0].PinnedRecv, reps[1].PinnedRecv, want)
		}
		hashes[sched] = key
		for _, r := range reps {
			if r.BusyOnDevice == run.sync {
				t.Fatalf("%s sync=%v: stage %d busy measured on device = %v", sched, run.sync, r.Stage, r.BusyOnDevice)
			}
		}
		t.Logf("%s (sync messages %v, pageable receives %v): stages on %s and %s, %.0f samples/s, final loss %.6f (GPU reference %.6f, CPU reference %.6f)",
			sched, run.sync, run.pageable, reps[0].Device, reps[1].Device, reps[1].SamplesPerSec, reps[1].FinalLoss, gpuRef.Losses[len(gpuRef.Losses)-1], cpuRef.Losses[len(cpuRef.Losses)-1])
		for i, l := range reps[1].Losses {
			if !relClose(l, gpuRef.Losses[i], 1e-4) || !relClose(l, cpuRef.Losses[i], 1e-4) {
				t.Fatalf("%s step %d: pipeline loss %v, GPU reference %v, CPU reference %v", sched, i, l, gpuRef.Losses[i], cpuRef.Losses[i])
			}
		}
		var params []LayerParams
		for _, r := range reps {
			params = append(params, r.Params...)
		}
		for l := range params {
			for i, w := range params[l].W {
				if !relClose(float64(w), float64(cpuRef.Params[l].W[i]), 1e-3) {
					t.Fatalf("%s: layer %d weight %d = %v, CPU reference %v", sched, l, i, w, cpuRef.Params[l].W[i])
				}
			}
		}
	}
}

func TestCUDABench(t *testing.T) {
	openCUDA(t) // skips without a GPU
	cfg := DefaultBenchConfig()
	cfg.Device, cfg.Compute = DeviceCUDA, ComputeMLP
	cfg.Stages, cfg.MicroBatches, cfg.Steps = 2, 8, 3
	cfg.BandwidthBytes = 0
	cfg.PinnedRecv = true
	res, err := Bench(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	if res.SamplesPerSec <= 0 || len(res.Devices) == 0 || res.Receives != "pinned" {
		t.Fatalf("implausible result %+v", res)
	}
	t.Logf("%+v", res)
}

// Uploads from the receive memory the device lends are queued, not waited
// for; the buffer comes back from the pool only once its upload is done,
// and every upload lands intact although the buffer is refilled at once.
func TestCUDAPinnedRecvUpload(t *testing.T) {
	c := openCUDA(t)[0]
	mem := c.recvMemory()
	const rows, cols, rounds = 64, 1024, 16
	dsts := make([]Tensor, rounds)
	for i := range dsts {
		x, err := c.New(rows, cols)
		if err != nil {
			t.Fatal(err)
		}
		dsts[i] = x
		defer c.Free(x)
	}
	var first []float32
	for i := 0; i < rounds; i++ {
		b := mem.get(rows * cols)
		if !c.recv.owns(b) {
			t.Fatalf("round %d: receive memory is not the device's pinned memory", i)
		}
		if i == 0 {
			first = b
		} else if &b[0] != &first[0] {
			t.Fatalf("round %d: a new buffer, not the one given back", i)
		}
		for j := range b {
			b[j] = float32(i*rows*cols + j)
		}
		if err := c.Upload(dsts[i], b); err != nil {
			t.Fatal(err)
		}
		mem.put(b) // the next get waits for this upload before refilling
	}
	out := make([]float32, rows*cols)
	for i, x := range dsts {
		if err := c.Download(out, x); err != nil {
			t.Fatal(err)
		}
		for j, v := range out {
			if v != float32(i*rows*cols+j) {
				t.Fatalf("upload %d value %d = %v, want %v", i, j, v, float32(i*rows*cols+j))
			}
		}
	}
}
