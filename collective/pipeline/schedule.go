package pipeline

import (
	"fmt"
	"strings"
)

// Op is one step of a stage's schedule.
type Op uint8

// The operations of a schedule. Sends only enqueue (the runtime's send
// queues are asynchronous and bounded); receives block until the message is
// there.
const (
	// OpForward runs the stage's layers forward on a micro-batch.
	OpForward Op = iota + 1
	// OpBackward runs them backward, accumulating weight gradients.
	OpBackward
	// OpSendAct sends the micro-batch's output activation to the next stage.
	OpSendAct
	// OpRecvAct receives the micro-batch's input activation from the
	// previous stage.
	OpRecvAct
	// OpSendGrad sends the gradient of the stage's input to the previous
	// stage.
	OpSendGrad
	// OpRecvGrad receives the gradient of the stage's output from the next
	// stage.
	OpRecvGrad
)

var opNames = map[Op]string{
	OpForward: "F", OpBackward: "B", OpSendAct: "SendAct", OpRecvAct: "RecvAct", OpSendGrad: "SendGrad", OpRecvGrad: "RecvGrad",
}

func (o Op) String() string {
	if s, ok := opNames[o]; ok {
		return s
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// IsCompute reports whether o is a forward or backward pass.
func (o Op) IsCompute() bool { return o == OpForward || o == OpBackward }

// Action is an operation on one micro-batch.
type Action struct {
	Op         Op
	MicroBatch int
	// Chunk is the model chunk (virtual stage) of an interleaved schedule:
	// stage s holds chunks s, s+p, s+2p, ... of the model; 0 otherwise.
	Chunk int
}

func (a Action) String() string {
	if a.Chunk != 0 {
		return fmt.Sprintf("%s%d.%d", a.Op, a.MicroBatch, a.Chunk)
	}
	return fmt.Sprintf("%s%d", a.Op, a.MicroBatch)
}

// Schedule names.
const (
	// ScheduleGPipe runs every micro-batch forward, then every one backward
	// (Huang et al., 2019). Activations of all m micro-batches are live at
	// once.
	ScheduleGPipe = "gpipe"
	// Schedule1F1B warms up with p−s−1 forwards on stage s, then alternates
	// one forward and one backward, then cools down with the remaining
	// backwards (PipeDream-Flush, Narayanan et al., 2021; Megatron-LM's
	// non-interleaved schedule). Same bubble as GPipe, but at most p−s
	// micro-batches' activations are live on stage s.
	Schedule1F1B = "1f1b"
	// ScheduleInference runs forwards only.
	ScheduleInference = "inference"
	// ScheduleInterleaved is interleaved 1F1B (InterleavedStageActions).
	ScheduleInterleaved = "interleaved"
)

var (
	// ErrBadSchedule means a schedule was asked for with invalid arguments.
	ErrBadSchedule = fmt.Errorf("invalid pipeline schedule")
)

// StageActions returns the actions of one stage (0 ≤ stage < stages) for
// the named schedule over microbatches micro-batches. It is a pure function.
func StageActions(schedule string, stages, microbatches, stage int) ([]Action, error) {
	switch {
	case stages < 1:
		return nil, fmt.Errorf("%w: stages must be >= 1, got %d", ErrBadSchedule, stages)
	case microbatches < 1:
		return nil, fmt.Errorf("%w: micro-batches must be >= 1, got %d", ErrBadSchedule, microbatches)
	case stage < 0 || stage >= stages:
		return nil, fmt.Errorf("%w: stage %d out of range [0, %d)", ErrBadSchedule, stage, stages)
	}
	first, last := stage == 0, stage == stages-1
	var out []Action
	fwd := func(mb int) {
		if !first {
			out = append(out, Action{Op: OpRecvAct, MicroBatch: mb})
		}
		out = append(out, Action{Op: OpForward, MicroBatch: mb})
		if !last {
			out = append(out, Action{Op: OpSendAct, MicroBatch: mb})
		}
	}
	bwd := func(mb int) {
		if !last {
			out = append(out, Action{Op: OpRecvGrad, MicroBatch: mb})
		}
		out = append(out, Action{Op: OpBackward, MicroBatch: mb})
		if !first {
			out = append(out, Action{Op: OpSendGrad, MicroBatch: mb})
		}
	}
	switch strings.ToLower(schedule) {
	case ScheduleGPipe:
		for mb := 0; mb < microbatches; mb++ {
			fwd(mb)
		}
		for mb := 0; mb < microbatches; mb++ {
			bwd(mb)
		}
	case Schedule1F1B, "":
		warm := min(stages-stage-1, microbatches)
		for mb := 0; mb < warm; mb++ {
			fwd(mb)
		}
		for i := 0; i < microbatches-warm; i++ {
			fwd(warm + i)
			bwd(i)
		}
		for mb := microbatches - warm; mb < microbatches; mb++ {
			bwd(mb)
		}
	case ScheduleInference:
		for mb := 0; mb < microbatches; mb++ {
			fwd(mb)
		}
	default:
		return nil, fmt.Errorf("%w: unknown schedule %q; use %q, %q or %q", ErrBadSchedule, schedule, ScheduleGPipe, Schedule1F1B, ScheduleInference)
	}
	return out, nil
}

// AllStageActions returns StageActions for every stage.
func AllStageActions(schedule string, stages, microbatches int) ([][]Action, error) {
	out := make([][]Action, stages)
	for s := range out {
		a, err := StageActions(schedule, stages, microbatches, s)
		if err != nil {
			return nil, err
		}
		out[s] = a
	}
	return out, nil
}

// InterleavedStageActions returns stage's actions for the interleaved 1F1B
// schedule (Narayanan et al., 2021; Megatron-LM's virtual pipeline): each of
// the p stages holds v model chunks (stage s holds chunks s, s+p, ...,
// local chunk c being global chunk c·p+s), micro-batches go through the
// stages v times, and the bubble shrinks to (p−1)/(v·m+p−1). The last stage
// sends chunk c's output to the first stage's chunk c+1 (and gradients back
// the same way), so the stages form a ring. micro-batches must be a
// multiple of stages, as in Megatron-LM. With v = 1 it is Schedule1F1B.
//
// RunStage runs it with StageConfig.Chunks and a Ring link.
func InterleavedStageActions(stages, microbatches, chunks, stage int) ([]Action, error) {
	p, m, v, s := stages, microbatches, chunks, stage
	switch {
	case p < 1 || m < 1 || v < 1:
		return nil, fmt.Errorf("%w: stages, micro-batches and chunks must be >= 1, got %d, %d, %d", ErrBadSchedule, p, m, v)
	case s < 0 || s >= p:
		return nil, fmt.Errorf("%w: stage %d out of range [0, %d)", ErrBadSchedule, s, p)
	case m%p != 0:
		return nil, fmt.Errorf("%w: interleaved schedule needs micro-batches (%d) to be a multiple of stages (%d)", ErrBadSchedule, m, p)
	}
	if v == 1 {
		return StageActions(Schedule1F1B, p, m, s)
	}
	total := m * v
	// Virtual step k: micro-batch group k/(p·v), chunk (k/p) mod v.
	mbOf := func(k int) int { return (k/(p*v))*p + k%p }
	fwdChunk := func(k int) int { return (k / p) % v }
	bwdChunk := func(k int) int { return v - 1 - (k/p)%v }
	firstChunk := func(c int) bool { return s == 0 && c == 0 }
	lastChunk := func(c int) bool { return s == p-1 && c == v-1 }
	var out []Action
	fwd := func(k int) {
		mb, c := mbOf(k), fwdChunk(k)
		if !firstChunk(c) {
			out = append(out, Action{Op: OpRecvAct, MicroBatch: mb, Chunk: c})
		}
		out = append(out, Action{Op: OpForward, MicroBatch: mb, Chunk: c})
		if !lastChunk(c) {
			out = append(out, Action{Op: OpSendAct, MicroBatch: mb, Chunk: c})
		}
	}
	bwd := func(k int) {
		mb, c := mbOf(k), bwdChunk(k)
		if !lastChunk(c) {
			out = append(out, Action{Op: OpRecvGrad, MicroBatch: mb, Chunk: c})
		}
		out = append(out, Action{Op: OpBackward, MicroBatch: mb, Chunk: c})
		if !firstChunk(c) {
			out = append(out, Action{Op: OpSendGrad, MicroBatch: mb, Chunk: c})
		}
	}
	warm := min((p-s-1)*2+(v-1)*p, total)
	for k := 0; k < warm; k++ {
		fwd(k)
	}
	for i := 0; i < total-warm; i++ {
		fwd(warm + i)
		bwd(i)
	}
	for k := total - warm; k < total; k++ {
		bwd(k)
	}
	return out, nil
}

// InterleavedBubble is the idle fraction (p−1)/(v·m+p−1) of the
// interleaved schedule with v chunks per stage.
func InterleavedBubble(stages, microbatches, chunks int) float64 {
	return float64(stages-1) / float64(chunks*microbatches+stages-1)
}

// TheoreticalBubble is the idle fraction (p−1)/(m+p−1) of GPipe and 1F1B
// with p stages and m micro-batches of equal cost.
func TheoreticalBubble(stages, microbatches int) float64 {
	return float64(stages-1) / float64(microbatches+stages-1)
}
