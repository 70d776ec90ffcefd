package pipeline

import (
	"fmt"
	"math"
	"strings"
)

// SimOptions are the rules a schedule is simulated under.
type SimOptions struct {
	// SendBuffer is how many messages each direction of each link holds
	// before a send blocks (the runtime's in-flight bound); at least 1.
	SendBuffer int
	// ForwardTime and BackwardTime are the compute times of one micro-batch
	// on one stage (any unit), for one chunk of an interleaved schedule.
	// Zero values mean 1 and 2.
	ForwardTime, BackwardTime float64
	// TransferTime is the time from a send to the message being receivable.
	TransferTime float64
}

// SimResult is what a simulation measured.
type SimResult struct {
	// Makespan is when the last stage finished.
	Makespan float64
	// Busy is each stage's total compute time.
	Busy []float64
	// Bubble is the idle fraction: 1 − Σ busy / (stages × makespan).
	Bubble float64
	// MaxLive is, per stage, the most micro-batches whose forward ran and
	// whose backward had not yet (activations held for backward).
	MaxLive []int
}

// ErrDeadlock is returned by Simulate when no stage can make progress.
var ErrDeadlock = fmt.Errorf("pipeline schedule deadlocks")

// Simulate executes every stage's action list at once with blocking
// receives and sends bounded by opts.SendBuffer, as the runtime does, and
// returns timings. It fails with ErrDeadlock (naming the stuck actions) if
// the stages wait on each other forever, and with an error if a receive
// would get another micro-batch than it expects.
func Simulate(sched [][]Action, opts SimOptions) (SimResult, error) {
	p := len(sched)
	if opts.SendBuffer < 1 {
		return SimResult{}, fmt.Errorf("%w: send buffer must be >= 1, got %d", ErrBadSchedule, opts.SendBuffer)
	}
	tf, tb := opts.ForwardTime, opts.BackwardTime
	if tf == 0 {
		tf = 1
	}
	if tb == 0 {
		tb = 2
	}
	type msg struct {
		mb, chunk int
		ready     float64
	}
	// queues[s][0]: activations from s to s+1; queues[s][1]: gradients from
	// s+1 to s. Link p−1 joins the last stage to the first (interleaved
	// schedules send chunk c's output of the last stage to chunk c+1 of the
	// first).
	type queue struct {
		msgs     []msg
		sent     int
		recvTime []float64 // time of the i-th receive
	}
	queues := make([][2]queue, p)
	ring := func(l int) int { return (l + p) % p }
	pc := make([]int, p)
	clock := make([]float64, p)
	res := SimResult{Busy: make([]float64, p), MaxLive: make([]int, p)}
	live := make([]int, p)
	for {
		progress := false
		done := true
		for s := 0; s < p; s++ {
			for pc[s] < len(sched[s]) {
				a := sched[s][pc[s]]
				var q *queue
				switch a.Op {
				case OpSendAct, OpRecvAct:
					link := s
					if a.Op == OpRecvAct {
						link = s - 1
					}
					if link < 0 && a.Chunk == 0 {
						return res, fmt.Errorf("stage %d: %v: the first chunk has no previous stage", s, a)
					}
					q = &queues[ring(link)][0]
				case OpSendGrad, OpRecvGrad:
					link := s - 1
					if a.Op == OpRecvGrad {
						link = s
					}
					if link < 0 && a.Chunk == 0 {
						return res, fmt.Errorf("stage %d: %v: the first chunk has no previous stage", s, a)
					}
					q = &queues[ring(link)][1]
				}
				blocked := false
				switch a.Op {
				case OpForward:
					clock[s] += tf
					res.Busy[s] += tf
					live[s]++
					res.MaxLive[s] = max(res.MaxLive[s], live[s])
				case OpBackward:
					clock[s] += tb
					res.Busy[s] += tb
					live[s]--
				case OpSendAct, OpSendGrad:
					// The i-th send needs the (i−K)-th message received.
					i := q.sent
					k := opts.SendBuffer
					if i-k >= 0 && len(q.recvTime) <= i-k {
						blocked = true
						break
					}
					if i-k >= 0 {
						clock[s] = math.Max(clock[s], q.recvTime[i-k])
					}
					// A message for the next chunk: what the receiver expects.
					next := a.Chunk
					if a.Op == OpSendAct && s == p-1 {
						next++
					}
					if a.Op == OpSendGrad && s == 0 {
						next--
					}
					q.msgs = append(q.msgs, msg{mb: a.MicroBatch, chunk: next, ready: clock[s] + opts.TransferTime})
					q.sent++
				case OpRecvAct, OpRecvGrad:
					if len(q.msgs) == 0 {
						blocked = true
						break
					}
					m := q.msgs[0]
					if m.mb != a.MicroBatch || m.chunk != a.Chunk {
						return res, fmt.Errorf("stage %d: %v would receive micro-batch %d chunk %d", s, a, m.mb, m.chunk)
					}
					q.msgs = q.msgs[1:]
					clock[s] = math.Max(clock[s], m.ready)
					q.recvTime = append(q.recvTime, clock[s])
				default:
					return res, fmt.Errorf("stage %d: unknown action %v", s, a)
				}
				if blocked {
					break
				}
				pc[s]++
				progress = true
			}
			if pc[s] < len(sched[s]) {
				done = false
			}
		}
		if done {
			break
		}
		if !progress {
			var stuck []string
			for s := 0; s < p; s++ {
				if pc[s] < len(sched[s]) {
					stuck = append(stuck, fmt.Sprintf("stage %d at %v", s, sched[s][pc[s]]))
				}
			}
			return res, fmt.Errorf("%w: %s", ErrDeadlock, strings.Join(stuck, ", "))
		}
	}
	// Every message sent must have been received.
	for l := range queues {
		for d, q := range queues[l] {
			if len(q.msgs) > 0 {
				return res, fmt.Errorf("%d message(s) from stage %d (%s) were never received, first micro-batch %d chunk %d", len(q.msgs), []int{l, ring(l + 1)}[d], []string{"activation", "gradient"}[d], q.msgs[0].mb, q.msgs[0].chunk)
			}
		}
	}
	var busy float64
	for s := 0; s < p; s++ {
		res.Makespan = math.Max(res.Makespan, clock[s])
		busy += res.Busy[s]
	}
	if res.Makespan > 0 {
		res.Bubble = 1 - busy/(float64(p)*res.Makespan)
	}
	return res, nil
}
