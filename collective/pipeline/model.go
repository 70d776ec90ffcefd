package pipeline

import (
	"fmt"
	"math"
	"math/rand"
	"runtime"
	"sync"
)

// ModelSpec is a multi-layer perceptron and its training data: Layers are
// the widths, input first ([784, 512, 512, 10] is three layers); hidden
// layers use Activation, the last layer is linear; the loss is the mean
// squared error against the synthetic targets of a fixed random teacher
// (see Targets). Weights start Glorot-uniform from Seed, biases at zero. Every
// step draws a new batch of BatchSize inputs, uniform in [−1, 1), from Seed
// and the step number, so every stage and a single-process run see the same
// data without exchanging it.
type ModelSpec struct {
	Layers       []int
	BatchSize    int
	Seed         int64
	LearningRate float64
	Activation   string
}

// Validate checks the model.
func (m ModelSpec) Validate() error {
	if len(m.Layers) < 2 {
		return fmt.Errorf("%w: layers must list at least 2 widths (input and output), got %v", ErrInvalidSpec, m.Layers)
	}
	for i, w := range m.Layers {
		if w < 1 {
			return fmt.Errorf("%w: layer width %d must be >= 1, got %d", ErrInvalidSpec, i, w)
		}
	}
	if m.BatchSize < 1 {
		return fmt.Errorf("%w: batch size must be >= 1, got %d", ErrInvalidSpec, m.BatchSize)
	}
	if m.LearningRate < 0 || math.IsNaN(m.LearningRate) || math.IsInf(m.LearningRate, 0) {
		return fmt.Errorf("%w: learning rate must be finite and >= 0, got %v", ErrInvalidSpec, m.LearningRate)
	}
	switch m.Activation {
	case ActTanh, ActReLU:
	default:
		return fmt.Errorf("%w: activation must be %q or %q, got %q", ErrInvalidSpec, ActTanh, ActReLU, m.Activation)
	}
	return nil
}

// NumLayers is the number of weight layers.
func (m ModelSpec) NumLayers() int { return len(m.Layers) - 1 }

// LayerCosts returns per-layer compute (multiply-adds per sample) and
// memory (bytes of weights, gradients and saved activations per sample),
// the inputs of sharding.PartitionLayers.
func (m ModelSpec) LayerCosts() (costs []float64, memory []uint64) {
	for l := 0; l < m.NumLayers(); l++ {
		in, out := m.Layers[l], m.Layers[l+1]
		costs = append(costs, float64(in*out))
		memory = append(memory, uint64(4*(2*(in*out+out)+m.BatchSize*(in+out))))
	}
	return costs, memory
}

// initParams returns layer l's initial weights (in×out, row-major) and bias.
func (m ModelSpec) initParams() (ws, bs [][]float32) {
	r := rand.New(rand.NewSource(m.Seed))
	for l := 0; l < m.NumLayers(); l++ {
		in, out := m.Layers[l], m.Layers[l+1]
		lim := math.Sqrt(6 / float64(in+out))
		w := make([]float32, in*out)
		for i := range w {
			w[i] = float32((r.Float64()*2 - 1) * lim)
		}
		ws = append(ws, w)
		bs = append(bs, make([]float32, out))
	}
	return ws, bs
}

// Batch returns step's inputs (BatchSize×Layers[0]) and targets
// (BatchSize×Layers[last]).
func (m ModelSpec) Batch(step int) (x, t []float32) {
	x = m.Inputs(step)
	return x, m.Targets(x)
}

// Inputs returns step's inputs, uniform in [−1, 1).
func (m ModelSpec) Inputs(step int) []float32 {
	r := rand.New(rand.NewSource(m.Seed ^ int64(uint64(step+1)*0x9E3779B97F4A7C15)))
	x := make([]float32, m.BatchSize*m.Layers[0])
	for i := range x {
		x[i] = float32(r.Float64()*2 - 1)
	}
	return x
}

// Targets returns the teacher's outputs for inputs x: output j of a sample
// is tanh(a_j·x[p_j] + b_j·x[q_j]) for fixed random a, b and input indices
// p, q (from Seed): learnable, and cheap to compute for wide layers.
func (m ModelSpec) Targets(x []float32) []float32 {
	in, out := m.Layers[0], m.Layers[len(m.Layers)-1]
	tr := rand.New(rand.NewSource(m.Seed + 7919))
	a, b := make([]float64, out), make([]float64, out)
	p, q := make([]int, out), make([]int, out)
	for j := 0; j < out; j++ {
		a[j], b[j] = tr.Float64()*4-2, tr.Float64()*4-2
		p[j], q[j] = tr.Intn(in), tr.Intn(in)
	}
	rows := len(x) / in
	t := make([]float32, rows*out)
	// rows are independent: split them over the cores (same values)
	workers := max(1, min(runtime.GOMAXPROCS(0), rows*out/(64<<10)))
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(r0, r1 int) {
			defer wg.Done()
			for i := r0; i < r1; i++ {
				xi := x[i*in : (i+1)*in]
				for j := 0; j < out; j++ {
					t[i*out+j] = float32(math.Tanh(a[j]*float64(xi[p[j]]) + b[j]*float64(xi[q[j]])))
				}
			}
		}(w*rows/workers, (w+1)*rows/workers)
	}
	wg.Wait()
	return t
}

// LayerParams are one layer's weights (In×Out, row-major) and bias.
type LayerParams struct {
	Layer   int       `json:"layer"`
	In, Out int       `json:"-"`
	W       []float32 `json:"-"`
	B       []float32 `json:"-"`
}

type layer struct {
	idx     int
	in, out int
	act     string // "" for the linear last layer
	w, b    Tensor
	dw, db  Tensor
	started bool // gradients of this step hold values
}

type mbState struct {
	xs, ys []Tensor // per layer: input and output
}

// mlpStage is the StageModel of the MLP: layers [first, end) of the model.
type mlpStage struct {
	dev         Device
	spec        ModelSpec
	first, last bool // first and last stage of the pipeline
	layers      []*layer
	mbRows      int
	microbatch  int
	train       bool
	saved       map[int]*mbState
	batchStep   int
	x, t        []float32
	// steps > 0: while step s runs, the batch of s+1 (below steps) is made
	// in the background (pre), as a data loader would, off the critical
	// path of the pipeline
	steps    int
	pre      chan batchData
	lossSum  float64
	onOutput func(step, mb int, m *Message)
	// async, when set (RunJob on an AsyncDevice), is dev: outputs and
	// input gradients leave as staged messages (no wait on this
	// goroutine), the last stage computes the loss gradient on the device
	// and the loss at EndStep from its staged outputs (pending)
	async   AsyncDevice
	pending []pendingLoss
	// recvMem, when set (pinned receives, RunJob), is the device's
	// receive memory: the first stage's inputs and the last stage's
	// targets are copied into it and uploaded from there, without a wait,
	// as received messages are
	recvMem recvBuffers
}

// pendingLoss is a micro-batch's output on its way to the host, for the
// step's loss.
type pendingLoss struct {
	y *Staged
	t []float32
}

func newMLPStage(dev Device, spec ModelSpec, layerStart, layerEnd int, first, last bool, microbatches int, train bool) (*mlpStage, error) {
	if spec.BatchSize%microbatches != 0 {
		return nil, fmt.Errorf("%w: batch size %d must be a multiple of micro-batches %d", ErrInvalidSpec, spec.BatchSize, microbatches)
	}
	s := &mlpStage{dev: dev, spec: spec, first: first, last: last, mbRows: spec.BatchSize / microbatches, microbatch: microbatches, train: train, saved: map[int]*mbState{}, batchStep: -1}
	ws, bs := spec.initParams()
	for l := layerStart; l < layerEnd; l++ {
		in, out := spec.Layers[l], spec.Layers[l+1]
		ly := &layer{idx: l, in: in, out: out}
		if l < spec.NumLayers()-1 {
			ly.act = spec.Activation
		}
		var err error
		if ly.w, err = dev.New(in, out); err != nil {
			return nil, err
		}
		if ly.b, err = dev.New(1, out); err != nil {
			return nil, err
		}
		if err := dev.Upload(ly.w, ws[l]); err != nil {
			return nil, err
		}
		if err := dev.Upload(ly.b, bs[l]); err != nil {
			return nil, err
		}
		if train {
			if ly.dw, err = dev.New(in, out); err != nil {
				return nil, err
			}
			if ly.db, err = dev.New(1, out); err != nil {
				return nil, err
			}
		}
		s.layers = append(s.layers, ly)
	}
	return s, nil
}

// batchData is one step's data of a stage.
type batchData struct {
	step int
	x, t []float32
}

// makeBatch makes step's data: inputs on the first stage, targets (from
// the inputs) on the last.
func (s *mlpStage) makeBatch(step int) batchData {
	d := batchData{step: step, x: s.spec.Inputs(step)}
	if s.last {
		d.t = s.spec.Targets(d.x)
	}
	if !s.first {
		d.x = nil
	}
	return d
}

// batch sets step's data (s.x, s.t), taking the prefetched batch when it is
// step's, and starts making the next step's.
func (s *mlpStage) batch(step int) {
	if s.batchStep == step {
		return
	}
	var d batchData
	if s.pre != nil {
		d = <-s.pre
		s.pre = nil
	}
	if d.step != step || (d.x == nil && d.t == nil) {
		d = s.makeBatch(step)
	}
	s.x, s.t, s.batchStep = d.x, d.t, step
	if s.steps > 0 && step+1 < s.steps {
		ch := make(chan batchData, 1)
		s.pre = ch
		go func(next int) { ch <- s.makeBatch(next) }(step + 1)
	}
}

func (s *mlpStage) Forward(step, mb int, in *Message) (*Message, error) {
	dev := s.dev
	r := s.mbRows
	inW := s.layers[0].in
	var src []float32
	if s.first {
		s.batch(step)
		src = s.x[mb*r*inW : (mb+1)*r*inW]
	} else {
		if in.Rows != r || in.Cols != inW {
			return nil, fmt.Errorf("%w: %v has shape %d×%d, stage expects %d×%d", ErrProtocol, in.Tag, in.Rows, in.Cols, r, inW)
		}
		src = in.Data
	}
	x, err := dev.New(r, inW)
	if err != nil {
		return nil, err
	}
	upload := s.dev.Upload // a received message: from its link's memory
	if s.first {
		upload = s.uploadHost // the step's inputs
	}
	if err := upload(x, src); err != nil {
		return nil, err
	}
	st := &mbState{}
	for _, ly := range s.layers {
		y, err := dev.New(r, ly.out)
		if err != nil {
			return nil, err
		}
		if err := dev.Gemm(false, false, 1, x, ly.w, 0, y); err != nil {
			return nil, err
		}
		if err := dev.AddRowVector(y, ly.b); err != nil {
			return nil, err
		}
		if ly.act != "" {
			if err := dev.Activate(ly.act, y); err != nil {
				return nil, err
			}
		}
		st.xs = append(st.xs, x)
		st.ys = append(st.ys, y)
		x = y
	}
	outW := s.layers[len(s.layers)-1].out
	var out *Message
	switch {
	case s.async != nil && !s.last:
		// to the next stage: staged, the sender waits for it
		sd, err := s.async.DownloadAsync(x)
		if err != nil {
			return nil, err
		}
		out = sd.message(r, outW)
	case s.async != nil && s.train && s.onOutput == nil:
		// the model's output in training: read for the loss in Backward
		out = &Message{Rows: r, Cols: outW}
	default:
		out = &Message{Rows: r, Cols: outW, Data: make([]float32, r*outW)}
		if err := dev.Download(out.Data, x); err != nil {
			return nil, err
		}
	}
	if s.train {
		s.saved[mb] = st
	} else {
		s.free(st)
	}
	if s.last && s.onOutput != nil {
		s.onOutput(step, mb, out)
	}
	return out, nil
}

func (s *mlpStage) Backward(step, mb int, grad *Message) (*Message, error) {
	dev := s.dev
	st := s.saved[mb]
	if st == nil {
		return nil, fmt.Errorf("backward of micro-batch %d before its forward", mb)
	}
	delete(s.saved, mb)
	defer s.free(st)
	r := s.mbRows
	nl := len(s.layers)
	outW := s.layers[nl-1].out
	dy, err := dev.New(r, outW)
	if err != nil {
		return nil, err
	}
	defer func() { dev.Free(dy) }() // the last gradient tensor; earlier ones are freed as they are replaced
	if s.last && s.async != nil {
		// the same gradient on the device; y goes to the host for the
		// loss, which EndStep adds up
		s.batch(step)
		t := s.t[mb*r*outW : (mb+1)*r*outW]
		tt, err := dev.New(r, outW)
		if err != nil {
			return nil, err
		}
		err = s.uploadHost(tt, t)
		if err == nil {
			err = s.async.MSEGrad(st.ys[nl-1], tt, dy, float32(s.spec.BatchSize*outW))
		}
		dev.Free(tt) // later work on the device's queue runs after the kernel
		if err != nil {
			return nil, err
		}
		y, err := s.async.DownloadAsync(st.ys[nl-1])
		if err != nil {
			return nil, err
		}
		s.pending = append(s.pending, pendingLoss{y: y, t: t})
	} else if s.last {
		// d(MSE)/dy = 2(y − t) / (B·out), over the whole batch.
		s.batch(step)
		y := make([]float32, r*outW)
		if err := dev.Download(y, st.ys[nl-1]); err != nil {
			return nil, err
		}
		t := s.t[mb*r*outW : (mb+1)*r*outW]
		n := float32(s.spec.BatchSize * outW)
		g := make([]float32, len(y))
		var loss float64
		for i := range y {
			d := y[i] - t[i]
			loss += float64(d) * float64(d)
			g[i] = 2 * d / n
		}
		s.lossSum += loss / float64(n)
		if err := dev.Upload(dy, g); err != nil {
			return nil, err
		}
	} else {
		if grad.Rows != r || grad.Cols != outW {
			return nil, fmt.Errorf("%w: %v has shape %d×%d, stage expects %d×%d", ErrProtocol, grad.Tag, grad.Rows, grad.Cols, r, outW)
		}
		if err := dev.Upload(dy, grad.Data); err != nil {
			return nil, err
		}
	}
	for i := nl - 1; i >= 0; i-- {
		ly := s.layers[i]
		if ly.act != "" {
			if err := dev.ActivationGrad(ly.act, st.ys[i], dy); err != nil {
				return nil, err
			}
		}
		beta := float32(0)
		if ly.started {
			beta = 1
		}
		ly.started = true
		if err := dev.Gemm(true, false, 1, st.xs[i], dy, beta, ly.dw); err != nil {
			return nil, err
		}
		if err := dev.SumRows(ly.db, dy, beta); err != nil {
			return nil, err
		}
		if i == 0 && s.first {
			break
		}
		dx, err := dev.New(r, ly.in)
		if err != nil {
			return nil, err
		}
		if err := dev.Gemm(false, true, 1, dy, ly.w, 0, dx); err != nil {
			dev.Free(dx)
			return nil, err
		}
		dev.Free(dy)
		dy = dx
	}
	if s.first {
		return nil, nil
	}
	if s.async != nil {
		sd, err := s.async.DownloadAsync(dy)
		if err != nil {
			return nil, err
		}
		return sd.message(r, s.layers[0].in), nil
	}
	out := &Message{Rows: r, Cols: s.layers[0].in, Data: make([]float32, r*s.layers[0].in)}
	if err := dev.Download(out.Data, dy); err != nil {
		return nil, err
	}
	return out, nil
}

// EndStep applies SGD and returns the step's loss (last stage; 0 elsewhere).
func (s *mlpStage) EndStep(step int) (float64, error) {
	if !s.train {
		return 0, nil
	}
	if len(s.saved) != 0 {
		return 0, fmt.Errorf("step %d ended with %d micro-batches not run backward", step, len(s.saved))
	}
	lr := float32(s.spec.LearningRate)
	for _, ly := range s.layers {
		if !ly.started {
			continue
		}
		if err := s.dev.Axpy(-lr, ly.dw, ly.w); err != nil {
			return 0, err
		}
		if err := s.dev.Axpy(-lr, ly.db, ly.b); err != nil {
			return 0, err
		}
		ly.started = false
	}
	if err := s.addPendingLoss(); err != nil {
		return 0, err
	}
	loss := s.lossSum
	s.lossSum = 0
	return loss, nil
}

// uploadHost copies src, the stage's own host data (inputs, targets), into
// dst: through the device's receive memory when the stage has it
// (recvMem), so that the upload is queued without a wait; directly
// otherwise.
func (s *mlpStage) uploadHost(dst Tensor, src []float32) error {
	if s.recvMem == nil || len(src) == 0 {
		return s.dev.Upload(dst, src)
	}
	b := s.recvMem.get(len(src))
	copy(b, src)
	err := s.dev.Upload(dst, b)
	s.recvMem.put(b) // handed out again once the upload is done
	return err
}

// addPendingLoss adds the staged outputs' losses to lossSum, in the order
// of their micro-batches' Backward (as the host path does).
func (s *mlpStage) addPendingLoss() error {
	n := float32(s.spec.BatchSize * s.layers[len(s.layers)-1].out)
	var err error
	for _, p := range s.pending {
		if err == nil {
			err = p.y.Wait()
		}
		if err == nil {
			var loss float64
			for i, y := range p.y.Data {
				d := y - p.t[i]
				loss += float64(d) * float64(d)
			}
			s.lossSum += loss / float64(n)
		}
		p.y.Release()
	}
	s.pending = s.pending[:0]
	return err
}

// busyDevice is the device that times the stage's work (RunStage), nil
// where the host's time in Forward and Backward is the stage's.
func (s *mlpStage) busyDevice() AsyncDevice { return s.async }

// free releases a micro-batch's saved tensors.
func (s *mlpStage) free(st *mbState) {
	if len(st.xs) > 0 {
		s.dev.Free(st.xs[0]) // the others are the previous layers' outputs
	}
	for _, y := range st.ys {
		s.dev.Free(y)
	}
}

// Close releases the stage's parameters and anything still saved.
func (s *mlpStage) Close() {
	if s.pre != nil { // let the prefetch finish: no goroutine outlives the stage
		<-s.pre
		s.pre = nil
	}
	for mb, st := range s.saved {
		s.free(st)
		delete(s.saved, mb)
	}
	for _, p := range s.pending {
		p.y.Release()
	}
	s.pending = nil
	for _, ly := range s.layers {
		for _, t := range []Tensor{ly.w, ly.b, ly.dw, ly.db} {
			if t != nil {
				s.dev.Free(t)
			}
		}
	}
	s.layers = nil
}

// Params returns the stage's current parameters.
func (s *mlpStage) Params() ([]LayerParams, error) {
	var out []LayerParams
	for _, ly := range s.layers {
		p := LayerParams{Layer: ly.idx, In: ly.in, Out: ly.out, W: make([]float32, ly.in*ly.out), B: make([]float32, ly.out)}
		if err := s.dev.Download(p.W, ly.w); err != nil {
			return nil, err
		}
		if err := s.dev.Download(p.B, ly.b); err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}
