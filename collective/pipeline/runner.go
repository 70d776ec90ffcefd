package pipeline

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
)

// ErrInvalidSpec means a pipeline job or stage configuration is malformed.
var ErrInvalidSpec = errors.New("invalid pipeline spec")

// StageModel is the compute of one stage, driven by RunStage in the order
// of the schedule. It is called from one goroutine.
type StageModel interface {
	// Forward runs micro-batch mb of step forward. in is the activation
	// received from the previous stage (nil on the first stage); its Data
	// is reused once Forward returns, so copy what must be kept. It returns
	// the stage's output activation (sent to the next stage; on the last
	// stage it is not sent).
	Forward(step, mb int, in *Message) (*Message, error)
	// Backward runs micro-batch mb backward. grad is the gradient of the
	// stage's output received from the next stage (nil on the last stage,
	// which computes it from the loss; its Data is reused once Backward
	// returns). It returns the gradient of the
	// stage's input (sent to the previous stage; nil on the first stage).
	Backward(step, mb int, grad *Message) (*Message, error)
	// EndStep is called once the step's actions are done (apply the
	// optimizer); it returns the step's loss where the stage knows it.
	EndStep(step int) (float64, error)
}

// ChunkedModel is the model of a stage that holds several chunks of the
// model (interleaved schedules): Chunk(c) is the c-th, which RunStage
// drives with Forward and Backward; EndStep is called on the ChunkedModel
// itself.
type ChunkedModel interface {
	StageModel
	Chunk(c int) StageModel
}

// StageConfig is what RunStage needs besides the model.
type StageConfig struct {
	// JobID and Generation tag every transfer.
	JobID      string
	Generation uint64
	// Stage is this stage's index in [0, Stages).
	Stage, Stages int
	// Schedule is Schedule1F1B (default), ScheduleGPipe, ScheduleInference
	// or ScheduleInterleaved (with Chunks > 1).
	Schedule string
	// Chunks is the model chunks per stage of ScheduleInterleaved (the
	// model must be a ChunkedModel, and the first and last stages need a
	// Ring link); 1 otherwise.
	Chunks       int
	MicroBatches int
	Steps        int
	// Links connect the stage to its neighbours.
	Links StageLinks
	// InFlight bounds the messages waiting in each send and receive queue
	// (back-pressure beyond it). Default 2.
	InFlight int
	// RecvTimeout is the longest a stage waits for one message before
	// failing with ErrTimeout; 0 disables it. Default 30 s.
	RecvTimeout time.Duration
	// FinishTimeout bounds the wait for the neighbours' finish messages
	// at the end (see DirFinish). Default 2 s.
	FinishTimeout time.Duration
	// Logger receives progress and errors; nil discards.
	Logger hclog.Logger
	// Trace records every action's host start and end in
	// StageStats.Trace (for finding where a pipeline's time goes).
	Trace bool
}

// ActionSpan is one traced action: when the stage's goroutine started and
// ended it, in microseconds from the stage's start.
type ActionSpan struct {
	Step       int     `json:"step"`
	Op         string  `json:"op"`
	MicroBatch int     `json:"mb"`
	Chunk      int     `json:"chunk,omitempty"`
	StartUS    float64 `json:"start_us"`
	EndUS      float64 `json:"end_us"`
}

// DefaultStageConfig returns the defaults of the optional fields.
func DefaultStageConfig() StageConfig {
	return StageConfig{Schedule: Schedule1F1B, InFlight: 2, RecvTimeout: 30 * time.Second, FinishTimeout: 2 * time.Second}
}

// Validate checks the config.
func (c *StageConfig) Validate() error {
	switch {
	case c.Stages < 1:
		return fmt.Errorf("%w: stages must be >= 1, got %d", ErrInvalidSpec, c.Stages)
	case c.Stage < 0 || c.Stage >= c.Stages:
		return fmt.Errorf("%w: stage %d out of range [0, %d)", ErrInvalidSpec, c.Stage, c.Stages)
	case c.MicroBatches < 1:
		return fmt.Errorf("%w: micro-batches must be >= 1, got %d", ErrInvalidSpec, c.MicroBatches)
	case c.Steps < 1:
		return fmt.Errorf("%w: steps must be >= 1, got %d", ErrInvalidSpec, c.Steps)
	case c.InFlight < 1:
		return fmt.Errorf("%w: in-flight bound must be >= 1, got %d", ErrInvalidSpec, c.InFlight)
	case c.FinishTimeout < 0:
		return fmt.Errorf("%w: finish timeout must be >= 0, got %v", ErrInvalidSpec, c.FinishTimeout)
	case c.RecvTimeout < 0:
		return fmt.Errorf("%w: receive timeout must be >= 0, got %v", ErrInvalidSpec, c.RecvTimeout)
	case c.Stage > 0 && c.Links.Prev == nil:
		return fmt.Errorf("%w: stage %d has no link to the previous stage", ErrInvalidSpec, c.Stage)
	case c.Stage < c.Stages-1 && c.Links.Next == nil:
		return fmt.Errorf("%w: stage %d has no link to the next stage", ErrInvalidSpec, c.Stage)
	}
	if c.Schedule == ScheduleInterleaved {
		if c.Chunks < 2 {
			return fmt.Errorf("%w: the interleaved schedule needs chunks >= 2, got %d", ErrInvalidSpec, c.Chunks)
		}
		if c.Stages < 2 {
			return fmt.Errorf("%w: the interleaved schedule needs at least 2 stages", ErrInvalidSpec)
		}
		if (c.Stage == 0 || c.Stage == c.Stages-1) && c.Links.Ring == nil {
			return fmt.Errorf("%w: stage %d of an interleaved schedule has no ring link (between the last and the first stage)", ErrInvalidSpec, c.Stage)
		}
	} else if c.Chunks > 1 {
		return fmt.Errorf("%w: %d chunks per stage need the %q schedule, got %q", ErrInvalidSpec, c.Chunks, ScheduleInterleaved, c.Schedule)
	}
	if _, err := c.actions(); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidSpec, err)
	}
	return nil
}

func (c *StageConfig) actions() ([]Action, error) {
	if c.Schedule == ScheduleInterleaved {
		return InterleavedStageActions(c.Stages, c.MicroBatches, c.Chunks, c.Stage)
	}
	return StageActions(c.Schedule, c.Stages, c.MicroBatches, c.Stage)
}

// StageStats is what one stage measured.
type StageStats struct {
	// Losses per step, where the model reports them (the last stage).
	Losses []float64 `json:"losses,omitempty"`
	// WallSeconds is the time from the start of the first step to the end
	// of the last.
	WallSeconds float64 `json:"wall_seconds"`
	// BusySeconds is the time spent in Forward and Backward: on the host,
	// or, for a model on an AsyncDevice (whose calls return before the
	// work is done), the device's time on that work.
	BusySeconds float64 `json:"busy_seconds"`
	// HostBusySeconds is the host's time in Forward and Backward (equal
	// to BusySeconds unless the device is asynchronous).
	HostBusySeconds float64 `json:"host_busy_seconds"`
	// BusyOnDevice says BusySeconds is the device's time.
	BusyOnDevice bool `json:"busy_on_device,omitempty"`
	// RecvWaitSeconds and SendWaitSeconds are the time blocked waiting for
	// a message and for room in a send queue.
	RecvWaitSeconds float64 `json:"recv_wait_seconds"`
	SendWaitSeconds float64 `json:"send_wait_seconds"`
	// BytesSent and BytesReceived count tensor payload bytes.
	BytesSent     int64 `json:"bytes_sent"`
	BytesReceived int64 `json:"bytes_received"`
	// Trace is every action's span when StageConfig.Trace is set.
	Trace []ActionSpan `json:"trace,omitempty"`
	// Start and End are when the stage started and finished (for bubble
	// measurement across stages).
	Start time.Time `json:"-"`
	End   time.Time `json:"-"`
}

// RunStage runs the stage's schedule for cfg.Steps steps over its links.
// Sends are asynchronous (bounded by cfg.InFlight); the receive side reads
// ahead so a message for a later action is already there when the action
// starts. On error the stage's links are closed, so its neighbours fail
// too instead of waiting. RunStage closes the links when it returns.
func RunStage(ctx context.Context, cfg StageConfig, model StageModel) (StageStats, error) {
	d := DefaultStageConfig()
	if cfg.Schedule == "" {
		cfg.Schedule = d.Schedule
	}
	if cfg.InFlight == 0 {
		cfg.InFlight = d.InFlight
	}
	if cfg.Chunks == 0 {
		cfg.Chunks = 1
	}
	if cfg.FinishTimeout == 0 {
		cfg.FinishTimeout = d.FinishTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	var stats StageStats
	if err := cfg.Validate(); err != nil {
		cfg.Links.Close()
		return stats, err
	}
	actions, _ := cfg.actions()
	log := cfg.Logger.Named("pipeline").With("job", cfg.JobID, "generation", cfg.Generation, "stage", cfg.Stage)
	chunked, _ := model.(ChunkedModel)
	if cfg.Chunks > 1 && chunked == nil {
		cfg.Links.Close()
		return stats, fmt.Errorf("%w: %d chunks per stage need a model with chunks (ChunkedModel), got %T", ErrInvalidSpec, cfg.Chunks, model)
	}
	part := func(c int) StageModel {
		if cfg.Chunks > 1 {
			return chunked.Chunk(c)
		}
		return model
	}

	var prev, next, ring *endpoint
	stageFail := newFailure()
	if cfg.Links.Prev != nil {
		prev = newStageEndpoint(fmt.Sprintf("stage %d", cfg.Stage-1), cfg.Links.Prev, cfg.InFlight, cfg.RecvTimeout, cfg.JobID, cfg.Generation, stageFail)
		defer prev.close()
	}
	if cfg.Links.Next != nil {
		next = newStageEndpoint(fmt.Sprintf("stage %d", cfg.Stage+1), cfg.Links.Next, cfg.InFlight, cfg.RecvTimeout, cfg.JobID, cfg.Generation, stageFail)
		defer next.close()
	}
	if cfg.Chunks > 1 && cfg.Links.Ring != nil {
		other := cfg.Stages - 1
		if cfg.Stage == cfg.Stages-1 {
			other = 0
		}
		ring = newStageEndpoint(fmt.Sprintf("stage %d (ring)", other), cfg.Links.Ring, cfg.InFlight, cfg.RecvTimeout, cfg.JobID, cfg.Generation, stageFail)
		defer ring.close()
	} else if cfg.Links.Ring != nil {
		defer cfg.Links.Ring.Close() // not used by this schedule
	}
	first, last := cfg.Stage == 0, cfg.Stage == cfg.Stages-1
	// Where each transfer goes: interleaved schedules wrap from the last
	// stage to the first (chunk c to chunk c+1) on the ring link.
	actFrom := func(chunk int) *endpoint {
		if first && chunk > 0 {
			return ring
		}
		return prev
	}
	actTo := func(chunk int) (*endpoint, int) {
		if last && chunk < cfg.Chunks-1 {
			return ring, chunk + 1
		}
		return next, chunk
	}
	gradFrom := func(chunk int) *endpoint {
		if last && chunk < cfg.Chunks-1 {
			return ring
		}
		return next
	}
	gradTo := func(chunk int) (*endpoint, int) {
		if first && chunk > 0 {
			return ring, chunk - 1
		}
		return prev, chunk
	}
	tag := func(step, mb, chunk int, dir Direction) Tag {
		return Tag{JobID: cfg.JobID, Generation: cfg.Generation, Step: step, MicroBatch: mb, Chunk: chunk, Dir: dir}
	}

	// an asynchronous device's time is the stage's busy time
	var timer AsyncDevice
	if bd, ok := model.(interface{ busyDevice() AsyncDevice }); ok {
		timer = bd.busyDevice()
	}
	// with Trace, a device that can say when it ran each span adds them
	// to the trace ("device forward" and "device backward")
	var devTrace spanTracer
	var devLabels []ActionSpan
	if st, ok := timer.(spanTracer); ok && cfg.Trace {
		devTrace = st
		st.traceSpans(true)
		defer st.traceSpans(false)
	}
	compute := func(f func() error) error {
		t0 := time.Now()
		if timer != nil {
			if err := timer.BeginBusy(); err != nil {
				return err
			}
		}
		err := f()
		if timer != nil && err == nil {
			err = timer.EndBusy()
		}
		stats.HostBusySeconds += time.Since(t0).Seconds()
		return err
	}

	stats.Start = time.Now()
	type key [2]int // micro-batch, chunk
	inAct := map[key]*Message{}
	outAct := map[key]*Message{}
	inGrad := map[key]*Message{}
	outGrad := map[key]*Message{}
	run := func(step int, a Action) error {
		k := key{a.MicroBatch, a.Chunk}
		switch a.Op {
		case OpRecvAct:
			t0 := time.Now()
			m, err := actFrom(a.Chunk).Expect(ctx, tag(step, a.MicroBatch, a.Chunk, DirActivation))
			stats.RecvWaitSeconds += time.Since(t0).Seconds()
			if err != nil {
				return err
			}
			inAct[k] = m
		case OpForward:
			if devTrace != nil {
				devLabels = append(devLabels, ActionSpan{Step: step, Op: "device " + a.Op.String(), MicroBatch: a.MicroBatch, Chunk: a.Chunk})
			}
			in := inAct[k]
			var out *Message
			err := compute(func() (err error) {
				out, err = part(a.Chunk).Forward(step, a.MicroBatch, in)
				return err
			})
			if err != nil {
				return fmt.Errorf("forward of step %d micro-batch %d: %w", step, a.MicroBatch, err)
			}
			delete(inAct, k)
			if in != nil {
				in.Release()
			}
			if out != nil && !(last && a.Chunk == cfg.Chunks-1) { // the model's end sends nothing
				outAct[k] = out
			}
		case OpSendAct:
			m := outAct[k]
			e, to := actTo(a.Chunk)
			if m == nil || e == nil {
				return fmt.Errorf("stage %d: forward of micro-batch %d chunk %d produced no activation to send, or has no link for it", cfg.Stage, a.MicroBatch, a.Chunk)
			}
			delete(outAct, k)
			m.Tag = tag(step, a.MicroBatch, to, DirActivation)
			t0 := time.Now()
			err := e.Post(ctx, m)
			stats.SendWaitSeconds += time.Since(t0).Seconds()
			return err
		case OpRecvGrad:
			t0 := time.Now()
			m, err := gradFrom(a.Chunk).Expect(ctx, tag(step, a.MicroBatch, a.Chunk, DirGradient))
			stats.RecvWaitSeconds += time.Since(t0).Seconds()
			if err != nil {
				return err
			}
			inGrad[k] = m
		case OpBackward:
			if devTrace != nil {
				devLabels = append(devLabels, ActionSpan{Step: step, Op: "device " + a.Op.String(), MicroBatch: a.MicroBatch, Chunk: a.Chunk})
			}
			in := inGrad[k]
			var g *Message
			err := compute(func() (err error) {
				g, err = part(a.Chunk).Backward(step, a.MicroBatch, in)
				return err
			})
			if err != nil {
				return fmt.Errorf("backward of step %d micro-batch %d: %w", step, a.MicroBatch, err)
			}
			delete(inGrad, k)
			if in != nil {
				in.Release()
			}
			if g != nil && !(first && a.Chunk == 0) {
				outGrad[k] = g
			}
		case OpSendGrad:
			m := outGrad[k]
			e, to := gradTo(a.Chunk)
			if m == nil || e == nil {
				return fmt.Errorf("stage %d: backward of micro-batch %d chunk %d produced no gradient to send, or has no link for it", cfg.Stage, a.MicroBatch, a.Chunk)
			}
			delete(outGrad, k)
			m.Tag = tag(step, a.MicroBatch, to, DirGradient)
			t0 := time.Now()
			err := e.Post(ctx, m)
			stats.SendWaitSeconds += time.Since(t0).Seconds()
			return err
		}
		return nil
	}
	fail := func(err error) (StageStats, error) {
		log.Error("stage failed", "error", err)
		cfg.Links.Abort(fmt.Errorf("pipeline stage %d failed: %w", cfg.Stage, err))
		stats.End = time.Now()
		stats.WallSeconds = stats.End.Sub(stats.Start).Seconds()
		stats.BusySeconds = stats.HostBusySeconds
		return stats, err
	}
	for step := 0; step < cfg.Steps; step++ {
		for _, a := range actions {
			t0 := time.Now()
			if err := run(step, a); err != nil {
				return fail(err)
			}
			if cfg.Trace {
				stats.Trace = append(stats.Trace, ActionSpan{Step: step, Op: a.Op.String(), MicroBatch: a.MicroBatch, Chunk: a.Chunk,
					StartUS: float64(t0.Sub(stats.Start).Nanoseconds()) / 1e3, EndUS: float64(time.Since(stats.Start).Nanoseconds()) / 1e3})
			}
		}
		loss, err := model.EndStep(step)
		if err != nil {
			return fail(fmt.Errorf("end of step %d: %w", step, err))
		}
		if cfg.Stage == cfg.Stages-1 && cfg.Schedule != ScheduleInference {
			stats.Losses = append(stats.Losses, loss)
			log.Debug("step done", "step", step, "loss", loss)
		}
	}
	stats.BusySeconds = stats.HostBusySeconds
	if timer != nil {
		// waits for the stage's device work, so End comes after it
		busy, err := timer.BusySeconds()
		if err != nil {
			return fail(fmt.Errorf("device busy time: %w", err))
		}
		stats.BusySeconds, stats.BusyOnDevice = busy, true
		if devTrace != nil {
			for i, sp := range devTrace.takeSpans() {
				if i < len(devLabels) {
					a := devLabels[i]
					a.StartUS = float64(sp[0].Sub(stats.Start).Nanoseconds()) / 1e3
					a.EndUS = float64(sp[1].Sub(stats.Start).Nanoseconds()) / 1e3
					stats.Trace = append(stats.Trace, a)
				}
			}
		}
	}
	// Finish both links: send ours, then wait for the neighbours'. A
	// neighbour that closed after receiving our finish is not an error:
	// everything this stage had to send and receive is through.
	for _, e := range []*endpoint{prev, next, ring} {
		if e != nil {
			if err := e.sendFinish(ctx); err != nil {
				return fail(err)
			}
		}
	}
	for _, e := range []*endpoint{prev, next, ring} {
		if e != nil && !e.awaitFinish(ctx, cfg.FinishTimeout) {
			log.Debug("neighbour closed without a finish message", "neighbour", e.name)
		}
	}
	stats.End = time.Now()
	stats.WallSeconds = stats.End.Sub(stats.Start).Seconds()
	for _, e := range []*endpoint{prev, next, ring} {
		if e != nil {
			s, r := e.bytes()
			stats.BytesSent += s
			stats.BytesReceived += r
		}
	}
	return stats, nil
}
