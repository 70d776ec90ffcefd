//go:build linux

package localapi

import (
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// orderEvents records, per (group rank, operation kind), when a
// connection's operation began to wait for earlier ones and when it
// finished, for hooks that hold an operation until another got that far.
type orderEvents struct {
	t       *testing.T
	mu      sync.Mutex
	waiting map[[2]int]chan struct{}
	done    map[[2]int]chan struct{}
}

func newOrderEvents(t *testing.T) *orderEvents {
	return &orderEvents{t: t, waiting: map[[2]int]chan struct{}{}, done: map[[2]int]chan struct{}{}}
}

func opKey(w *work) [2]int { return [2]int{w.cn.comm.Rank(), int(w.op.Kind)} }

func (e *orderEvents) ch(m map[[2]int]chan struct{}, k [2]int) chan struct{} {
	e.mu.Lock()
	defer e.mu.Unlock()
	if m[k] == nil {
		m[k] = make(chan struct{})
	}
	return m[k]
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (e *orderEvents) signal(m map[[2]int]chan struct{}, k [2]int) {
	c := e.ch(m, k)
	e.mu.Lock()
	defer e.mu.Unlock()
	if !isClosed(c) {
		close(c)
	}
}

// hold blocks the calling worker until one of cs is closed (at most 10 s:
// a test that fails must not hang).
func (e *orderEvents) hold(what string, cs ...chan struct{}) {
	cases := make([]chan struct{}, 2)
	copy(cases, cs)
	select {
	case <-cases[0]:
	case <-cases[1]:
	case <-time.After(10 * time.Second):
		e.t.Errorf("%s: still held after 10 s", what)
	}
}

// install makes the agent's workers hold rank 0's send until rank 0's
// all-gather has finished or waits for it, and rank 1's all-gather until
// rank 1's receive has finished: the interleaving in which each rank's
// queues took the communicator in a different order.
func (e *orderEvents) install(t *testing.T) {
	testOrderHooks.Store(&orderHooks{
		waiting: func(w *work) { e.signal(e.waiting, opKey(w)) },
		done:    func(w *work) { e.signal(e.done, opKey(w)) },
		exec: func(w *work) {
			switch opKey(w) {
			case [2]int{0, OpSend}:
				e.hold("rank 0's send", e.ch(e.done, [2]int{0, OpAllGather}), e.ch(e.waiting, [2]int{0, OpAllGather}))
			case [2]int{1, OpAllGather}:
				e.hold("rank 1's all-gather", e.ch(e.done, [2]int{1, OpRecv}))
			}
		},
	})
	t.Cleanup(func() { testOrderHooks.Store(nil) })
}

// A send and the all-gather issued after it, with each rank's workers
// forced to take them in a different order (rank 0's all-gather ready
// first, rank 1's receive first): the agent runs them in issue order, so
// both complete with the right data. Without issue order rank 1's receive
// read rank 0's all-gather frame ("rank 1 called Send/Recv but rank 0
// called AllGather").
func TestServerRunsCollectiveAfterEarlierSend(t *testing.T) {
	e := newOrderEvents(t)
	e.install(t)
	s := startServer(t, 2)
	const n = 1 << 16 // float32 elements of the send; the all-gather takes n from each rank
	cls, mems := connectRanks(t, s, 2, 4*n*4)
	for r := range cls {
		v := f32(mems[r])
		for i := range n {
			v[i] = float32(r*1_000_000 + i) // the send's data (rank 0)
			v[n+i] = float32(r*1_000_000 + 500_000 + i%1000)
		}
	}
	dt := uint8(collective.Float32)
	// all-gather: input elements [n, 2n), output [2n, 4n).
	ag := &Op{Kind: OpAllGather, DType: dt, ID: 2, A: BufRef{Region: 1, Offset: 8 * n, Count: 2 * n}, B: BufRef{Region: 1, Offset: 4 * n, Count: n}}
	cls[0].send(EncodeOp(&Op{Kind: OpSend, DType: dt, Peer: 1, ID: 1, A: BufRef{Region: 1, Count: n}}))
	cls[0].send(EncodeOp(ag))
	cls[1].send(EncodeOp(&Op{Kind: OpRecv, DType: dt, Peer: 0, ID: 1, A: BufRef{Region: 1, Count: n}}))
	cls[1].send(EncodeOp(ag))
	for r, cl := range cls {
		for range 2 {
			if rep := cl.recv(); rep.Type != MsgDone || rep.Status != StatusOK {
				t.Fatalf("rank %d: %+v", r, rep)
			}
		}
	}
	got := f32s(mems[1], 0, n)
	for i, x := range got {
		if want := float32(i); x != want {
			t.Fatalf("rank 1 received [%d] = %v, want %v", i, x, want)
		}
	}
	for r := range cls {
		out := f32s(mems[r], 2*n, 2*n)
		for i, x := range out {
			if want := float32((i/n)*1_000_000 + 500_000 + (i%n)%1000); x != want {
				t.Fatalf("rank %d all-gather [%d] = %v, want %v", r, i, x, want)
			}
		}
	}
	for _, c := range cls {
		c.close()
	}
	waitIdle(t, s)
}

func f32s(b []byte, off, n int) []float32 { return f32(b)[off : off+n] }

// Consecutive sends and receives still run at once: both ranks issue a
// collective, then a send to the other and a receive from it, then another
// collective. A send between ranks of one agent waits for its receiver, so
// a rank that ran its receive only after its send would wait for ever.
func TestServerRunsSendsAndReceivesAtOnce(t *testing.T) {
	s := startServer(t, 2)
	const n = 1 << 18
	cls, mems := connectRanks(t, s, 2, 3*n*4)
	f32t := uint8(collective.Float32)
	for r := range cls {
		v := f32(mems[r])
		for i := range n {
			v[i] = float32(r + 1)
		}
	}
	for r, cl := range cls {
		cl.send(EncodeOp(&Op{Kind: OpBarrier, ID: 1}))
		cl.send(EncodeOp(&Op{Kind: OpSend, DType: f32t, Peer: int32(1 - r), ID: 2, A: BufRef{Region: 1, Count: n}}))
		cl.send(EncodeOp(&Op{Kind: OpRecv, DType: f32t, Peer: int32(1 - r), ID: 3, A: BufRef{Region: 1, Offset: 4 * n, Count: n}}))
		cl.send(EncodeOp(&Op{Kind: OpAllReduce, DType: f32t, Reduce: uint8(collective.OpSum), ID: 4, A: BufRef{Region: 1, Offset: 8 * n, Count: n}}))
	}
	for r, cl := range cls {
		for range 4 {
			if rep := cl.recv(); rep.Type != MsgDone || rep.Status != StatusOK {
				t.Fatalf("rank %d: %+v", r, rep)
			}
		}
		if got := f32s(mems[r], n, n); got[0] != float32(2-r) || got[n-1] != float32(2-r) {
			t.Fatalf("rank %d received %v…%v, want %d", r, got[0], got[n-1], 2-r)
		}
	}
	for _, c := range cls {
		c.close()
	}
	waitIdle(t, s)
}

// An operation queued behind one that fails fails at once: rank 1 sends 4
// elements where rank 0 receives 8 (a mismatch that fails the group); the
// all-reduce each rank issued after it is answered with an error long
// before the collective timeout (an hour here: the client's read deadline
// of 20 s would fail the test first).
func TestServerOperationAfterFailedOneFails(t *testing.T) {
	cc := collective.DefaultConfig()
	cc.Timeout = time.Hour
	s := startServerWith(t, 2, collective.NewLocalTransport(), cc)
	cls, _ := connectRanks(t, s, 2, 1<<20)
	f32t := uint8(collective.Float32)
	cls[0].send(EncodeOp(&Op{Kind: OpRecv, DType: f32t, Peer: 1, ID: 1, A: BufRef{Region: 1, Count: 8}}))
	cls[1].send(EncodeOp(&Op{Kind: OpSend, DType: f32t, Peer: 0, ID: 1, A: BufRef{Region: 1, Count: 4}}))
	for _, cl := range cls {
		cl.send(EncodeOp(&Op{Kind: OpAllReduce, DType: f32t, Reduce: uint8(collective.OpSum), ID: 2, A: BufRef{Region: 1, Count: 1 << 16}}))
	}
	for r, cl := range cls {
		status := map[uint64]Reply{}
		for len(status) < 2 {
			if rep := cl.recvDone(); rep.Type == MsgDone {
				status[rep.ID] = rep
			}
		}
		if rep := status[2]; rep.Status == StatusOK || !strings.Contains(rep.Message, "count=4") {
			t.Fatalf("rank %d: the all-reduce after the failed receive: %+v (want the mismatch)", r, rep)
		}
		if r == 0 && status[1].Status == StatusOK {
			t.Fatalf("rank 0's receive of the wrong size: %+v", status[1])
		}
		t.Logf("rank %d: %s", r, status[2].Message)
	}
	for _, c := range cls {
		c.close()
	}
	waitIdle(t, s)
}
