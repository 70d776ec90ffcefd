package pipeline

import (
	"errors"
	"math"
	"reflect"
	"testing"
)

// computeOrder is the stage's forwards and backwards only.
func computeOrder(acts []Action) []Action {
	var out []Action
	for _, a := range acts {
		if a.Op.IsCompute() {
			out = append(out, a)
		}
	}
	return out
}

func TestSchedulesEveryShape(t *testing.T) {
	for _, sched := range []string{ScheduleGPipe, Schedule1F1B, ScheduleInference} {
		for p := 1; p <= 8; p++ {
			for m := 1; m <= 32; m++ {
				all, err := AllStageActions(sched, p, m)
				if err != nil {
					t.Fatal(err)
				}
				for s, acts := range all {
					checkStage(t, sched, p, m, s, acts)
				}
				// No deadlock with the tightest send queue, and with a deep one.
				for _, k := range []int{1, 4} {
					res, err := Simulate(all, SimOptions{SendBuffer: k})
					if err != nil {
						t.Fatalf("%s p=%d m=%d buffer=%d: %v", sched, p, m, k, err)
					}
					if sched == ScheduleInference {
						continue
					}
					// Equal-cost micro-batches: the bubble is (p−1)/(m+p−1).
					if want := TheoreticalBubble(p, m); math.Abs(res.Bubble-want) > 1e-9 {
						t.Fatalf("%s p=%d m=%d buffer=%d: bubble %.6f, theory %.6f", sched, p, m, k, res.Bubble, want)
					}
					// Activation memory: GPipe holds all m; 1F1B at most p−s.
					for s, live := range res.MaxLive {
						want := m
						if sched == Schedule1F1B {
							want = min(p-s, m)
						}
						if live != want {
							t.Fatalf("%s p=%d m=%d stage %d: %d live micro-batches, want %d", sched, p, m, s, live, want)
						}
					}
				}
			}
		}
	}
}

// checkStage asserts the published order of a stage's actions.
func checkStage(t *testing.T, sched string, p, m, s int, acts []Action) {
	t.Helper()
	first, last := s == 0, s == p-1
	// Every micro-batch once forward (and once backward when training),
	// each compute surrounded by its receive and send.
	nF, nB := 0, 0
	for i, a := range acts {
		switch a.Op {
		case OpForward:
			if a.MicroBatch != nF {
				t.Fatalf("%s p=%d m=%d s=%d: forward %d out of order (want %d)", sched, p, m, s, a.MicroBatch, nF)
			}
			nF++
			if !first && (i == 0 || acts[i-1] != (Action{Op: OpRecvAct, MicroBatch: a.MicroBatch})) {
				t.Fatalf("%s p=%d m=%d s=%d: %v not preceded by its receive", sched, p, m, s, a)
			}
			if !last && (i+1 >= len(acts) || acts[i+1] != (Action{Op: OpSendAct, MicroBatch: a.MicroBatch})) {
				t.Fatalf("%s p=%d m=%d s=%d: %v not followed by its send", sched, p, m, s, a)
			}
		case OpBackward:
			if a.MicroBatch != nB {
				t.Fatalf("%s p=%d m=%d s=%d: backward %d out of order (want %d)", sched, p, m, s, a.MicroBatch, nB)
			}
			if a.MicroBatch >= nF {
				t.Fatalf("%s p=%d m=%d s=%d: backward %d before its forward", sched, p, m, s, a.MicroBatch)
			}
			nB++
			if !last && (i == 0 || acts[i-1] != (Action{Op: OpRecvGrad, MicroBatch: a.MicroBatch})) {
				t.Fatalf("%s p=%d m=%d s=%d: %v not preceded by its gradient receive", sched, p, m, s, a)
			}
			if !first && (i+1 >= len(acts) || acts[i+1] != (Action{Op: OpSendGrad, MicroBatch: a.MicroBatch})) {
				t.Fatalf("%s p=%d m=%d s=%d: %v not followed by its gradient send", sched, p, m, s, a)
			}
		case OpRecvAct, OpSendGrad:
			if first {
				t.Fatalf("%s: first stage has %v", sched, a)
			}
		case OpSendAct, OpRecvGrad:
			if last {
				t.Fatalf("%s: last stage has %v", sched, a)
			}
		}
	}
	wantB := m
	if sched == ScheduleInference {
		wantB = 0
	}
	if nF != m || nB != wantB {
		t.Fatalf("%s p=%d m=%d s=%d: %d forwards and %d backwards", sched, p, m, s, nF, nB)
	}
	// The shape of the compute order.
	var want []Action
	switch sched {
	case ScheduleGPipe:
		for mb := 0; mb < m; mb++ {
			want = append(want, Action{Op: OpForward, MicroBatch: mb})
		}
		for mb := 0; mb < m; mb++ {
			want = append(want, Action{Op: OpBackward, MicroBatch: mb})
		}
	case Schedule1F1B:
		// Warm-up p−s−1 forwards, then F,B alternating, then the backwards.
		w := min(p-s-1, m)
		for mb := 0; mb < w; mb++ {
			want = append(want, Action{Op: OpForward, MicroBatch: mb})
		}
		for i := 0; i < m-w; i++ {
			want = append(want, Action{Op: OpForward, MicroBatch: w + i}, Action{Op: OpBackward, MicroBatch: i})
		}
		for mb := m - w; mb < m; mb++ {
			want = append(want, Action{Op: OpBackward, MicroBatch: mb})
		}
	case ScheduleInference:
		for mb := 0; mb < m; mb++ {
			want = append(want, Action{Op: OpForward, MicroBatch: mb})
		}
	}
	if got := computeOrder(acts); !reflect.DeepEqual(got, want) {
		t.Fatalf("%s p=%d m=%d s=%d: compute order %v, want %v", sched, p, m, s, got, want)
	}
}

func TestScheduleExample(t *testing.T) {
	// Stage 1 of 4, 1F1B, 4 micro-batches: two warm-up forwards.
	acts, err := StageActions(Schedule1F1B, 4, 4, 1)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, a := range computeOrder(acts) {
		ops = append(ops, a.String())
	}
	if got, want := ops, []string{"F0", "F1", "F2", "B0", "F3", "B1", "B2", "B3"}; !reflect.DeepEqual(got, want) {
		t.Fatalf("got %v, want %v", got, want)
	}
}

func TestScheduleErrors(t *testing.T) {
	for _, tc := range []struct {
		sched       string
		p, m, stage int
	}{
		{"zigzag", 2, 2, 0}, {Schedule1F1B, 0, 2, 0}, {Schedule1F1B, 2, 0, 0}, {Schedule1F1B, 2, 2, 2}, {ScheduleGPipe, 2, 2, -1},
	} {
		if _, err := StageActions(tc.sched, tc.p, tc.m, tc.stage); !errors.Is(err, ErrBadSchedule) {
			t.Errorf("%+v: err = %v, want ErrBadSchedule", tc, err)
		}
	}
}

func TestSimulateCatchesDeadlockAndMismatch(t *testing.T) {
	// Both stages receive first: a deadlock.
	dead := [][]Action{
		{{Op: OpRecvGrad, MicroBatch: 0}, {Op: OpSendAct, MicroBatch: 0}},
		{{Op: OpRecvAct, MicroBatch: 0}, {Op: OpSendGrad, MicroBatch: 0}},
	}
	if _, err := Simulate(dead, SimOptions{SendBuffer: 1}); !errors.Is(err, ErrDeadlock) {
		t.Fatalf("err = %v, want ErrDeadlock", err)
	}
	// A send that needs two slots with one: stage 0 sends twice before
	// stage 1 receives anything, and stage 1 first waits for stage 0's
	// gradient receive.
	tight := [][]Action{
		{{Op: OpSendAct, MicroBatch: 0}, {Op: OpSendAct, MicroBatch: 1}, {Op: OpRecvGrad, MicroBatch: 0}},
		{{Op: OpSendGrad, MicroBatch: 0}, {Op: OpSendGrad, MicroBatch: 1}, {Op: OpRecvAct, MicroBatch: 0}, {Op: OpRecvAct, MicroBatch: 1}},
	}
	if _, err := Simulate(tight, SimOptions{SendBuffer: 1}); !errors.Is(err, ErrDeadlock) {
		t.Fatalf("buffer 1: err = %v, want ErrDeadlock", err)
	}
	swapped := [][]Action{
		{{Op: OpSendAct, MicroBatch: 1}, {Op: OpSendAct, MicroBatch: 0}},
		{{Op: OpRecvAct, MicroBatch: 0}, {Op: OpRecvAct, MicroBatch: 1}},
	}
	if _, err := Simulate(swapped, SimOptions{SendBuffer: 2}); err == nil {
		t.Fatal("out-of-order receive not reported")
	}
}

func TestInterleavedSchedule(t *testing.T) {
	for p := 1; p <= 8; p++ {
		for v := 1; v <= 4; v++ {
			for m := p; m <= 32; m += p {
				all := make([][]Action, p)
				for s := range all {
					acts, err := InterleavedStageActions(p, m, v, s)
					if err != nil {
						t.Fatal(err)
					}
					all[s] = acts
					// Every (micro-batch, chunk) forward once, backward once,
					// backward after forward; forwards in micro-batch order
					// within a chunk.
					fwd := map[[2]int]bool{}
					bwd := map[[2]int]bool{}
					for _, a := range acts {
						k := [2]int{a.MicroBatch, a.Chunk}
						switch a.Op {
						case OpForward:
							if fwd[k] {
								t.Fatalf("p=%d v=%d m=%d s=%d: %v twice", p, v, m, s, a)
							}
							fwd[k] = true
						case OpBackward:
							if !fwd[k] || bwd[k] {
								t.Fatalf("p=%d v=%d m=%d s=%d: %v before its forward or twice", p, v, m, s, a)
							}
							bwd[k] = true
						}
					}
					if len(fwd) != m*v || len(bwd) != m*v {
						t.Fatalf("p=%d v=%d m=%d s=%d: %d forwards and %d backwards, want %d", p, v, m, s, len(fwd), len(bwd), m*v)
					}
				}
				for _, k := range []int{1, 2} {
					res, err := Simulate(all, SimOptions{SendBuffer: k, ForwardTime: 1 / float64(v), BackwardTime: 2 / float64(v)})
					if err != nil {
						t.Fatalf("p=%d v=%d m=%d buffer=%d: %v", p, v, m, k, err)
					}
					if want := InterleavedBubble(p, m, v); math.Abs(res.Bubble-want) > 1e-9 {
						t.Fatalf("p=%d v=%d m=%d buffer=%d: bubble %.6f, theory %.6f", p, v, m, k, res.Bubble, want)
					}
				}
			}
		}
	}
	if _, err := InterleavedStageActions(4, 6, 2, 0); !errors.Is(err, ErrBadSchedule) {
		t.Fatalf("m not a multiple of p: err = %v", err)
	}
}
