package collective

import (
	"context"
	"fmt"
	"sync"
)

// AllToAll sends sends[p] to rank p and receives rank p's block for this
// rank into recvs[p], for every other rank p, as one collective (in order
// with the others). Blocks may differ in length, and be empty, but the
// sender's and the receiver's length of each pair must agree (a mismatch
// is an error on both). sends[Rank()] and recvs[Rank()] are not used: a
// rank's own block is the caller's to copy.
//
// Every pair is a pipelined transfer of its own over the link between the
// two ranks, all of them at once (n-1 sends and n-1 receives per rank),
// nothing relayed through a third rank; an empty block is still one
// (empty) frame, so that every pair meets and a length mismatch is caught.
func (c *Communicator) AllToAll(ctx context.Context, sends, recvs []Buffer) error {
	if len(sends) != c.n || len(recvs) != c.n {
		return fmt.Errorf("%w: AllToAll: %d send and %d receive buffers, want one per rank (%d)", ErrBadArgument, len(sends), len(recvs), c.n)
	}
	xs := make([]pairXfer, 0, 2*c.n)
	for p := range c.n {
		if p == c.rank {
			continue
		}
		xs = append(xs, pairXfer{buf: sends[p], peer: p, send: true}, pairXfer{buf: recvs[p], peer: p})
	}
	return c.exchange(ctx, "AllToAll", CollAllToAll, -1, xs)
}

// Gather sends this rank's send to root; root receives rank p's into
// recvs[p] (recvs is used on root only, recvs[root] not at all: root's own
// block is the caller's to copy). Every block has one length.
func (c *Communicator) Gather(ctx context.Context, send Buffer, recvs []Buffer, root int) error {
	if root < 0 || root >= c.n {
		return fmt.Errorf("%w: Gather: root %d outside 0..%d", ErrBadArgument, root, c.n-1)
	}
	if c.rank != root {
		return c.exchange(ctx, "Gather", CollGather, root, []pairXfer{{buf: send, peer: root, send: true}})
	}
	if len(recvs) != c.n {
		return fmt.Errorf("%w: Gather: %d receive buffers on the root, want one per rank (%d)", ErrBadArgument, len(recvs), c.n)
	}
	xs := make([]pairXfer, 0, c.n)
	for p := range c.n {
		if p != root {
			xs = append(xs, pairXfer{buf: recvs[p], peer: p})
		}
	}
	return c.exchange(ctx, "Gather", CollGather, root, xs)
}

// Scatter sends root's sends[p] to rank p, which receives it into recv
// (sends is used on root only, sends[root] not at all).
func (c *Communicator) Scatter(ctx context.Context, sends []Buffer, recv Buffer, root int) error {
	if root < 0 || root >= c.n {
		return fmt.Errorf("%w: Scatter: root %d outside 0..%d", ErrBadArgument, root, c.n-1)
	}
	if c.rank != root {
		return c.exchange(ctx, "Scatter", CollScatter, root, []pairXfer{{buf: recv, peer: root}})
	}
	if len(sends) != c.n {
		return fmt.Errorf("%w: Scatter: %d send buffers on the root, want one per rank (%d)", ErrBadArgument, len(sends), c.n)
	}
	xs := make([]pairXfer, 0, c.n)
	for p := range c.n {
		if p != root {
			xs = append(xs, pairXfer{buf: sends[p], peer: p, send: true})
		}
	}
	return c.exchange(ctx, "Scatter", CollScatter, root, xs)
}

// pairXfer is one transfer of an exchange: buf to or from peer.
type pairXfer struct {
	buf  Buffer
	peer int
	send bool
}

func (x pairXfer) String() string {
	if x.send {
		return fmt.Sprintf("sending to rank %d", x.peer)
	}
	return fmt.Sprintf("receiving from rank %d", x.peer)
}

// exchange runs the transfers xs at once as one collective. Frames name
// coll and root (AllToAll: the receiving rank, as Send/Recv's do), so that
// ranks that called different operations, or disagree on the root or a
// length, fail with a mismatch.
func (c *Communicator) exchange(ctx context.Context, name string, coll CollKind, root int, xs []pairXfer) error {
	var dt DType
	for i, x := range xs {
		if err := checkBuf(name, x.buf); err != nil {
			return err
		}
		if i == 0 {
			dt = x.buf.DType()
		} else if x.buf.DType() != dt {
			return fmt.Errorf("%w: %s: buffers of %v and %v: one dtype per operation", ErrBadDType, name, dt, x.buf.DType())
		}
	}
	return c.collective(ctx, name, func(ctx context.Context) error {
		if len(xs) == 0 {
			return nil
		}
		ctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		seq := c.seq
		var wg sync.WaitGroup
		var once sync.Once
		var first error
		for _, x := range xs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if err := c.pairTransfer(ctx, coll, root, seq, x); err != nil {
					once.Do(func() {
						first = fmt.Errorf("%s: %w", x, err)
						cancel(first)
					})
				}
			}()
		}
		wg.Wait()
		return first
	})
}

// pairTransfer moves one block of an exchange, pipelined over the
// channels like Send and Recv.
func (c *Communicator) pairTransfer(ctx context.Context, coll CollKind, root int, seq uint64, x pairXfer) error {
	count, dt := x.buf.Len(), x.buf.DType()
	plan := c.wholePlan(count, dt)
	if root < 0 { // AllToAll: the receiving rank, as Send/Recv name it
		root = x.peer
		if !x.send {
			root = c.rank
		}
	}
	h := c.header(coll, dt, 0, count, AlgoPipeline, plan.ChunkElems, root)
	h.Seq = seq
	plans := wholePlans(plan, x.send, !x.send)
	if count == 0 { // still one (empty) frame, so that the pair meets
		plans[0] = chanPlan{}
		if x.send {
			plans[0].sends = []unit{{dep: -1}}
		} else {
			plans[0].recvs = []unit{{}}
		}
	}
	return c.pipeline(ctx, x.buf, &h, 0, x.peer, x.peer, plans)
}
