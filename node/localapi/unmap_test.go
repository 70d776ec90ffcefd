//go:build linux

package localapi

import (
	"bytes"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// A rank's client dies while a rank of the same agent still holds frames
// that reference the dead client's shared memory (ranks of one agent hand
// chunks over in memory): the agent must keep that memory mapped until the
// peer let go of the frames, instead of unmapping it when the dead rank's
// operation ends, which made the peer's copy fault and killed the agent.
//
// The timing is made deterministic with the transport's fault hook: rank 0
// broadcasts 4 chunks to rank 1 (which has not called broadcast yet, so they
// wait in its queue), its last chunk and its abort are dropped (as if the
// abort were still on its way), and its client dies. Only then do ranks 1
// and 2 call broadcast: rank 1 copies the 3 queued chunks out of rank 0's
// memory (without the hold that faulted: the test binary died with
// SIGSEGV), forwards them to rank 2, and waits for the 4th; rank 2's client
// then dies and rank 1's operation fails at once.
func TestServerKeepsDeadRankMemoryForPeerFrames(t *testing.T) {
	const (
		ranks = 3
		size  = 1 << 20
		chunk = size / 4
	)
	tr := collective.NewLocalTransport()
	lastSent := make(chan struct{})
	var once sync.Once
	tr.SetFault(func(_ string, src, dst, _ int, h *collective.Header) collective.FaultAction {
		if src != 0 {
			return collective.FaultAction{}
		}
		if h.Kind == collective.FrameAbort {
			return collective.FaultAction{Drop: true}
		}
		if h.Kind == collective.FrameData && dst == 1 && int(h.Offset)*4+int(h.Length) == size {
			// Frames of a channel are sent in order: the 3 before it
			// are in rank 1's queue now.
			once.Do(func() { close(lastSent) })
			return collective.FaultAction{Drop: true}
		}
		return collective.FaultAction{}
	})
	cc := collective.DefaultConfig()
	cc.Timeout = 20 * time.Second // a failure here must come at once, not from the timeout
	cc.Channels = 1
	cc.ChunkBytes = chunk
	cc.MinChannelBytes = chunk
	s := startServerWith(t, ranks, tr, cc)
	cls, mems := connectRanks(t, s, ranks, size)
	for i := range mems[0] {
		mems[0][i] = byte(i*7 + 3)
	}
	want := append([]byte(nil), mems[0][:3*chunk]...)
	bcast := EncodeOp(&Op{Kind: OpBroadcast, DType: 1, Peer: 0, ID: 1, A: BufRef{Region: 1, Count: size / 4}})
	cls[0].send(bcast)
	select {
	case <-lastSent:
	case <-time.After(20 * time.Second):
		t.Fatal("rank 0 did not send its broadcast's chunks")
	}
	cls[0].close() // no BYE: the process died
	poll.Until(t, 10*time.Second, func() error {
		if l := s.Live(); l.Conns != ranks-1 {
			return fmt.Errorf("rank 0's connection has not ended: %+v", l)
		}
		return nil
	})
	if l := s.Live(); l.Regions != ranks {
		t.Fatalf("rank 0's region was released while rank 1 holds 3 frames that reference it: %+v", l)
	}
	cls[1].send(bcast)
	cls[2].send(bcast)
	// Rank 1 consumed the 3 chunks: rank 0's memory is let go of.
	poll.Until(t, 10*time.Second, func() error {
		if l := s.Live(); l.Regions != ranks-1 {
			return fmt.Errorf("rank 0's region is still held: %+v", l)
		}
		return nil
	})
	if !bytes.Equal(mems[1][:3*chunk], want) {
		t.Fatal("rank 1 did not receive rank 0's 3 chunks intact")
	}
	cls[2].close()
	r := cls[1].recvDone()
	if r.Type != MsgDone || r.Status != StatusFailed || strings.Contains(r.Message, "no progress") {
		t.Fatalf("rank 1's broadcast after rank 2 died: %+v (want a failure at once)", r)
	}
	t.Logf("rank 1 got: %s", r.Message)
	cls[1].close()
	waitIdle(t, s)
}

// A rank's client dies in the middle of each kind of operation among ranks
// of one agent, while its peers are copying chunks out of its memory: the
// agent survives, the other ranks' operations fail at once (not by the
// timeout), and nothing leaks. The fault hook holds rank 0's second data
// frame until its client died, so the operation cannot end first.
func TestServerRankDiesMidOperationEveryKind(t *testing.T) {
	const (
		ranks = 3
		block = 256 << 10 // elements of one rank's block (float32)
	)
	cases := []struct {
		name string
		ops  func(rank int) *Op // nil: the rank runs nothing
		// done is a rank whose operation may also succeed (-1: none):
		// the root of a broadcast is done once its peer took its data.
		done int
	}{
		{"all_gather", func(int) *Op {
			return &Op{Kind: OpAllGather, DType: 1, A: BufRef{Region: 1, Count: ranks * block}, B: BufRef{Region: 2, Count: block}}
		}, -1},
		{"reduce_scatter", func(int) *Op {
			return &Op{Kind: OpReduceScatter, DType: 1, Reduce: 1, A: BufRef{Region: 2, Count: block}, B: BufRef{Region: 1, Count: ranks * block}}
		}, -1},
		{"broadcast_root0", func(int) *Op {
			return &Op{Kind: OpBroadcast, DType: 1, Peer: 0, A: BufRef{Region: 1, Count: ranks * block}}
		}, -1},
		{"broadcast_root2", func(int) *Op {
			return &Op{Kind: OpBroadcast, DType: 1, Peer: 2, A: BufRef{Region: 1, Count: ranks * block}}
		}, 2},
		{"send_recv", func(rank int) *Op {
			switch rank {
			case 0:
				return &Op{Kind: OpSend, DType: 1, Peer: 1, A: BufRef{Region: 1, Count: ranks * block}}
			case 1:
				return &Op{Kind: OpRecv, DType: 1, Peer: 0, A: BufRef{Region: 1, Count: ranks * block}}
			}
			return nil
		}, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			tr := collective.NewLocalTransport()
			held := make(chan struct{})
			var frames atomic.Int64
			tr.SetFault(func(_ string, src, _, _ int, h *collective.Header) collective.FaultAction {
				if src == 0 && h.Kind == collective.FrameData && frames.Add(1) == 2 {
					close(held)
					// Until rank 0's operation is cancelled (its client died).
					return collective.FaultAction{Delay: time.Hour}
				}
				return collective.FaultAction{}
			})
			cc := collective.DefaultConfig()
			cc.Timeout = 20 * time.Second
			cc.ChunkBytes = 64 << 10
			s := startServerWith(t, ranks, tr, cc)
			cls, _ := connectRanks(t, s, ranks, ranks*block*4)
			for _, cl := range cls {
				cl.register(2, block*4)
			}
			for i := ranks - 1; i >= 0; i-- {
				if op := tc.ops(i); op != nil {
					op.ID = 1
					cls[i].send(EncodeOp(op))
				}
			}
			select {
			case <-held:
			case <-time.After(20 * time.Second):
				t.Fatal("rank 0 did not send its second frame")
			}
			cls[0].close() // no BYE: the process died
			for i := 1; i < ranks; i++ {
				if tc.ops(i) == nil {
					continue
				}
				r := cls[i].recvDone()
				if i == tc.done && r.Type == MsgDone && r.Status == StatusOK {
					continue
				}
				if r.Type != MsgDone || r.Status != StatusFailed || strings.Contains(r.Message, "no progress") {
					t.Fatalf("rank %d after rank 0 died: %+v (want a failure at once)", i, r)
				}
			}
			for i := 1; i < ranks; i++ {
				cls[i].close()
			}
			waitIdle(t, s)
		})
	}
}
