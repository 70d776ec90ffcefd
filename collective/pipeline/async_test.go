package pipeline

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync"
	"testing"
	"time"
)

// asyncCPU is the CPU device behind the AsyncDevice interface, for testing
// the staged-message path without a GPU: a download copies at once (the
// device's queue order) but is "done" only when a goroutine says so a
// little later; Release poisons the staging memory with NaNs, so a message
// sent or a loss read after its release shows in the results.
type asyncCPU struct {
	CPU
	mu          sync.Mutex
	outstanding int // staged buffers not released
	maxOut      int
	busy        time.Duration
	spanStart   time.Time
	marked      int
	traceOn     bool
	traced      [][2]time.Time

	// receive memory (pinnedRecv): an upload from it copies at once but
	// reads the source again when it "completes", a little later, and
	// counts the source as overwritten if it changed meanwhile
	recvOnce      sync.Once
	recv          *recvPool
	recvMade      int
	pinnedUploads int
	overwritten   int
	uploads       sync.WaitGroup
}

var (
	_ AsyncDevice = (*asyncCPU)(nil)
	_ pinnedRecv  = (*asyncCPU)(nil)
)

func (d *asyncCPU) recvMemory() recvBuffers {
	d.recvOnce.Do(func() {
		d.recv = newRecvPool(func(n int) ([]float32, error) {
			d.mu.Lock()
			d.recvMade++
			d.mu.Unlock()
			return make([]float32, n), nil
		})
	})
	return d.recv
}

func (d *asyncCPU) Upload(dst Tensor, src []float32) error {
	if d.recv == nil || !d.recv.owns(src) {
		return d.CPU.Upload(dst, src)
	}
	if err := d.CPU.Upload(dst, src); err != nil {
		return err
	}
	d.mu.Lock()
	d.pinnedUploads++
	d.mu.Unlock()
	snap := append([]float32(nil), src...)
	done := make(chan struct{})
	d.uploads.Add(1)
	go func() { // the device reads src until the copy completes
		defer d.uploads.Done()
		defer close(done)
		time.Sleep(time.Millisecond)
		for i, v := range src {
			if math.Float32bits(v) != math.Float32bits(snap[i]) {
				d.mu.Lock()
				d.overwritten++
				d.mu.Unlock()
				return
			}
		}
	}()
	d.recv.markUploaded(src, func() error { <-done; return nil })
	return nil
}

func (d *asyncCPU) DownloadAsync(src Tensor) (*Staged, error) {
	h, err := host(src)
	if err != nil {
		return nil, err
	}
	buf := append([]float32(nil), h[0].Data...)
	done := make(chan struct{})
	go func() { // completes later, as a device copy would
		time.Sleep(50 * time.Microsecond)
		close(done)
	}()
	d.mu.Lock()
	d.outstanding++
	d.maxOut = max(d.maxOut, d.outstanding)
	d.mu.Unlock()
	var once sync.Once
	return &Staged{
		Data: buf,
		wait: func() error { <-done; return nil },
		release: func() {
			once.Do(func() {
				<-done
				for i := range buf {
					buf[i] = float32(math.NaN())
				}
				d.mu.Lock()
				d.outstanding--
				d.mu.Unlock()
			})
		},
	}, nil
}

func (d *asyncCPU) MSEGrad(y, t, g Tensor, n float32) error {
	h, err := host(y, t, g)
	if err != nil {
		return err
	}
	for i := range h[0].Data {
		dv := h[0].Data[i] - h[1].Data[i]
		h[2].Data[i] = 2 * dv / n
	}
	return nil
}

func (d *asyncCPU) BeginBusy() error {
	d.spanStart = time.Now()
	return nil
}

func (d *asyncCPU) EndBusy() error {
	d.busy += time.Since(d.spanStart)
	d.marked++
	if d.traceOn {
		d.traced = append(d.traced, [2]time.Time{d.spanStart, time.Now()})
	}
	return nil
}

func (d *asyncCPU) traceSpans(on bool) { d.traceOn = on }

func (d *asyncCPU) takeSpans() [][2]time.Time {
	t := d.traced
	d.traced = nil
	return t
}

func (d *asyncCPU) BusySeconds() (float64, error) {
	s := d.busy.Seconds()
	d.busy = 0
	return s, nil
}

func (d *asyncCPU) staged() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.outstanding
}

// retainingLink hands the sent message itself to the peer, Data not
// copied (as CollectiveLink reads Data after Send returns): the endpoint must
// copy staged data before giving it back to the device.
type retainingLink struct {
	in, out chan *Message
	closed  chan struct{}
	once    *sync.Once
}

func newRetainingPair() (retainingLink, retainingLink) {
	ab, ba, closed := make(chan *Message, 4), make(chan *Message, 4), make(chan struct{})
	once := &sync.Once{}
	return retainingLink{ba, ab, closed, once}, retainingLink{ab, ba, closed, once}
}

func (r retainingLink) Send(m *Message) error {
	c := *m // the same Data
	select {
	case r.out <- &c:
		return nil
	case <-r.closed:
		return ErrLinkClosed
	}
}

func (r retainingLink) Recv() (*Message, error) {
	select {
	case m := <-r.in:
		return m, nil
	case <-r.closed:
		select {
		case m := <-r.in:
			return m, nil
		default:
			return nil, ErrLinkClosed
		}
	}
}

func (r retainingLink) Close() error {
	r.once.Do(func() { close(r.closed) })
	return nil
}

// Staged messages (an AsyncDevice) give the same losses and parameters, bit
// for bit, as the host path, on every schedule and over links that copy on
// Send and links that do not; every staging buffer goes back to the device,
// and busy time comes from the device.
func TestAsyncDeviceMatchesHostPath(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := baseSpec()
	ref, err := RunReference(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	layers := []int{6}
	for i := 0; i < 2*2+1; i++ {
		layers = append(layers, 5+i%4)
	}
	ispec := JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: 4, Steps: 4, Seed: 3, LearningRate: 0.1, Schedule: ScheduleInterleaved, Chunks: 2}
	iref, err := RunReference(JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: 4, Steps: 4, Seed: 3, LearningRate: 0.1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		spec   JobSpec
		ref    *Reference
		p      int
		retain bool
	}{
		{"1f1b/p=2", spec, ref, 2, false},
		{"1f1b/p=3/retaining-link", spec, ref, 3, true},
		{"gpipe/p=4", func() JobSpec { s := spec; s.Schedule = ScheduleGPipe; return s }(), ref, 4, false},
		{"interleaved/p=2/v=2", ispec, iref, 2, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var links []StageLinks
			if tc.spec.Schedule == ScheduleInterleaved {
				links = NewMemPipelineRing(tc.p, 1)
			} else {
				links = NewMemPipeline(tc.p, 1)
			}
			if tc.retain {
				for s := 0; s+1 < tc.p; s++ {
					links[s].Next, links[s+1].Prev = newRetainingPair()
				}
			}
			devs := make([]*asyncCPU, tc.p)
			reps, errs := runStages(ctx, tc.spec, tc.p, func(s int) RunConfig {
				devs[s] = &asyncCPU{}
				return RunConfig{
					JobID: "job-1", Generation: 3, Stage: s, Stages: tc.p, Links: links[s], Device: devs[s],
					KeepParams: true, RecvTimeout: 20 * time.Second,
				}
			})
			for s, err := range errs {
				if err != nil {
					t.Fatalf("stage %d: %v", s, err)
				}
			}
			last := reps[tc.p-1]
			if len(last.Losses) != len(tc.ref.Losses) {
				t.Fatalf("%d losses, want %d", len(last.Losses), len(tc.ref.Losses))
			}
			for i := range tc.ref.Losses {
				if !relClose(last.Losses[i], tc.ref.Losses[i], 1e-5) {
					t.Fatalf("step %d loss %v, single process %v", i, last.Losses[i], tc.ref.Losses[i])
				}
			}
			byLayer := map[int]LayerParams{}
			for _, r := range reps {
				for _, lp := range r.Params {
					byLayer[lp.Layer] = lp
				}
				if !r.BusyOnDevice || r.Bubble < 0 || r.Bubble > 1 {
					t.Fatalf("stage %d: busy on device %v, bubble %v", r.Stage, r.BusyOnDevice, r.Bubble)
				}
			}
			for l, want := range tc.ref.Params {
				for i, w := range byLayer[l].W {
					if !relClose(float64(w), float64(want.W[i]), 1e-4) {
						t.Fatalf("layer %d weight %d = %v, single process %v", l, i, w, want.W[i])
					}
				}
			}
			for s, d := range devs {
				if n := d.staged(); n != 0 {
					t.Errorf("stage %d: %d staging buffers never given back", s, n)
				}
				if s < tc.p-1 && d.maxOut == 0 {
					t.Errorf("stage %d sent nothing staged", s)
				}
				if d.marked == 0 {
					t.Errorf("stage %d: no busy spans marked", s)
				}
			}
		})
	}
}

// The same job with and without staged messages gives the same bits: the
// device's loss gradient and the deferred loss are the host's.
func TestAsyncDeviceBitwiseEqualToSyncMessages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := baseSpec()
	hashes := map[bool]string{}
	losses := map[bool]string{}
	for _, syncMsgs := range []bool{true, false} {
		links := NewMemPipeline(3, 0)
		reps, errs := runStages(ctx, spec, 3, func(s int) RunConfig {
			return RunConfig{JobID: "j", Stage: s, Stages: 3, Links: links[s], Device: &asyncCPU{}, SyncMessages: syncMsgs}
		})
		for s, err := range errs {
			if err != nil {
				t.Fatalf("sync=%v stage %d: %v", syncMsgs, s, err)
			}
		}
		for _, r := range reps {
			hashes[syncMsgs] += r.ParamHash
			if r.BusyOnDevice == syncMsgs {
				t.Fatalf("sync=%v: stage %d busy on device = %v", syncMsgs, r.Stage, r.BusyOnDevice)
			}
		}
		losses[syncMsgs] = fmt.Sprint(reps[2].Losses)
	}
	if hashes[true] != hashes[false] || losses[true] != losses[false] {
		t.Fatalf("staged messages changed the result: losses %s vs %s, params %s vs %s", losses[false], losses[true], hashes[false], hashes[true])
	}
}

// Trace records every action of every step, in order, each span inside the
// stage's run.
func TestStageTrace(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := baseSpec().WithDefaults(2)
	links := NewMemPipeline(2, 1)
	reps, errs := runStages(ctx, spec, 2, func(s int) RunConfig {
		return RunConfig{JobID: "j", Stage: s, Stages: 2, Links: links[s], Trace: s == 0}
	})
	for s, err := range errs {
		if err != nil {
			t.Fatalf("stage %d: %v", s, err)
		}
	}
	acts, err := StageActions(Schedule1F1B, 2, spec.MicroBatches, 0)
	if err != nil {
		t.Fatal(err)
	}
	tr := reps[0].Trace
	if len(tr) != spec.Steps*len(acts) || len(reps[1].Trace) != 0 {
		t.Fatalf("%d spans on stage 0 (want %d), %d on stage 1 (not traced)", len(tr), spec.Steps*len(acts), len(reps[1].Trace))
	}
	last := 0.0
	for i, a := range tr {
		want := acts[i%len(acts)]
		if a.Step != i/len(acts) || a.Op != want.Op.String() || a.MicroBatch != want.MicroBatch || a.StartUS < last || a.EndUS < a.StartUS || a.EndUS > reps[0].WallSeconds*1e6 {
			t.Fatalf("span %d = %+v, want step %d %v mb %d after %.1f us, inside the run", i, a, i/len(acts), want.Op, want.MicroBatch, last)
		}
		last = a.EndUS
	}
}

// On an AsyncDevice layer costs are the device's busy time, measured on
// the staged path, which gives every staging buffer back.
func TestMeasureLayerCostsAsyncDevice(t *testing.T) {
	dev := &asyncCPU{}
	spec := JobSpec{Layers: []int{16, 32, 32, 32, 32, 8}, BatchSize: 16, MicroBatches: 4, Seed: 1}
	costs, err := MeasureLayerCosts(context.Background(), dev, spec, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(costs) != 5 {
		t.Fatalf("%d costs, want 5", len(costs))
	}
	for l, c := range costs {
		if !(c > 0) {
			t.Fatalf("layer %d cost %v", l, c)
		}
	}
	if dev.marked == 0 || dev.maxOut == 0 || dev.staged() != 0 {
		t.Fatalf("device timed %d spans, staged up to %d, %d never given back", dev.marked, dev.maxOut, dev.staged())
	}
	// hidden behind syncDevice, nothing is staged or timed on the device
	plain := &asyncCPU{}
	if _, err := MeasureLayerCosts(context.Background(), syncDevice{plain}, spec, 3); err != nil {
		t.Fatal(err)
	}
	if plain.marked != 0 || plain.maxOut != 0 {
		t.Fatalf("synchronous measurement used the device's async path: %d spans, %d staged", plain.marked, plain.maxOut)
	}
}

// With Trace, an asynchronous device's spans join the trace: one per
// Forward and Backward, in order, labelled as the action they timed.
func TestStageTraceDeviceSpans(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := baseSpec().WithDefaults(2)
	links := NewMemPipeline(2, 1)
	reps, errs := runStages(ctx, spec, 2, func(s int) RunConfig {
		return RunConfig{JobID: "j", Stage: s, Stages: 2, Links: links[s], Device: &asyncCPU{}, Trace: true}
	})
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for _, r := range reps {
		acts, _ := StageActions(Schedule1F1B, 2, spec.MicroBatches, r.Stage)
		var want []string
		for _, a := range acts {
			if a.Op == OpForward || a.Op == OpBackward {
				want = append(want, fmt.Sprintf("device %v %d", a.Op, a.MicroBatch))
			}
		}
		var got []string
		for _, a := range r.Trace {
			if strings.HasPrefix(a.Op, "device ") {
				if a.EndUS < a.StartUS {
					t.Fatalf("stage %d: span %+v ends before it starts", r.Stage, a)
				}
				got = append(got, fmt.Sprintf("%s %d", a.Op, a.MicroBatch))
			}
		}
		if len(got) != spec.Steps*len(want) {
			t.Fatalf("stage %d: %d device spans, want %d", r.Stage, len(got), spec.Steps*len(want))
		}
		for i, g := range got {
			if g != want[i%len(want)] {
				t.Fatalf("stage %d: device span %d is %q, want %q", r.Stage, i, g, want[i%len(want)])
			}
		}
	}
}
