package collective

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
)

// All-reduce among ranks of one process, in place in every rank's memory.
//
// When every peer of a rank is in this process (the transport hands frames
// to them by reference: LocalTransport, or NetTransport ranks at this
// rank's address, as the ranks of one node's agent are) and the buffer is a
// HostBuffer, AllReduce does not run the ring: each rank can read and write
// every other rank's buffer directly.
//
//  1. Each rank sends every peer one frame on channel 0 that carries no
//     payload, only a reference to its whole buffer (InFrame.Peer) and, as
//     the frame's owner, a directShare: the sender's count of peers inside
//     its buffer.
//  2. Each rank receives the n-1 frames, checks them as any frame (the
//     operation's header: a rank that calls something else, or runs the
//     ring, fails every rank with a mismatch) and enters every peer's
//     share.
//  3. Rank r reduces block r of the elements (Part(count, n, r)), split
//     across Config.SameProcessWorkers/n goroutines: per 16 KiB piece it
//     reduces the n ranks' pieces in rank order into rank 0's memory
//     (divides for OpAvg) and copies the result into the others'. Every
//     element is read n times and written n times; nothing is staged. The
//     reduction order is fixed (rank 0, 1, ..., n-1), so float results are
//     bit-identical on every rank and across runs (they may differ in the
//     last bits from the ring's, whose order depends on the block).
//  4. It marks each share finished, leaves it and releases the frame (the
//     peer's SendDone). A rank returns once all n-1 peers have released its
//     frame (they are done with its memory), and succeeds only if all n-1
//     finished their blocks: a peer that failed before (or while) reducing
//     releases without finishing, and the rank fails too instead of
//     returning a buffer whose block that peer never wrote.
//
// On failure a rank retracts its share before it returns: it waits for the
// peers that are inside its buffer to leave (their loops do not block) and
// refuses those that come later, so no goroutine touches a buffer whose
// operation has returned (the local API unmaps a client's memory when its
// operation ends). Config.NoSameProcess keeps such ranks on the ring.

// AlgoDirect is the frame header's algorithm of the same-process
// all-reduce.
const AlgoDirect = 4

// AlgoNameSameProcess is LastAllReduceAlgorithm's name for it.
const AlgoNameSameProcess = "same-process"

// directPiece is the unit of the reduction loop: the n ranks' pieces stay
// in the core's cache between the reduce and the copies.
const directPiece = 16 << 10

// directMinWorker is the least one goroutine reduces (bytes of one rank's
// buffer); smaller blocks use fewer goroutines. A variable for the tests.
var directMinWorker = 512 << 10

// directShare is the sender's side of one rank's buffer in a same-process
// all-reduce: the peers enter it while they touch the buffer, and release
// the frame (SendDone) when they are done with it.
type directShare struct {
	mu        sync.Mutex
	idle      sync.Cond
	users     int
	retracted bool

	want     int32
	released atomic.Int32 // frames released (by the peer or its endpoint)
	finished atomic.Int32 // peers that wrote their block of the buffer
	kick     chan struct{}
}

func newDirectShare(peers int) *directShare {
	s := &directShare{want: int32(peers), kick: make(chan struct{}, 1)}
	s.idle.L = &s.mu
	return s
}

// SendDone implements SendDone: one peer released the frame.
func (s *directShare) SendDone() {
	if s.released.Add(1) == s.want {
		select {
		case s.kick <- struct{}{}:
		default:
		}
	}
}

// enter reports whether a peer may use the buffer (false once retracted).
func (s *directShare) enter() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.retracted {
		return false
	}
	s.users++
	return true
}

func (s *directShare) leave() {
	s.mu.Lock()
	s.users--
	if s.users == 0 {
		s.idle.Broadcast()
	}
	s.mu.Unlock()
}

// retract waits until no peer is inside the buffer and refuses later ones.
func (s *directShare) retract() {
	s.mu.Lock()
	s.retracted = true
	for s.users > 0 {
		s.idle.Wait()
	}
	s.mu.Unlock()
}

// finish records that a peer wrote its block (before it releases).
func (s *directShare) finish() { s.finished.Add(1) }

// wait returns once every peer released the frame, or ctx ends; an error
// if a peer released it without finishing its block.
func (s *directShare) wait(ctx context.Context) error {
	for s.released.Load() < s.want {
		select {
		case <-s.kick:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	if f := s.finished.Load(); f < s.want {
		return fmt.Errorf("%w: %d of %d peers ended the same-process all-reduce without reducing their part", ErrPeerFailed, s.want-f, s.want)
	}
	return nil
}

// sameProcessPeers reports whether every other rank's frames are handed
// over in memory (computed once, in New).
func sameProcessPeers(ep Endpoint, rank, n int) bool {
	if n < 2 {
		return false
	}
	for p := 0; p < n; p++ {
		if p != rank && !endpointByRef(ep, p) {
			return false
		}
	}
	return true
}

// directBuffer returns buf when this AllReduce runs the same-process path.
// Every rank decides alike: the peers are the same, the config must be,
// and ranks of one operation pass buffers of one kind.
func (c *Communicator) directBuffer(buf Buffer) (*HostBuffer, bool) {
	if !c.sameProcess || c.cfg.NoSameProcess {
		return nil, false
	}
	hb, ok := buf.(*HostBuffer)
	if !ok || hb.Len() == 0 {
		return nil, false
	}
	return hb, true
}

// directAllReduce runs steps 1-4 above on this rank.
func (c *Communicator) directAllReduce(ctx context.Context, buf *HostBuffer, op Op) (err error) {
	n, count, dt := c.n, buf.Len(), buf.DType()
	h := c.header(CollAllReduce, dt, op, count, AlgoDirect, 0, -1)
	h.Seq = c.seq
	share := newDirectShare(n - 1)
	defer func() {
		if err != nil {
			share.retract()
		}
	}()
	for p := 0; p < n; p++ {
		if p == c.rank {
			continue
		}
		hp := h // the transport keeps the header with the frame
		if err := c.ep.Send(ctx, p, 0, &hp, nil, PeerRef{Buf: buf}, share); err != nil {
			return err
		}
	}
	bufs := make([]*HostBuffer, n)
	bufs[c.rank] = buf
	frames := make([]*InFrame, 0, n-1)
	shares := make([]*directShare, 0, n-1)
	defer func() {
		for _, s := range shares {
			s.leave()
		}
		for _, f := range frames {
			f.Release()
		}
	}()
	for p := 0; p < n; p++ {
		if p == c.rank {
			continue
		}
		f, err := c.ep.Recv(ctx, p, 0)
		if err != nil {
			return err
		}
		if err := c.checkFrame(&h, f, p, 0, count); err != nil {
			f.Release()
			return err
		}
		frames = append(frames, f)
		pb, ok := f.Peer.Buf.(*HostBuffer)
		if _, isShare := f.owner.(*directShare); !ok || !isShare || pb.Len() != count {
			return &MismatchError{Msg: fmt.Sprintf("rank %d runs %s among ranks of one process on host memory but rank %d's buffer is %T: give every rank buffers of one kind", c.rank, h.describe(""), p, f.Peer.Buf)}
		}
		bufs[p] = pb
		c.progress.Add(1)
	}
	// Enter the peers' buffers only once every frame is in: a rank inside
	// a peer's buffer never waits for anything, so a failing peer's
	// retract cannot wait on it.
	for _, f := range frames {
		s := f.owner.(*directShare)
		if !s.enter() {
			return fmt.Errorf("%w: rank %d gave up the operation", ErrPeerFailed, f.Header.Src)
		}
		shares = append(shares, s)
	}
	off, bl := Part(count, n, c.rank)
	c.reduceDirect(ctx, bufs, dt, op, off, bl)
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx) // the deferred release leaves the shares unfinished
	}
	for _, s := range shares {
		s.finish()
		s.leave()
	}
	shares = shares[:0]
	for _, f := range frames {
		f.Release()
	}
	frames = frames[:0]
	if err := share.wait(ctx); err != nil {
		return err
	}
	c.progress.Add(1)
	return nil
}

// reduceDirect reduces elements [off, off+cnt) of every rank's buffer into
// all of them (step 3), on up to SameProcessWorkers/n goroutines.
func (c *Communicator) reduceDirect(ctx context.Context, bufs []*HostBuffer, dt DType, op Op, off, cnt int) {
	es := dt.Size()
	workers := c.cfg.SameProcessWorkers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	w := max(1, min(workers/len(bufs), cnt*es/directMinWorker))
	if w == 1 {
		c.reduceDirectRange(ctx, bufs, dt, op, off*es, (off+cnt)*es)
		return
	}
	var wg sync.WaitGroup
	for i := 0; i < w; i++ {
		po, pn := Part(cnt, w, i)
		wg.Add(1)
		go func() {
			defer wg.Done()
			c.reduceDirectRange(ctx, bufs, dt, op, (off+po)*es, (off+po+pn)*es)
		}()
	}
	wg.Wait()
}

// reduceDirectRange is one goroutine's part: bytes [lo, hi) of every
// buffer, a piece at a time. It stops early when ctx ends (the caller
// then fails the operation).
func (c *Communicator) reduceDirectRange(ctx context.Context, bufs []*HostBuffer, dt DType, op Op, lo, hi int) {
	es := dt.Size()
	piece := directPiece / es * es
	n := len(bufs)
	for a := lo; a < hi; a += piece {
		if ctx.Err() != nil {
			return
		}
		b := min(a+piece, hi)
		acc := bufs[0].bytes[a:b]
		for r := 1; r < n; r++ {
			reduceBytes(dt, op, acc, bufs[r].bytes[a:b])
		}
		if op == OpAvg {
			divBytes(dt, acc, n)
		}
		for r := 1; r < n; r++ {
			copy(bufs[r].bytes[a:b], acc)
		}
		c.progress.Add(1)
	}
}
