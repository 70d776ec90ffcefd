package collective

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countHold is a FrameHold that counts.
type countHold struct{ held, released atomic.Int64 }

func (h *countHold) Hold()    { h.held.Add(1) }
func (h *countHold) Release() { h.released.Add(1) }

func (h *countHold) out() int64 { return h.held.Load() - h.released.Load() }

// An operation that fails returns while a rank of this process still holds
// frames that reference its buffer: the FrameHold of its context is told
// of every frame it sent, and released only when the receiver let go of it
// (here: when the receiver's endpoint closes and hands its queue back).
//
// Rank 0 broadcasts 4 chunks to rank 1, which does not call broadcast: 3
// wait in rank 1's queue, the fault hook drops the 4th (and rank 0's abort,
// so that rank 1 stays usable). Rank 0's operation is cancelled and
// returns with 3 frames still held.
func TestFrameHoldOutlivesFailedOperation(t *testing.T) {
	const chunk = 4 << 10
	cfg := testConfig()
	cfg.Channels = 1
	cfg.ChunkBytes = chunk
	cfg.MinChannelBytes = chunk
	tr, comms, err := NewLocalGroup("hold", 1, 2, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	buf := NewHostBuffer(Float32, 4*chunk/4)
	lastSent := make(chan struct{})
	var once sync.Once
	tr.SetFault(func(_ string, src, dst, _ int, h *Header) FaultAction {
		switch {
		case src != 0:
			return FaultAction{}
		case h.Kind == FrameAbort:
			return FaultAction{Drop: true}
		case h.Kind == FrameData && int(h.Offset)*4+int(h.Length) == 4*chunk:
			once.Do(func() { close(lastSent) })
			return FaultAction{Drop: true}
		}
		return FaultAction{}
	})
	hold := &countHold{}
	ctx, cancel := context.WithCancel(WithFrameHold(context.Background(), hold))
	defer cancel()
	res := make(chan error, 1)
	go func() { res <- comms[0].Broadcast(ctx, buf, 0) }()
	select {
	case <-lastSent:
	case <-time.After(10 * time.Second):
		t.Fatal("rank 0 did not send its chunks")
	}
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("rank 0's broadcast: %v, want it cancelled", err)
	}
	if h, out := hold.held.Load(), hold.out(); h != 4 || out != 3 {
		t.Fatalf("after rank 0's broadcast returned: %d frames held, %d not released; want 4 and the 3 queued at rank 1", h, out)
	}
	_ = comms[1].Close()
	if h, out := hold.held.Load(), hold.out(); h != 4 || out != 0 {
		t.Fatalf("after rank 1 closed: %d frames held, %d not released; want 4 and 0", h, out)
	}
}

// Every frame an operation sends is held and released once, when it
// succeeds too.
func TestFrameHoldBalanced(t *testing.T) {
	_, comms, err := NewLocalGroup("hold", 1, 3, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	holds := make([]*countHold, len(comms))
	errs := RunAll(comms, func(c *Communicator) error {
		h := &countHold{}
		holds[c.Rank()] = h
		ctx := WithFrameHold(context.Background(), h)
		n := 64 << 10
		out := NewHostBuffer(Float32, 3*n)
		if err := c.AllGather(ctx, out, NewHostBuffer(Float32, n)); err != nil {
			return err
		}
		return c.Broadcast(ctx, out, 1)
	})
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
	CloseAll(comms)
	for r, h := range holds {
		if h.held.Load() == 0 || h.out() != 0 {
			t.Fatalf("rank %d: %d frames held, %d not released", r, h.held.Load(), h.out())
		}
	}
}
