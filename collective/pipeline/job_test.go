package pipeline

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"math/rand"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func testLogger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug, Output: tWriter{t}})
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) { w.t.Log(string(p)); return len(p), nil }

// runPipeline runs every stage of spec over links in goroutines and returns
// the stages' reports in stage order.
func runPipeline(t *testing.T, ctx context.Context, spec JobSpec, links []StageLinks, onOutput func(step, mb int, m *Message)) ([]*Report, []error) {
	t.Helper()
	return runStages(ctx, spec, len(links), func(s int) RunConfig {
		return RunConfig{
			JobID: "job-1", Generation: 3, Stage: s, Stages: len(links), Links: links[s],
			Logger: testLogger(t), KeepParams: true, OnOutput: onOutput, RecvTimeout: 20 * time.Second,
		}
	})
}

// runStages runs RunJob for stages 0..p-1 in goroutines, with cfg(s) as
// stage s's config, and returns their reports and errors in stage order.
func runStages(ctx context.Context, spec JobSpec, p int, cfg func(s int) RunConfig) ([]*Report, []error) {
	reps := make([]*Report, p)
	errs := make([]error, p)
	var wg sync.WaitGroup
	for s := 0; s < p; s++ {
		c := cfg(s)
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			reps[s], errs[s] = RunJob(ctx, c, spec)
		}(s)
	}
	wg.Wait()
	return reps, errs
}

// runUntilLinkDies runs stages 0..running-1 of job "job-1" (generation 3,
// len(links) stages) on links, calls kill while they run, and checks that
// every running stage then fails with a link error: not a timeout, and
// before ctx ends.
func runUntilLinkDies(t *testing.T, ctx context.Context, spec JobSpec, links []StageLinks, running int, kill func()) {
	t.Helper()
	errs := make([]error, running)
	var wg sync.WaitGroup
	for s := 0; s < running; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			_, errs[s] = RunJob(ctx, RunConfig{JobID: "job-1", Generation: 3, Stage: s, Stages: len(links), Links: links[s]}, spec)
		}(s)
	}
	kill()
	wg.Wait()
	for s, err := range errs {
		if err == nil || ctx.Err() != nil || errors.Is(err, ErrTimeout) {
			t.Fatalf("stage %d: err = %v (ctx %v), want a link error, not a timeout", s, err, ctx.Err())
		}
		t.Logf("stage %d: %v", s, err)
	}
}

func relClose(a, b, tol float64) bool {
	return math.Abs(a-b) <= tol*math.Max(1, math.Max(math.Abs(a), math.Abs(b)))
}

func baseSpec() JobSpec {
	return JobSpec{Layers: []int{12, 16, 24, 16, 12, 8, 4}, BatchSize: 32, MicroBatches: 8, Steps: 6, Seed: 42, LearningRate: 0.1}
}

func TestPipelineTrainingMatchesSingleProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, act := range []string{ActTanh, ActReLU} {
		spec := baseSpec()
		spec.Activation = act
		ref, err := RunReference(spec, nil)
		if err != nil {
			t.Fatal(err)
		}
		if ref.Losses[len(ref.Losses)-1] >= ref.Losses[0] {
			t.Fatalf("%s: reference loss does not fall: %v", act, ref.Losses)
		}
		// The same model split 1..6 ways, with both schedules and tight and
		// loose queues, must reproduce the single-process run.
		byHash := map[string]string{}
		for _, p := range []int{1, 2, 3, 4, 6} {
			for _, sched := range []string{ScheduleGPipe, Schedule1F1B} {
				for _, q := range []struct{ buffer, inFlight int }{{0, 1}, {2, 3}} {
					name := fmt.Sprintf("%s/p=%d/%s/buffer=%d/inflight=%d", act, p, sched, q.buffer, q.inFlight)
					s := spec
					s.Schedule = sched
					s.InFlight = q.inFlight
					reps, errs := runPipeline(t, ctx, s, NewMemPipeline(p, q.buffer), nil)
					for i, err := range errs {
						if err != nil {
							t.Fatalf("%s: stage %d: %v", name, i, err)
						}
					}
					last := reps[p-1]
					if len(last.Losses) != len(ref.Losses) {
						t.Fatalf("%s: %d losses, want %d", name, len(last.Losses), len(ref.Losses))
					}
					for i := range ref.Losses {
						if !relClose(last.Losses[i], ref.Losses[i], 1e-5) {
							t.Fatalf("%s: step %d loss %v, single process %v", name, i, last.Losses[i], ref.Losses[i])
						}
					}
					var params []LayerParams
					var hashes string
					for _, r := range reps {
						params = append(params, r.Params...)
						hashes += r.ParamHash
					}
					if len(params) != len(ref.Params) {
						t.Fatalf("%s: %d layers, want %d", name, len(params), len(ref.Params))
					}
					for l := range params {
						if params[l].Layer != l {
							t.Fatalf("%s: layer order %d at %d", name, params[l].Layer, l)
						}
						for i, w := range params[l].W {
							if !relClose(float64(w), float64(ref.Params[l].W[i]), 1e-4) {
								t.Fatalf("%s: layer %d weight %d = %v, single process %v", name, l, i, w, ref.Params[l].W[i])
							}
						}
						for i, b := range params[l].B {
							if !relClose(float64(b), float64(ref.Params[l].B[i]), 1e-4) {
								t.Fatalf("%s: layer %d bias %d = %v, single process %v", name, l, i, b, ref.Params[l].B[i])
							}
						}
					}
					// For a given split, the schedule and queue depth do not
					// change a single bit: gradients accumulate in
					// micro-batch order either way.
					key := fmt.Sprint(p)
					if h, ok := byHash[key]; ok && h != hashes {
						t.Fatalf("%s: parameters differ bitwise from another schedule with the same split", name)
					}
					byHash[key] = hashes
					for _, r := range reps {
						if r.Bubble < 0 || r.Bubble > 1 || r.SamplesPerSec <= 0 {
							t.Fatalf("%s: implausible report %+v", name, r)
						}
					}
				}
			}
		}
	}
}

func TestPipelineInferenceMatchesSingleProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	spec := baseSpec()
	spec.Mode = ModeInference
	spec.Steps = 3
	ref, err := RunReference(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	got := map[[2]int][]float32{}
	reps, errs := runPipeline(t, ctx, spec, NewMemPipeline(3, 1), func(step, mb int, m *Message) {
		mu.Lock()
		defer mu.Unlock()
		got[[2]int{step, mb}] = append([]float32(nil), m.Data...)
	})
	for i, err := range errs {
		if err != nil {
			t.Fatalf("stage %d: %v", i, err)
		}
	}
	rows := spec.BatchSize / spec.MicroBatches
	out := spec.Layers[len(spec.Layers)-1]
	for step := 0; step < spec.Steps; step++ {
		for mb := 0; mb < spec.MicroBatches; mb++ {
			g := got[[2]int{step, mb}]
			want := ref.Outputs[step][mb*rows*out : (mb+1)*rows*out]
			if len(g) != len(want) {
				t.Fatalf("step %d mb %d: %d outputs, want %d", step, mb, len(g), len(want))
			}
			for i := range g {
				if !relClose(float64(g[i]), float64(want[i]), 1e-5) {
					t.Fatalf("step %d mb %d output %d = %v, single process %v", step, mb, i, g[i], want[i])
				}
			}
		}
	}
	// Inference leaves the weights untouched.
	r0, _ := RunReference(JobSpec{Layers: spec.Layers, BatchSize: spec.BatchSize, Seed: spec.Seed, Steps: 1, Mode: ModeInference}, nil)
	var first LayerParams
	for _, r := range reps {
		if r.Stage == 0 {
			first = r.Params[0]
		}
	}
	for i := range first.W {
		if first.W[i] != r0.Params[0].W[i] {
			t.Fatal("inference changed the weights")
		}
	}
}

// TestGradientsFiniteDifference checks the layer math: the analytic
// gradient of the loss with respect to a few weights against a central
// difference, in a single-stage model.
func TestGradientsFiniteDifference(t *testing.T) {
	for _, act := range []string{ActTanh, ActReLU} {
		spec := ModelSpec{Layers: []int{5, 7, 3}, BatchSize: 6, Seed: 9, LearningRate: 0, Activation: act}
		loss := func(dw func(ws [][]float32)) (float64, []LayerParams) {
			m, err := newMLPStage(CPU{}, spec, 0, 2, true, true, 1, true)
			if err != nil {
				t.Fatal(err)
			}
			if dw != nil {
				ws := [][]float32{m.layers[0].w.(*HostTensor).Data, m.layers[1].w.(*HostTensor).Data}
				dw(ws)
			}
			if _, err := m.Forward(0, 0, nil); err != nil {
				t.Fatal(err)
			}
			if _, err := m.Backward(0, 0, nil); err != nil {
				t.Fatal(err)
			}
			var grads []LayerParams
			for _, ly := range m.layers {
				grads = append(grads, LayerParams{W: append([]float32(nil), ly.dw.(*HostTensor).Data...), B: append([]float32(nil), ly.db.(*HostTensor).Data...)})
			}
			l, _ := m.EndStep(0)
			return l, grads
		}
		_, grads := loss(nil)
		const eps = 1e-2
		checked := 0
		for l := 0; l < 2; l++ {
			for _, i := range []int{0, 3, 7, 11} {
				up, _ := loss(func(ws [][]float32) { ws[l][i] += eps })
				down, _ := loss(func(ws [][]float32) { ws[l][i] -= eps })
				num := (up - down) / (2 * eps)
				an := float64(grads[l].W[i])
				if math.Abs(num-an) > 2e-3+0.03*math.Abs(an) {
					t.Fatalf("%s: layer %d weight %d: analytic %v, numeric %v", act, l, i, an, num)
				}
				checked++
			}
		}
		if checked == 0 {
			t.Fatal("nothing checked")
		}
	}
}

func TestPipelineFailureStopsEveryStage(t *testing.T) {
	base := runtime.NumGoroutine()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links := NewMemPipeline(4, 1)
	// Stage 2's link to stage 3 breaks at the third activation.
	var n atomic.Int32
	links[2].Next.(*MemLink).FailSend = func(m *Message) error {
		if n.Add(1) == 3 {
			return errors.New("injected network failure")
		}
		return nil
	}
	spec := baseSpec()
	spec.Steps = 50
	_, errs := runPipeline(t, ctx, spec, links, nil)
	for s, err := range errs {
		if err == nil {
			t.Fatalf("stage %d returned no error after a link failure", s)
		}
		if ctx.Err() != nil || errors.Is(err, ErrTimeout) {
			t.Fatalf("stage %d stopped by a deadline, not by the failure: %v", s, err)
		}
		t.Logf("stage %d: %v", s, err)
	}
	waitGoroutines(t, base)
}

func TestPipelineCancel(t *testing.T) {
	base := runtime.NumGoroutine()
	ctx, cancel := context.WithCancel(context.Background())
	links := NewMemPipeline(3, 0)
	spec := baseSpec()
	spec.Steps = 1 << 20
	var once sync.Once
	done := make(chan struct{})
	// Cancel once training is under way.
	links[0].Next.(*MemLink).FailSend = func(m *Message) error {
		if m.Tag.Step == 2 {
			once.Do(cancel)
		}
		return nil
	}
	go func() {
		_, errs := runPipeline(t, ctx, spec, links, func(step, mb int, m *Message) {})
		for s, err := range errs {
			if err == nil {
				t.Errorf("stage %d: no error after cancel", s)
			}
		}
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("stages did not stop after cancel")
	}
	waitGoroutines(t, base)
}

func TestPipelineRefusesOtherGeneration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links := NewMemPipeline(2, 1)
	spec := baseSpec().WithDefaults(2)
	errs := make([]error, 2)
	var wg sync.WaitGroup
	for s := 0; s < 2; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			_, errs[s] = RunJob(ctx, RunConfig{JobID: "job-1", Generation: uint64(1 + s), Stage: s, Stages: 2, Links: links[s]}, spec)
		}(s)
	}
	wg.Wait()
	if !errors.Is(errs[1], ErrProtocol) {
		t.Fatalf("stage 1 err = %v, want ErrProtocol", errs[1])
	}
	if errs[0] == nil {
		t.Fatal("stage 0 did not fail")
	}
}

func TestPipelineTimeout(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// Stage 1's peer never runs: its receive must time out, not hang.
	links := NewMemPipeline(2, 1)
	defer links[0].Close()
	_, err := RunJob(ctx, RunConfig{JobID: "j", Stage: 1, Stages: 2, Links: links[1], RecvTimeout: 50 * time.Millisecond}, baseSpec())
	if !errors.Is(err, ErrTimeout) {
		t.Fatalf("err = %v, want ErrTimeout", err)
	}
}

func TestJobSpecValidation(t *testing.T) {
	good := baseSpec()
	for _, tc := range []struct {
		name   string
		mod    func(*JobSpec)
		stages int
	}{
		{"too few layers for stages", func(s *JobSpec) { s.Layers = []int{4, 4, 4} }, 3},
		{"zero width", func(s *JobSpec) { s.Layers = []int{4, 0, 4} }, 1},
		{"negative batch", func(s *JobSpec) { s.BatchSize = -1 }, 1},
		{"negative microbatch size", func(s *JobSpec) { s.MicroBatchSize = -1 }, 1},
		{"batch not multiple", func(s *JobSpec) { s.MicroBatches = 5 }, 1},
		{"bad schedule", func(s *JobSpec) { s.Schedule = "zb" }, 1},
		{"bad mode", func(s *JobSpec) { s.Mode = "eval" }, 1},
		{"bad device", func(s *JobSpec) { s.Device = "tpu" }, 1},
		{"bad activation", func(s *JobSpec) { s.Activation = "gelu" }, 1},
		{"negative lr", func(s *JobSpec) { s.LearningRate = -1 }, 1},
	} {
		s := good
		tc.mod(&s)
		if err := s.WithDefaults(tc.stages).Validate(tc.stages); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%s: err = %v, want ErrInvalidSpec", tc.name, err)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
	}
	if err := good.WithDefaults(6).Validate(6); err != nil {
		t.Fatalf("good spec refused: %v", err)
	}
	// The batch given per micro-batch, as the control API does.
	mb := JobSpec{Layers: []int{4, 4, 4}, MicroBatchSize: 3, MicroBatches: 5}.WithDefaults(2)
	if mb.BatchSize != 15 || mb.Validate(2) != nil {
		t.Fatalf("microbatch_size spec: %+v, %v", mb, mb.Validate(2))
	}
	both := JobSpec{Layers: []int{4, 4}, BatchSize: 10, MicroBatchSize: 3, MicroBatches: 5}.WithDefaults(1)
	if err := both.Validate(1); !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("disagreeing batch sizes: err = %v", err)
	}
	// cuda without a device implementation.
	s := good
	s.Device = DeviceCUDA
	if _, err := RunJob(context.Background(), RunConfig{JobID: "j", Stages: 1}, s); !errors.Is(err, ErrNoDevice) {
		t.Fatalf("cuda err = %v, want ErrNoDevice", err)
	}
}

func waitGoroutines(t *testing.T, base int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > base {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<16)
			t.Fatalf("%d goroutines left, %d before:\n%s", runtime.NumGoroutine(), base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestReportJSON(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	reps, errs := runPipeline(t, ctx, baseSpec(), NewMemPipeline(2, 1), nil)
	for _, err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	b, err := json.Marshal(reps[1])
	if err != nil {
		t.Fatal(err)
	}
	var back map[string]any
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"job_id", "generation", "stage", "losses", "final_loss", "samples_per_sec", "bubble", "busy_seconds", "param_hash", "layer_start", "layer_end"} {
		if _, ok := back[k]; !ok {
			t.Errorf("report JSON lacks %q: %s", k, b)
		}
	}
	if l := back["losses"].([]any); len(l) != baseSpec().Steps {
		t.Fatalf("losses %v", l)
	}
}

// TestPipelineRandomShapes trains random models on random pipelines (stages,
// micro-batches, widths, schedules, queue depths, link buffers) and checks
// each against its single-process run.
func TestPipelineRandomShapes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r := rand.New(rand.NewSource(11))
	cases, checked := 40, 0
	if testing.Short() {
		cases = 10
	}
	for c := 0; c < cases; c++ {
		p := 1 + r.Intn(5)
		layers := []int{1 + r.Intn(9)}
		for i := 0; i < p+r.Intn(3); i++ {
			layers = append(layers, 1+r.Intn(12))
		}
		m := 1 + r.Intn(9)
		spec := JobSpec{
			Layers: layers, MicroBatchSize: 1 + r.Intn(4), MicroBatches: m, Steps: 1 + r.Intn(4),
			Seed: r.Int63(), LearningRate: 0.2 * r.Float64(), InFlight: 1 + r.Intn(3),
			Schedule:   []string{ScheduleGPipe, Schedule1F1B}[r.Intn(2)],
			Activation: []string{ActTanh, ActReLU}[r.Intn(2)],
		}
		name := fmt.Sprintf("case %d: p=%d %+v", c, p, spec)
		ref, err := RunReference(spec, nil)
		if err != nil {
			t.Fatalf("%s: reference: %v", name, err)
		}
		reps, errs := runPipeline(t, ctx, spec, NewMemPipeline(p, r.Intn(3)), nil)
		for s, err := range errs {
			if err != nil {
				t.Fatalf("%s: stage %d: %v", name, s, err)
			}
		}
		for i, l := range reps[p-1].Losses {
			if !relClose(l, ref.Losses[i], 1e-5) {
				t.Fatalf("%s: step %d loss %v, single process %v", name, i, l, ref.Losses[i])
			}
		}
		l := 0
		for _, rep := range reps {
			for _, lp := range rep.Params {
				for i, w := range lp.W {
					if !relClose(float64(w), float64(ref.Params[l].W[i]), 1e-4) {
						t.Fatalf("%s: layer %d weight %d = %v, single process %v", name, l, i, w, ref.Params[l].W[i])
					}
				}
				l++
			}
		}
		if l != len(ref.Params) {
			t.Fatalf("%s: %d layers across stages, want %d", name, l, len(ref.Params))
		}
		checked++
	}
	t.Logf("%d random pipelines matched their single-process runs", checked)
}

// TestInterleavedPipelineMatchesSingleProcess trains with the interleaved
// schedule (several model chunks per stage, a ring link from the last stage
// back to the first) and checks losses and weights against one process.
func TestInterleavedPipelineMatchesSingleProcess(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	for _, tc := range []struct{ p, v, m, buffer int }{{2, 2, 4, 0}, {2, 3, 6, 1}, {3, 2, 6, 0}, {4, 2, 8, 2}, {3, 3, 3, 1}} {
		layers := []int{6}
		for i := 0; i < tc.p*tc.v+1; i++ {
			layers = append(layers, 5+i%4)
		}
		spec := JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: tc.m, Steps: 4, Seed: 3, LearningRate: 0.1, Schedule: ScheduleInterleaved, Chunks: tc.v}
		name := fmt.Sprintf("p=%d v=%d m=%d buffer=%d", tc.p, tc.v, tc.m, tc.buffer)
		ref, err := RunReference(JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: tc.m, Steps: 4, Seed: 3, LearningRate: 0.1}, nil)
		if err != nil {
			t.Fatal(err)
		}
		reps, errs := runPipeline(t, ctx, spec, NewMemPipelineRing(tc.p, tc.buffer), nil)
		for s, err := range errs {
			if err != nil {
				t.Fatalf("%s: stage %d: %v", name, s, err)
			}
		}
		last := reps[tc.p-1]
		if len(last.Losses) != len(ref.Losses) {
			t.Fatalf("%s: %d losses", name, len(last.Losses))
		}
		for i, l := range last.Losses {
			if !relClose(l, ref.Losses[i], 1e-5) {
				t.Fatalf("%s: step %d loss %v, single process %v", name, i, l, ref.Losses[i])
			}
		}
		byLayer := map[int]LayerParams{}
		for _, r := range reps {
			if len(r.LayerRanges) != tc.v {
				t.Fatalf("%s: stage %d has %d chunks", name, r.Stage, len(r.LayerRanges))
			}
			for _, lp := range r.Params {
				byLayer[lp.Layer] = lp
			}
		}
		if len(byLayer) != len(ref.Params) {
			t.Fatalf("%s: %d layers across stages, want %d", name, len(byLayer), len(ref.Params))
		}
		for l, want := range ref.Params {
			for i, w := range byLayer[l].W {
				if !relClose(float64(w), float64(want.W[i]), 1e-4) {
					t.Fatalf("%s: layer %d weight %d = %v, single process %v", name, l, i, w, want.W[i])
				}
			}
		}
	}
	// Bad interleaved specs.
	for _, s := range []JobSpec{
		{Layers: []int{4, 4, 4, 4, 4}, BatchSize: 8, MicroBatches: 4, Schedule: ScheduleInterleaved, Chunks: 1},
		{Layers: []int{4, 4, 4, 4}, BatchSize: 8, MicroBatches: 4, Schedule: ScheduleInterleaved, Chunks: 2},
		{Layers: []int{4, 4, 4, 4, 4}, BatchSize: 6, MicroBatches: 3, Schedule: ScheduleInterleaved, Chunks: 2},
		{Layers: []int{4, 4, 4, 4, 4}, BatchSize: 8, MicroBatches: 4, Schedule: Schedule1F1B, Chunks: 2},
	} {
		if err := s.WithDefaults(2).Validate(2); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("%+v: err = %v, want ErrInvalidSpec", s, err)
		} else {
			t.Log(err)
		}
	}
}

// Targets splits its rows over the cores; the values must not depend on
// how many.
func TestTargetsSameOnAnyCoreCount(t *testing.T) {
	m := ModelSpec{Layers: []int{64, 32, 1024}, BatchSize: 256, Seed: 3, Activation: ActTanh}
	x := m.Inputs(0)
	prev := runtime.GOMAXPROCS(1)
	one := m.Targets(x)
	runtime.GOMAXPROCS(max(prev, 4))
	many := m.Targets(x)
	runtime.GOMAXPROCS(prev)
	for i := range one {
		if one[i] != many[i] {
			t.Fatalf("target %d: %v on one core, %v on several", i, one[i], many[i])
		}
	}
}

// A stage that prefetches the next step's batch gets exactly the batch it
// would make itself, and Close waits for a prefetch in flight.
func TestStagePrefetchesNextBatch(t *testing.T) {
	spec := ModelSpec{Layers: []int{8, 4, 2}, BatchSize: 4, Seed: 5, Activation: ActTanh, LearningRate: 0.1}
	m, err := newMLPStage(CPU{}, spec, 0, 2, true, true, 1, true)
	if err != nil {
		t.Fatal(err)
	}
	m.steps = 3
	for step := 0; step < 3; step++ {
		m.batch(step)
		want := m.makeBatch(step)
		if fmt.Sprint(m.x, m.t) != fmt.Sprint(want.x, want.t) {
			t.Fatalf("step %d: prefetched batch differs from the one made in place", step)
		}
		if (m.pre != nil) != (step < 2) {
			t.Fatalf("step %d: prefetch in flight %v, want %v (steps 3)", step, m.pre != nil, step < 2)
		}
	}
	m.batch(0) // out of order: made in place
	if m.pre == nil {
		t.Fatal("no prefetch of step 1 after step 0")
	}
	m.Close()
	if m.pre != nil {
		t.Fatal("Close left the prefetch in flight")
	}
}
