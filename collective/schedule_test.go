package collective

import (
	"fmt"
	"testing"
)

// TestPartCoversEverything: the pieces of Part tile [0, count) in order.
func TestPartCoversEverything(t *testing.T) {
	for count := 0; count < 200; count++ {
		for parts := 1; parts <= 17; parts++ {
			next := 0
			for i := 0; i < parts; i++ {
				off, n := Part(count, parts, i)
				if off != next || n < 0 || n > count/parts+1 {
					t.Fatalf("Part(%d,%d,%d) = %d,%d; want offset %d", count, parts, i, off, n, next)
				}
				next = off + n
			}
			if next != count {
				t.Fatalf("Part(%d,%d) covers %d", count, parts, next)
			}
		}
	}
}

// simulateRing runs the ring all-reduce plans of every rank in lock step on
// symbolic data: each element holds the ordered list of ranks whose inputs
// it has summed. It checks that every element ends with every rank exactly
// once on every rank, that the order of the sum is the same on every rank
// (fixed reduction order), that a chunk is never sent before the receive it
// depends on, and that each rank sends exactly its share.
func simulateRing(t *testing.T, n, count, channels, chunk int) {
	plan := ChunkPlan{Count: count, Ranks: n, Channels: channels, ChunkElems: chunk}
	type elem []int8
	data := make([][]elem, n)
	for r := range data {
		data[r] = make([]elem, count)
		for i := range data[r] {
			data[r][i] = elem{int8(r)}
		}
	}
	plans := make([][]chanPlan, n)
	for r := range plans {
		plans[r] = ringPlans(plan, r, 0, RingAllReduceSteps(n), false)
	}
	sent := make([]int, n)
	for ch := 0; ch < channels; ch++ {
		// Process sends in order; a send may go once its dependency has been
		// received. A receive consumes the matching send of the left rank.
		si := make([]int, n) // next send index
		ri := make([]int, n) // next receive index
		type msg struct {
			off, n int
			vals   []elem
		}
		queue := make([][]msg, n) // queue[r]: messages in flight to r
		for progress := true; progress; {
			progress = false
			for r := 0; r < n; r++ {
				p := plans[r][ch]
				for si[r] < len(p.sends) && p.sends[si[r]].dep < ri[r] {
					u := p.sends[si[r]]
					vals := make([]elem, u.n)
					for i := range vals {
						vals[i] = append(elem(nil), data[r][u.off+i]...)
					}
					to := (r + 1) % n
					queue[to] = append(queue[to], msg{u.off, u.n, vals})
					sent[r] += u.n
					si[r]++
					progress = true
				}
				for ri[r] < len(p.recvs) && len(queue[r]) > 0 {
					u := p.recvs[ri[r]]
					m := queue[r][0]
					queue[r] = queue[r][1:]
					if m.off != u.off || m.n != u.n {
						t.Fatalf("n=%d count=%d ch=%d: rank %d expected [%d,+%d) got [%d,+%d)", n, count, ch, r, u.off, u.n, m.off, m.n)
					}
					for i := 0; i < u.n; i++ {
						if u.reduce {
							// dst = dst op src: the received partial sum comes first.
							data[r][u.off+i] = append(append(elem(nil), m.vals[i]...), data[r][u.off+i]...)
						} else {
							data[r][u.off+i] = m.vals[i]
						}
					}
					ri[r]++
					progress = true
				}
			}
		}
		for r := 0; r < n; r++ {
			if si[r] != len(plans[r][ch].sends) || ri[r] != len(plans[r][ch].recvs) || len(queue[r]) != 0 {
				t.Fatalf("n=%d count=%d ch=%d: rank %d stuck (deadlock) at send %d/%d recv %d/%d", n, count, ch, r, si[r], len(plans[r][ch].sends), ri[r], len(plans[r][ch].recvs))
			}
		}
	}
	for i := 0; i < count; i++ {
		ref := fmt.Sprint(data[0][i])
		seen := map[int8]bool{}
		for _, v := range data[0][i] {
			seen[v] = true
		}
		if len(data[0][i]) != n || len(seen) != n {
			t.Fatalf("n=%d count=%d: element %d holds %v", n, count, i, data[0][i])
		}
		for r := 1; r < n; r++ {
			if fmt.Sprint(data[r][i]) != ref {
				t.Fatalf("n=%d count=%d: element %d is %v on rank %d but %v on rank 0", n, count, i, data[r][i], r, ref)
			}
		}
	}
	for r := 0; r < n; r++ {
		// Rank r sends every block except r+1... exactly: all blocks but one
		// in each phase.
		want := 0
		for s := 0; s < RingAllReduceSteps(n); s++ {
			_, l := plan.Block(RingAllReduceStep(n, r, s).Send)
			want += l
		}
		if sent[r] != want || (n > 1 && count%n == 0 && sent[r] != 2*(n-1)*count/n) {
			t.Fatalf("n=%d count=%d: rank %d sent %d elements, want %d (2(n-1)/n of the buffer)", n, count, r, sent[r], want)
		}
	}
}

func TestRingScheduleExhaustive(t *testing.T) {
	for n := 1; n <= 16; n++ {
		counts := []int{0, 1, 2, n - 1, n, n + 1, 2*n - 1, 3*n + 2, 97, 256}
		for _, count := range counts {
			if count < 0 {
				continue
			}
			for _, channels := range []int{1, 2, 3} {
				for _, chunk := range []int{1, 3, 64} {
					simulateRing(t, n, count, channels, chunk)
				}
			}
		}
	}
}

func TestRingStepForwardsWhatItReceived(t *testing.T) {
	for n := 2; n <= 16; n++ {
		for r := 0; r < n; r++ {
			owned := -1
			for s := 0; s < RingAllReduceSteps(n); s++ {
				st := RingAllReduceStep(n, r, s)
				if s > 0 && st.Send != RingAllReduceStep(n, r, s-1).Recv {
					t.Fatalf("n=%d r=%d step %d sends %d, not what it received", n, r, s, st.Send)
				}
				if s == n-2 {
					owned = st.Recv
				}
				if st.Reduce != (s < n-1) {
					t.Fatalf("n=%d r=%d step %d reduce=%v", n, r, s, st.Reduce)
				}
			}
			if owned != r {
				t.Fatalf("n=%d: rank %d ends reduce-scatter owning block %d", n, r, owned)
			}
		}
	}
}

// TestRingPlansForwardWithinAWave checks the wavefront order of ringPlans:
// a chunk is sent on within two waves (at most 4(n-1) units) of the receive
// it waits for, so it is still in the cache, not after the rest
// of its step (step-by-step order puts a whole block part in between).
func TestRingPlansForwardWithinAWave(t *testing.T) {
	for n := 2; n <= 8; n++ {
		plan := ChunkPlan{Count: 100*n*3 + 5, Ranks: n, Channels: 3, ChunkElems: 1}
		for r := 0; r < n; r++ {
			for ch, p := range ringPlans(plan, r, 0, RingAllReduceSteps(n), false) {
				forwarded := 0
				for i, u := range p.sends {
					if u.dep < 0 {
						continue
					}
					forwarded++
					if gap := i - u.dep; gap < 0 || gap > 2*RingAllReduceSteps(n) {
						t.Fatalf("n=%d rank %d ch %d: send %d waits for receive %d (%d units apart)", n, r, ch, i, u.dep, gap)
					}
					if got, want := p.recvs[u.dep], u; got.off != want.off || got.n != want.n {
						t.Fatalf("n=%d rank %d ch %d: send %d [%d,+%d) waits for receive of [%d,+%d)", n, r, ch, i, want.off, want.n, got.off, got.n)
					}
				}
				if want := len(p.sends) - plan.SubChunks(RingAllReduceStep(n, r, 0).Send, ch); forwarded != want {
					t.Fatalf("n=%d rank %d ch %d: %d sends wait for a receive, want %d", n, r, ch, forwarded, want)
				}
			}
		}
	}
}

// TestRecursiveDoublingSchedule simulates recursive doubling for n=1..16:
// every rank ends with every contribution exactly once, all ranks equal.
func TestRecursiveDoublingSchedule(t *testing.T) {
	for n := 1; n <= 16; n++ {
		vals := make([]map[int]int, n)
		for r := range vals {
			vals[r] = map[int]int{r: 1}
		}
		steps := make([][]RDStep, n)
		for r := range steps {
			steps[r] = RecursiveDoubling(n, r)
		}
		idx := make([]int, n)
		cp := func(m map[int]int) map[int]int {
			o := map[int]int{}
			for k, v := range m {
				o[k] = v
			}
			return o
		}
		inbox := map[[2]int][]map[int]int{} // (from,to) -> messages
		sent := map[string]bool{}           // exchange sends done, by (link, step)
		for progress := true; progress; {
			progress = false
			for r := 0; r < n; r++ {
				if idx[r] >= len(steps[r]) {
					continue
				}
				st := steps[r][idx[r]]
				key := [2]int{st.Peer, r}
				switch st.Kind {
				case RDSendFold, RDSendResult:
					inbox[[2]int{r, st.Peer}] = append(inbox[[2]int{r, st.Peer}], cp(vals[r]))
					idx[r]++
					progress = true
				case RDExchange:
					// send once, then wait for the peer's
					sk := [2]int{r, st.Peer}
					if len(inbox[key]) == 0 {
						if !sent[fmt.Sprint(sk, idx[r])] {
							inbox[sk] = append(inbox[sk], cp(vals[r]))
							sent[fmt.Sprint(sk, idx[r])] = true
							progress = true
						}
						continue
					}
					if !sent[fmt.Sprint(sk, idx[r])] {
						inbox[sk] = append(inbox[sk], cp(vals[r]))
						sent[fmt.Sprint(sk, idx[r])] = true
					}
					fallthrough
				case RDRecvFold, RDRecvResult:
					if len(inbox[key]) == 0 {
						continue
					}
					m := inbox[key][0]
					inbox[key] = inbox[key][1:]
					if st.Kind == RDRecvResult {
						vals[r] = m
					} else {
						for k, v := range m {
							vals[r][k] += v
						}
					}
					idx[r]++
					progress = true
				}
			}
		}
		for r := 0; r < n; r++ {
			if idx[r] != len(steps[r]) {
				t.Fatalf("n=%d: rank %d stuck at step %d of %v", n, r, idx[r], steps[r])
			}
			if len(vals[r]) != n {
				t.Fatalf("n=%d: rank %d has %v", n, r, vals[r])
			}
			for k, v := range vals[r] {
				if v != 1 {
					t.Fatalf("n=%d: rank %d counted rank %d %d times", n, r, k, v)
				}
			}
		}
	}
}
