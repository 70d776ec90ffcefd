package pipeline

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"math"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/sharding"
)

// Modes of a pipeline job.
const (
	ModeTrain     = "train"
	ModeInference = "inference"
)

// Devices a pipeline job may ask for.
const (
	DeviceCPU  = "cpu"
	DeviceCUDA = "cuda"
	DeviceAuto = "auto"
)

// ErrNoDevice means the job asked for a device this build or host lacks.
var ErrNoDevice = errors.New("pipeline device not available")

// JobSpec is the `pipeline:` section of a job of type pipeline. Its ranks
// are the stages, rank r running stage r.
//
//	type: pipeline
//	ranks: 4
//	pipeline: {layers: [256, 512, 512, 512, 10], microbatch_size: 4, microbatches: 16,
//	           steps: 20, seed: 1, learning_rate: 0.05, schedule: 1f1b, device: cpu}
type JobSpec struct {
	// Layers are the MLP's widths, input first; at least stages+1 of them
	// (one weight layer per stage at least).
	Layers []int `json:"layers" yaml:"layers"`
	// BatchSize is the samples per step; a multiple of MicroBatches.
	// Zero: MicroBatchSize × MicroBatches.
	BatchSize int `json:"batch_size" yaml:"batch_size"`
	// MicroBatchSize is the samples per micro-batch, the other way to give
	// the batch (the control API's pipeline.microbatch_size). Default 16
	// when BatchSize is zero too.
	MicroBatchSize int `json:"microbatch_size" yaml:"microbatch_size"`
	// MicroBatches per step. Default: 4 × stages, capped at BatchSize.
	MicroBatches int `json:"microbatches" yaml:"microbatches"`
	// Steps of SGD (training) or batches streamed (inference). Default 10.
	Steps int `json:"steps" yaml:"steps"`
	// Seed of the weights and the synthetic data.
	Seed int64 `json:"seed" yaml:"seed"`
	// LearningRate of plain SGD. Default 0.05.
	LearningRate float64 `json:"learning_rate" yaml:"learning_rate"`
	// Schedule is "1f1b" (default), "gpipe" or "interleaved" (with
	// Chunks >= 2); ignored for inference.
	Schedule string `json:"schedule" yaml:"schedule"`
	// Chunks is the model chunks per stage of the interleaved schedule
	// (stage s holds chunks s, s+p, ...); default 1.
	Chunks int `json:"chunks" yaml:"chunks"`
	// Mode is "train" (default) or "inference" (forward only).
	Mode string `json:"mode" yaml:"mode"`
	// Device is "cpu" (default), "cuda" or "auto".
	Device string `json:"device" yaml:"device"`
	// Activation of hidden layers: "tanh" (default) or "relu".
	Activation string `json:"activation" yaml:"activation"`
	// InFlight bounds queued micro-batches per link direction. Default 2.
	InFlight int `json:"in_flight" yaml:"in_flight"`
	// LayerCosts, when set, is the cost of each weight layer (any unit, all
	// > 0: for example MeasureLayerCosts' seconds per micro-batch), which
	// StageLayers balances instead of multiply-adds.
	LayerCosts []float64 `json:"layer_costs,omitempty" yaml:"layer_costs,omitempty"`
}

// WithDefaults fills the unset optional fields for a pipeline of stages.
func (s JobSpec) WithDefaults(stages int) JobSpec {
	if s.BatchSize == 0 {
		if s.MicroBatches == 0 {
			s.MicroBatches = 4 * max(stages, 1)
		}
		if s.MicroBatchSize == 0 {
			s.MicroBatchSize = 16
		}
		s.BatchSize = s.MicroBatchSize * s.MicroBatches
	}
	if s.MicroBatches == 0 {
		s.MicroBatches = 4 * max(stages, 1)
		if s.BatchSize > 0 {
			s.MicroBatches = min(s.MicroBatches, s.BatchSize)
			for s.BatchSize%s.MicroBatches != 0 {
				s.MicroBatches--
			}
		}
	}
	if s.Steps == 0 {
		s.Steps = 10
	}
	if s.LearningRate == 0 {
		s.LearningRate = 0.05
	}
	if s.Schedule == "" {
		s.Schedule = Schedule1F1B
	}
	if s.Mode == "" {
		s.Mode = ModeTrain
	}
	if s.Device == "" {
		s.Device = DeviceCPU
	}
	if s.Activation == "" {
		s.Activation = ActTanh
	}
	if s.InFlight == 0 {
		s.InFlight = 2
	}
	if s.Chunks == 0 {
		s.Chunks = 1
	}
	s.Schedule = strings.ToLower(s.Schedule)
	return s
}

// Validate checks a spec (after WithDefaults) for a pipeline of stages.
func (s JobSpec) Validate(stages int) error {
	if err := s.model().Validate(); err != nil {
		return fmt.Errorf("pipeline job spec: %w", err)
	}
	if n := len(s.Layers) - 1; n < stages {
		return fmt.Errorf("%w: pipeline job spec: %d stages need at least %d weight layers (%d widths), got %d; add layers or use fewer ranks", ErrInvalidSpec, stages, stages, stages+1, n)
	}
	if s.LayerCosts != nil {
		if len(s.LayerCosts) != len(s.Layers)-1 {
			return fmt.Errorf("%w: pipeline job spec: %d layer costs for %d weight layers; give one per layer or none", ErrInvalidSpec, len(s.LayerCosts), len(s.Layers)-1)
		}
		for i, c := range s.LayerCosts {
			if !(c > 0) || math.IsInf(c, 0) {
				return fmt.Errorf("%w: pipeline job spec: layer cost %d is %v; costs must be positive and finite", ErrInvalidSpec, i, c)
			}
		}
	}
	switch {
	case s.MicroBatches < 1:
		return fmt.Errorf("%w: pipeline job spec: microbatches must be >= 1, got %d", ErrInvalidSpec, s.MicroBatches)
	case s.MicroBatchSize < 0:
		return fmt.Errorf("%w: pipeline job spec: microbatch_size must be >= 0, got %d", ErrInvalidSpec, s.MicroBatchSize)
	case s.BatchSize%s.MicroBatches != 0:
		return fmt.Errorf("%w: pipeline job spec: batch_size %d must be a multiple of microbatches %d", ErrInvalidSpec, s.BatchSize, s.MicroBatches)
	case s.MicroBatchSize > 0 && s.BatchSize != s.MicroBatchSize*s.MicroBatches:
		return fmt.Errorf("%w: pipeline job spec: batch_size %d disagrees with microbatch_size %d × microbatches %d; give one of batch_size and microbatch_size", ErrInvalidSpec, s.BatchSize, s.MicroBatchSize, s.MicroBatches)
	case s.Steps < 1:
		return fmt.Errorf("%w: pipeline job spec: steps must be >= 1, got %d", ErrInvalidSpec, s.Steps)
	case s.InFlight < 1:
		return fmt.Errorf("%w: pipeline job spec: in_flight must be >= 1, got %d", ErrInvalidSpec, s.InFlight)
	}
	switch s.Schedule {
	case Schedule1F1B, ScheduleGPipe:
		if s.Chunks != 1 {
			return fmt.Errorf("%w: pipeline job spec: chunks %d need schedule %q, got %q", ErrInvalidSpec, s.Chunks, ScheduleInterleaved, s.Schedule)
		}
	case ScheduleInterleaved:
		switch {
		case s.Chunks < 2:
			return fmt.Errorf("%w: pipeline job spec: the interleaved schedule needs chunks >= 2, got %d", ErrInvalidSpec, s.Chunks)
		case stages < 2:
			return fmt.Errorf("%w: pipeline job spec: the interleaved schedule needs at least 2 ranks", ErrInvalidSpec)
		case s.MicroBatches%stages != 0:
			return fmt.Errorf("%w: pipeline job spec: the interleaved schedule needs microbatches (%d) to be a multiple of ranks (%d)", ErrInvalidSpec, s.MicroBatches, stages)
		case len(s.Layers)-1 < stages*s.Chunks:
			return fmt.Errorf("%w: pipeline job spec: %d ranks × %d chunks need at least %d weight layers, got %d", ErrInvalidSpec, stages, s.Chunks, stages*s.Chunks, len(s.Layers)-1)
		case s.Mode == ModeInference:
			return fmt.Errorf("%w: pipeline job spec: inference runs forward only; drop the interleaved schedule", ErrInvalidSpec)
		}
	default:
		return fmt.Errorf("%w: pipeline job spec: schedule must be %q, %q or %q, got %q", ErrInvalidSpec, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved, s.Schedule)
	}
	switch s.Mode {
	case ModeTrain, ModeInference:
	default:
		return fmt.Errorf("%w: pipeline job spec: mode must be %q or %q, got %q", ErrInvalidSpec, ModeTrain, ModeInference, s.Mode)
	}
	switch s.Device {
	case DeviceCPU, DeviceCUDA, DeviceAuto:
	default:
		return fmt.Errorf("%w: pipeline job spec: device must be %q, %q or %q, got %q", ErrInvalidSpec, DeviceCPU, DeviceCUDA, DeviceAuto, s.Device)
	}
	return nil
}

func (s JobSpec) model() ModelSpec {
	return ModelSpec{Layers: s.Layers, BatchSize: s.BatchSize, Seed: s.Seed, LearningRate: s.LearningRate, Activation: s.Activation}
}

// StageLayers returns the weight layers [start, end) of every stage: a
// partition by sharding.PartitionLayers that balances LayerCosts when set,
// else multiply-adds.
func (s JobSpec) StageLayers(stages int) ([][2]int, error) {
	costs, mem := s.model().LayerCosts()
	if len(s.LayerCosts) == len(costs) {
		costs = s.LayerCosts
	}
	p, err := sharding.PartitionLayers(costs, mem, stages)
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidSpec, err)
	}
	out := make([][2]int, stages)
	for i, st := range p.Stages {
		out[i] = [2]int{st.Start, st.End}
	}
	return out, nil
}

// ChunkLayers returns, for every stage, the weight layers of each of its
// chunks: the model is split into stages×chunks parts (StageLayers) and
// stage s holds parts s, s+stages, s+2·stages, ...
func (s JobSpec) ChunkLayers(stages, chunks int) ([][][2]int, error) {
	parts, err := s.StageLayers(stages * chunks)
	if err != nil {
		return nil, err
	}
	out := make([][][2]int, stages)
	for c := 0; c < chunks; c++ {
		for st := 0; st < stages; st++ {
			out[st] = append(out[st], parts[c*stages+st])
		}
	}
	return out, nil
}

// RunConfig is how the node runs one rank (stage) of a pipeline job.
type RunConfig struct {
	JobID      string
	Generation uint64
	// Stage is the rank; Stages the job's ranks.
	Stage, Stages int
	// Links to the neighbouring stages (see ConnectTCP, NewMemPipeline).
	Links StageLinks
	// Logger; nil discards.
	Logger hclog.Logger
	// Device overrides the spec's device: a `cuda` build passes
	// NewCUDADevice(d) for the GPU given to the rank when the spec says
	// "cuda" or "auto". Nil: "cpu" and "auto" use the CPU; "cuda" fails
	// with ErrNoDevice.
	Device Device
	// RecvTimeout is the longest wait for one message from a neighbour
	// (default 30 s).
	RecvTimeout time.Duration
	// OnOutput, when set, receives every output micro-batch on the last
	// stage (inference results).
	OnOutput func(step, mb int, m *Message)
	// KeepParams puts the stage's final parameters into Report.Params.
	KeepParams bool
	// SyncMessages keeps an asynchronous device's (AsyncDevice) messages
	// on the stage's goroutine: each output is downloaded, and the loss
	// computed, while the stage waits, as on the CPU. Default false:
	// messages are staged and the endpoint's sender waits for them.
	SyncMessages bool
	// PinnedRecv: on a device that lends receive memory (CUDADevice:
	// page-locked host buffers) with staged messages, the links read every
	// message into it and the upload is queued behind an event, without
	// waiting (the first stage's inputs and the last stage's targets are
	// copied into it and go the same way). Default false: received
	// messages stay in the links' own memory, which a GPU uploads from
	// synchronously. Opt-in until it has run on a GPU (its CPU stand-in
	// is tested; no GPU machine could be had while it was written).
	PinnedRecv bool
	// Trace records every action's span in Report.Trace (StageConfig.Trace).
	Trace bool
}

// Report is one stage's result, JSON-serialisable for job status.
type Report struct {
	JobID      string `json:"job_id"`
	Generation uint64 `json:"generation"`
	Stage      int    `json:"stage"`
	Stages     int    `json:"stages"`
	LayerStart int    `json:"layer_start"`
	LayerEnd   int    `json:"layer_end"`
	// LayerRanges are the weight layers [start, end) of each of the stage\'s
	// chunks (one range unless interleaved).
	LayerRanges  [][2]int `json:"layer_ranges"`
	Mode         string   `json:"mode"`
	Schedule     string   `json:"schedule"`
	Device       string   `json:"device"`
	Steps        int      `json:"steps"`
	MicroBatches int      `json:"micro_batches"`
	BatchSize    int      `json:"batch_size"`
	// Losses per step (last stage, training only).
	Losses    []float64 `json:"losses,omitempty"`
	FinalLoss float64   `json:"final_loss,omitempty"`
	// SamplesPerSec is BatchSize × Steps / WallSeconds.
	SamplesPerSec float64 `json:"samples_per_sec"`
	// Bubble is this stage's idle fraction, 1 − busy/wall.
	Bubble float64 `json:"bubble"`
	StageStats
	// ParamSum and ParamHash identify the stage's final parameters (sum of
	// values; FNV-64a of their bits).
	ParamSum  float64 `json:"param_sum"`
	ParamHash string  `json:"param_hash"`
	// Params are the final parameters when RunConfig.KeepParams is set.
	Params []LayerParams `json:"-"`

	// PinnedRecv: the links received into the device's memory (see
	// RunConfig.PinnedRecv).
	PinnedRecv bool `json:"pinned_recv,omitempty"`
}

// RunJob runs one stage of a pipeline job: the stage's share of the MLP's
// layers (StageLayers), trained with SGD on the schedule (or run forward
// only in inference mode) over the links. Every stage calls it with the same
// spec. It closes the links when done.
func RunJob(ctx context.Context, cfg RunConfig, spec JobSpec) (*Report, error) {
	spec = spec.WithDefaults(cfg.Stages)
	if err := spec.Validate(cfg.Stages); err != nil {
		cfg.Links.Close()
		return nil, err
	}
	if cfg.Stage < 0 || cfg.Stage >= cfg.Stages {
		cfg.Links.Close()
		return nil, fmt.Errorf("%w: stage %d out of range [0, %d)", ErrInvalidSpec, cfg.Stage, cfg.Stages)
	}
	dev := cfg.Device
	if dev == nil {
		if spec.Device == DeviceCUDA {
			cfg.Links.Close()
			return nil, fmt.Errorf("%w: the job asks for device cuda, but this node has no CUDA implementation of the pipeline layers; use device cpu or auto", ErrNoDevice)
		}
		dev = CPU{}
	}
	ranges, err := spec.ChunkLayers(cfg.Stages, spec.Chunks)
	if err != nil {
		cfg.Links.Close()
		return nil, err
	}
	mine := ranges[cfg.Stage]
	train := spec.Mode == ModeTrain
	sched := spec.Schedule
	if !train {
		sched = ScheduleInference
	}
	parts := make([]*mlpStage, len(mine))
	for c, lr := range mine {
		part := c*cfg.Stages + cfg.Stage
		m, err := newMLPStage(dev, spec.model(), lr[0], lr[1], part == 0, part == cfg.Stages*spec.Chunks-1, spec.MicroBatches, train)
		if err != nil {
			for _, p := range parts[:c] {
				p.Close()
			}
			cfg.Links.Close()
			return nil, err
		}
		m.onOutput = cfg.OnOutput
		m.steps = spec.Steps // prefetch the next step's batch
		if ad, ok := dev.(AsyncDevice); ok && !cfg.SyncMessages {
			m.async = ad
		}
		parts[c] = m
	}
	m := &mlpChunks{parts: parts}
	defer m.Close()
	pinned := false
	if pr, ok := dev.(pinnedRecv); ok && parts[0].async != nil && cfg.PinnedRecv {
		mem := pr.recvMemory()
		for _, l := range []Link{cfg.Links.Prev, cfg.Links.Next, cfg.Links.Ring} {
			if u, ok := l.(recvMemoryUser); ok {
				u.useRecvBuffers(mem)
				pinned = true
			}
		}
		for _, p := range parts {
			p.recvMem = mem // inputs and targets go the same way
		}
	}
	sc := StageConfig{
		JobID: cfg.JobID, Generation: cfg.Generation, Stage: cfg.Stage, Stages: cfg.Stages,
		Schedule: sched, Chunks: spec.Chunks, MicroBatches: spec.MicroBatches, Steps: spec.Steps,
		Links: cfg.Links, InFlight: spec.InFlight, RecvTimeout: cfg.RecvTimeout, Logger: cfg.Logger, Trace: cfg.Trace,
	}
	if sc.RecvTimeout == 0 {
		sc.RecvTimeout = DefaultStageConfig().RecvTimeout
	}
	var model StageModel = m
	if spec.Chunks == 1 {
		model = parts[0]
	}
	stats, err := RunStage(ctx, sc, model)
	if err != nil {
		return nil, err
	}
	rep := &Report{
		JobID: cfg.JobID, Generation: cfg.Generation, Stage: cfg.Stage, Stages: cfg.Stages,
		LayerStart: mine[0][0], LayerEnd: mine[len(mine)-1][1], LayerRanges: mine, Mode: spec.Mode, Schedule: sched, Device: dev.Name(), PinnedRecv: pinned,
		Steps: spec.Steps, MicroBatches: spec.MicroBatches, BatchSize: spec.BatchSize,
		StageStats: stats,
	}
	rep.Losses = stats.Losses
	if n := len(rep.Losses); n > 0 {
		rep.FinalLoss = rep.Losses[n-1]
	}
	if stats.WallSeconds > 0 {
		rep.SamplesPerSec = float64(spec.BatchSize*spec.Steps) / stats.WallSeconds
		rep.Bubble = 1 - stats.BusySeconds/stats.WallSeconds
	}
	params, err := m.Params()
	if err != nil {
		return nil, err
	}
	rep.ParamSum, rep.ParamHash = paramDigest(params)
	if cfg.KeepParams {
		rep.Params = params
	}
	return rep, nil
}

func paramDigest(ps []LayerParams) (float64, string) {
	h := fnv.New64a()
	var sum float64
	var b [4]byte
	for _, p := range ps {
		for _, vs := range [][]float32{p.W, p.B} {
			for _, v := range vs {
				sum += float64(v)
				binary.LittleEndian.PutUint32(b[:], math.Float32bits(v))
				h.Write(b[:])
			}
		}
	}
	return sum, fmt.Sprintf("%016x", h.Sum64())
}

// Reference is a single-process run of a pipeline job's model: the whole
// batch as one micro-batch through all layers, for checking a pipeline run.
type Reference struct {
	Losses []float64
	Params []LayerParams
	// Outputs per step (BatchSize × output width), inference mode.
	Outputs [][]float32
}

// mlpChunks is a stage holding several parts of the MLP (interleaved).
type mlpChunks struct {
	parts []*mlpStage
}

var _ ChunkedModel = (*mlpChunks)(nil)

func (m *mlpChunks) Chunk(c int) StageModel { return m.parts[c] }

// busyDevice: the parts share one device.
func (m *mlpChunks) busyDevice() AsyncDevice { return m.parts[0].async }

func (m *mlpChunks) Forward(step, mb int, in *Message) (*Message, error) {
	return m.parts[0].Forward(step, mb, in)
}

func (m *mlpChunks) Backward(step, mb int, g *Message) (*Message, error) {
	return m.parts[0].Backward(step, mb, g)
}

// EndStep applies SGD to every part; the loss comes from the model's last
// part, wherever it is.
func (m *mlpChunks) EndStep(step int) (float64, error) {
	var loss float64
	for _, p := range m.parts {
		l, err := p.EndStep(step)
		if err != nil {
			return 0, err
		}
		loss += l
	}
	return loss, nil
}

// Params returns every part's parameters, in the order of the parts.
func (m *mlpChunks) Params() ([]LayerParams, error) {
	var out []LayerParams
	for _, p := range m.parts {
		ps, err := p.Params()
		if err != nil {
			return nil, err
		}
		out = append(out, ps...)
	}
	return out, nil
}

// Close releases every part.
func (m *mlpChunks) Close() {
	for _, p := range m.parts {
		p.Close()
	}
}

// RunReference trains (or, in inference mode, runs forward) the spec's
// model in one process on dev (nil: CPU).
func RunReference(spec JobSpec, dev Device) (*Reference, error) {
	spec = spec.WithDefaults(1)
	if err := spec.Validate(1); err != nil {
		return nil, err
	}
	if dev == nil {
		dev = CPU{}
	}
	train := spec.Mode == ModeTrain
	m, err := newMLPStage(dev, spec.model(), 0, spec.model().NumLayers(), true, true, 1, train)
	if err != nil {
		return nil, err
	}
	defer m.Close()
	ref := &Reference{}
	for step := 0; step < spec.Steps; step++ {
		out, err := m.Forward(step, 0, nil)
		if err != nil {
			return nil, err
		}
		if !train {
			ref.Outputs = append(ref.Outputs, out.Data)
			continue
		}
		if _, err := m.Backward(step, 0, nil); err != nil {
			return nil, err
		}
		loss, err := m.EndStep(step)
		if err != nil {
			return nil, err
		}
		ref.Losses = append(ref.Losses, loss)
	}
	if ref.Params, err = m.Params(); err != nil {
		return nil, err
	}
	return ref, nil
}
