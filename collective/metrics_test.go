package collective

import (
	"context"
	"fmt"
	"testing"
	"time"
)

func TestCountingTransportCountsAllReduce(t *testing.T) {
	const n, elems = 3, 1 << 16
	var ctr Counters
	tr := CountingTransport(NewLocalTransport(), &ctr)
	addrs := []string{"local:0", "local:1", "local:2"}
	comms := make([]*Communicator, n)
	cfg := DefaultConfig()
	cfg.NoSameProcess = true // the ring's bytes (the same-process path sends none)
	for r := range comms {
		c, err := New(tr, Group{Job: "count", Generation: 1, Rank: r, Addrs: addrs}, cfg)
		if err != nil {
			t.Fatal(err)
		}
		comms[r] = c
	}
	defer CloseAll(comms)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const ops = 2
	for i := 0; i < ops; i++ {
		errs := RunAll(comms, func(c *Communicator) error {
			v := make([]float32, elems)
			for k := range v {
				v[k] = float32(c.Rank() + 1)
			}
			buf := Float32s(v)
			if err := c.AllReduce(ctx, buf, OpSum); err != nil {
				return err
			}
			if got := buf.AsFloat32()[elems-1]; got != 6 {
				return fmt.Errorf("rank %d: sum %v, want 6", c.Rank(), got)
			}
			return nil
		})
		for r, err := range errs {
			if err != nil {
				t.Fatalf("rank %d: %v", r, err)
			}
		}
	}
	snap := ctr.Snapshot()
	if len(snap) != 1 || snap[0].Kind != CollAllReduce {
		t.Fatalf("snapshot %+v, want only AllReduce", snap)
	}
	s := snap[0]
	// A ring all-reduce sends 2(n-1)/n of the buffer from every rank.
	want := uint64(ops * n * 2 * (n - 1) * elems * 4 / n)
	if s.SentBytes != want || s.RecvBytes != want {
		t.Fatalf("sent %d received %d bytes, want %d each", s.SentBytes, s.RecvBytes, want)
	}
	if s.Ops != ops*n {
		t.Fatalf("ops %d, want %d (one per rank and operation)", s.Ops, ops*n)
	}
	if s.SentFrames == 0 || s.SentFrames != s.RecvFrames {
		t.Fatalf("frames sent %d received %d", s.SentFrames, s.RecvFrames)
	}
}
