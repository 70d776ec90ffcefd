package collective

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Algorithms, as carried in frame headers.
const (
	AlgoRing              = 1
	AlgoRecursiveDoubling = 2
	AlgoPipeline          = 3 // broadcast chain and point-to-point
)

// Communicator runs collective operations for one rank of a group.
//
// Collective operations (AllReduce, ReduceScatter, AllGather, Broadcast,
// Barrier) must be called by every rank, in the same order, one at a time.
// Send and Recv may run concurrently with each other (for distinct peer and
// direction), but not with a collective.
//
// After any failure (mismatch, dead peer, timeout, cancelled context) the
// communicator is aborted: the failure is sent to every peer, so every rank's
// pending and later calls fail too. Build a new communicator (next
// generation) to continue.
type Communicator struct {
	cfg   Config
	group Group
	n     int
	rank  int
	ghash uint64
	ep    Endpoint
	log   hclog.Logger
	// minChan is the least each channel of an operation carries
	// (planChannels); 0 uses every channel.
	minChan int
	// sameProcess: every peer is in this process (sameprocess.go).
	sameProcess bool

	opMu   sync.RWMutex // collectives hold it exclusively, Send/Recv shared
	seq    uint64       // collective sequence number (under opMu)
	p2pMu  []sync.Mutex // 2 per peer: send, recv
	p2pSeq []uint64     // 2 per peer, under p2pMu

	ctx      context.Context // cancelled with the failure cause
	cancel   context.CancelCauseFunc
	failOnce sync.Once
	failErr  atomic.Pointer[error]

	progress atomic.Uint64
	active   atomic.Int32

	scratch []byte // recursive doubling, under opMu

	// sameHost: the agreed same-host ring of each buffer seen (samehost.go);
	// written under opMu and sameHostMu, read under either.
	sameHostMu sync.Mutex
	sameHost   map[Buffer]*sameHostEntry
	lastAlgo   string // algorithm of the last AllReduce, under opMu
	barrier    *HostBuffer

	wg        sync.WaitGroup
	closed    atomic.Bool
	closeOnce sync.Once
	stop      chan struct{}
}

// New creates rank g.Rank's communicator over transport t.
func New(t Transport, g Group, cfg Config) (*Communicator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := g.Validate(); err != nil {
		return nil, err
	}
	ep, err := t.Open(EndpointSpec{Job: g.Job, Generation: g.Generation, Rank: g.Rank, Addrs: g.Addrs, Channels: cfg.Channels})
	if err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	n := len(g.Addrs)
	minChan := minChannelBytes
	if cfg.MinChannelBytes > 0 {
		minChan = cfg.MinChannelBytes
	}
	c := &Communicator{
		cfg: cfg, group: g, n: n, rank: g.Rank, ghash: GroupHash(g.Job), ep: ep, minChan: minChan,
		log:     log.Named("collective").With("job", g.Job, "generation", g.Generation, "rank", g.Rank),
		p2pMu:   make([]sync.Mutex, 2*n),
		p2pSeq:  make([]uint64, 2*n),
		barrier: NewHostBuffer(Uint8, 1),
		stop:    make(chan struct{}),
	}
	c.sameProcess = sameProcessPeers(ep, g.Rank, n)
	c.ctx, c.cancel = context.WithCancelCause(context.Background())
	c.wg.Add(2)
	go c.watchdog()
	go c.watchEndpoint()
	return c, nil
}

// Rank is this rank.
func (c *Communicator) Rank() int { return c.rank }

// Size is the number of ranks.
func (c *Communicator) Size() int { return c.n }

// Group returns the group this communicator serves.
func (c *Communicator) Group() Group { return c.group }

// Config returns the communicator's configuration.
func (c *Communicator) Config() Config { return c.cfg }

// Err returns the failure that aborted the communicator, or nil.
func (c *Communicator) Err() error {
	if p := c.failErr.Load(); p != nil {
		return *p
	}
	return nil
}

// Done is closed when the communicator fails or is closed; Err then says
// why. A failure may arrive with no operation in flight (a peer aborted the
// group, or its node went away).
func (c *Communicator) Done() <-chan struct{} { return c.ctx.Done() }

// Abort fails the communicator with cause as a failed operation does: the
// peers are told, so their pending and later operations fail at once
// instead of at the collective timeout. Safe to call at any time; a no-op
// once the communicator failed or closed.
func (c *Communicator) Abort(cause error) { c.fail(cause) }

// Close releases the communicator's links and goroutines. It does not wait
// for operations in flight (they fail with ErrClosed). Safe to call twice.
func (c *Communicator) Close() error {
	c.closeOnce.Do(func() {
		c.closed.Store(true)
		c.failOnce.Do(func() {
			err := error(ErrClosed)
			c.failErr.Store(&err)
			c.cancel(ErrClosed)
		})
		close(c.stop)
		c.wg.Wait()
		c.closeSameHost()
		_ = c.ep.Close()
	})
	return nil
}

// fail aborts the communicator with cause (first cause wins) and tells the
// peers in the background.
func (c *Communicator) fail(cause error) {
	c.failOnce.Do(func() {
		c.failErr.Store(&cause)
		c.cancel(cause)
		c.log.Error("communicator aborted", "error", cause)
		select {
		case <-c.stop:
			return
		default:
		}
		c.wg.Add(1)
		go func() {
			defer c.wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), c.cfg.AbortTimeout)
			defer cancel()
			c.ep.Abort(ctx, cause)
		}()
	})
}

func (c *Communicator) watchEndpoint() {
	defer c.wg.Done()
	select {
	case <-c.ep.Failed():
		err := c.ep.Err()
		if err == nil || errors.Is(err, ErrClosed) {
			return
		}
		c.fail(err)
	case <-c.stop:
	}
}

// watchdog fails the communicator when an operation is in flight and
// nothing has moved for Timeout.
func (c *Communicator) watchdog() {
	defer c.wg.Done()
	tick := c.cfg.Timeout / 8
	if tick > time.Second {
		tick = time.Second
	}
	if tick < time.Millisecond {
		tick = time.Millisecond
	}
	t := time.NewTicker(tick)
	defer t.Stop()
	last := c.progress.Load()
	var since time.Time
	for {
		select {
		case <-c.stop:
			return
		case now := <-t.C:
			p := c.progress.Load()
			if p != last || c.active.Load() == 0 {
				last, since = p, time.Time{}
				continue
			}
			if since.IsZero() {
				since = now
				continue
			}
			if now.Sub(since) >= c.cfg.Timeout {
				c.fail(fmt.Errorf("%w: rank %d made no progress for %v (a peer is dead, hung, unreachable or did not call the same operation; the limit is the collective timeout)", ErrTimeout, c.rank, c.cfg.Timeout))
				return
			}
		}
	}
}

// opErr turns an operation's error into what the caller sees: the root
// cause of the communicator's failure when there is one.
func (c *Communicator) opErr(name string, ctx context.Context, err error) error {
	if err == nil {
		return nil
	}
	if ctx.Err() != nil && c.Err() == nil {
		c.fail(fmt.Errorf("%w: rank %d: %s cancelled: %v", ErrAborted, c.rank, name, context.Cause(ctx)))
		return fmt.Errorf("collective: %s: %w", name, context.Cause(ctx))
	}
	c.fail(err)
	if root := c.Err(); root != nil {
		return root
	}
	return err
}

// begin starts an operation: checks the communicator is usable and derives
// the operation's context, cancelled when the communicator fails.
func (c *Communicator) begin(ctx context.Context) (context.Context, func(), error) {
	if err := c.Err(); err != nil {
		if c.closed.Load() {
			return nil, nil, ErrClosed
		}
		return nil, nil, fmt.Errorf("%w (earlier failure: %w)", ErrAborted, err)
	}
	opCtx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(c.ctx, func() { cancel(context.Cause(c.ctx)) })
	c.active.Add(1)
	return opCtx, func() {
		c.active.Add(-1)
		stop()
		cancel(nil)
	}, nil
}

func (c *Communicator) header(coll CollKind, dt DType, op Op, count int, algo uint8, chunkElems int, root int) Header {
	return Header{
		Kind: FrameData, Coll: coll, DType: dt, Op: op, Algo: algo,
		Channels: uint16(c.cfg.Channels), Root: int32(root), Group: c.ghash,
		Generation: c.group.Generation, Count: uint64(count), ChunkElems: uint64(chunkElems),
		Src: int32(c.rank),
	}
}

// MismatchError says that two ranks called different operations.
type MismatchError struct{ Msg string }

func (e *MismatchError) Error() string { return "collective: " + e.Msg }

// Unwrap returns ErrMismatch.
func (e *MismatchError) Unwrap() error { return ErrMismatch }

func (c *Communicator) checkFrame(exp *Header, f *InFrame, from, off, n int) error {
	if byRefFrame(f) && n > 0 { // a PeerRef without payload (peerpath.go)
		return c.checkRefFrame(exp, f, from, off, n)
	}
	if err := c.checkHeader(exp, &f.Header, from, off, n); err != nil {
		return err
	}
	if f.Payload.Len() != n*exp.DType.Size() {
		return &MismatchError{Msg: fmt.Sprintf("rank %d expected elements [%d,%d) of %s from rank %d but got %d payload bytes: give every rank the same collective config", c.rank, off, off+n, exp.describe(""), from, f.Payload.Len())}
	}
	return nil
}

// checkHeader checks a received header against the expected operation and
// chunk (checkFrame also checks the payload's length).
func (c *Communicator) checkHeader(exp, got *Header, from, off, n int) error {
	if got.Kind != FrameData || int(got.Src) != from {
		return fmt.Errorf("%w: rank %d got a frame of kind %d from rank %d on the link from rank %d", ErrBadFrame, c.rank, got.Kind, got.Src, from)
	}
	if m := mismatch(exp, got, c.rank); m != "" {
		return &MismatchError{Msg: m}
	}
	es := exp.DType.Size()
	if got.Offset != uint64(off) || int(got.Length) != n*es {
		return &MismatchError{Msg: fmt.Sprintf("rank %d expected elements [%d,%d) of %s from rank %d but got [%d,+%d bytes): give every rank the same collective config", c.rank, off, off+n, exp.describe(""), from, got.Offset, got.Length)}
	}
	return nil
}

func checkBuf(name string, b Buffer) error {
	if b == nil {
		return fmt.Errorf("%w: %s: buffer is nil", ErrBadArgument, name)
	}
	if !b.DType().Valid() {
		return fmt.Errorf("%w: %s: %v", ErrBadDType, name, b.DType())
	}
	return nil
}

func checkOp(name string, op Op) error {
	if !op.Valid() {
		return fmt.Errorf("%w: %s: %v", ErrBadOp, name, op)
	}
	return nil
}

// ---- send bookkeeping ----

type sendTracker struct {
	pending atomic.Int64
	kick    chan struct{}
	c       *Communicator
	hold    FrameHold // the caller's, from the operation's context; nil: none
}

func newTracker(ctx context.Context, c *Communicator) *sendTracker {
	h, _ := ctx.Value(frameHoldKey{}).(FrameHold)
	return &sendTracker{kick: make(chan struct{}, 1), c: c, hold: h}
}

// FrameHold keeps an operation's buffer memory alive for the frames that
// reference it. An operation that fails returns without waiting for the
// frames it sent: a peer of this process may still have one queued, or be
// reading the sender's memory through it (frames between ranks of one
// process carry the sender's memory, by reference or as a payload slice of
// it; a lane writer still writes one to its socket). Go memory stays valid
// for them; memory the caller unmaps when the operation returns (the local
// API's shared-memory regions and CUDA IPC mappings) must not be, so such a
// caller runs the operation with WithFrameHold and unmaps only once every
// Hold has been matched by a Release.
//
// Hold is called before each frame is handed to the transport, Release
// when the transport and the receiver are done with it (its SendDone; a
// frame that is never delivered is released when its receiver's endpoint
// closes). Both are called from any goroutine and must not block; Release
// may come after the operation returned.
type FrameHold interface {
	Hold()
	Release()
}

type frameHoldKey struct{}

// WithFrameHold returns a context whose operations report the frames they
// send to h.
func WithFrameHold(ctx context.Context, h FrameHold) context.Context {
	return context.WithValue(ctx, frameHoldKey{}, h)
}

func (t *sendTracker) wait(ctx context.Context) error {
	for t.pending.Load() > 0 {
		select {
		case <-t.kick:
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	return nil
}

// observeReleases orders what the receivers of chunks sent by reference did
// with them (they read this rank's buffer, then released the frame) before
// whatever follows in the calling goroutine. A ring rank writes a range it
// sent by reference only after the chunk went around the ring, so after the
// peer's read; but that order runs through other ranks' sockets, which the
// race detector does not see. The release updated pending (SendDone), so
// loading it makes the order visible; it costs one atomic load.
func (t *sendTracker) observeReleases() { _ = t.pending.Load() }

// sendRec is the per-chunk completion record handed to Endpoint.Send.
type sendRec struct {
	buf   Buffer
	off   int
	n     int
	data  []byte // what buf.ReadChunk returned; nil when byRef
	byRef bool   // sent as a PeerRef only: nothing to release
	tr    *sendTracker
	h     Header
}

var sendRecPool = sync.Pool{New: func() any { return new(sendRec) }}

func (r *sendRec) SendDone() {
	if !r.byRef {
		r.buf.ReleaseChunk(r.off, r.n, r.data)
	}
	tr := r.tr
	r.buf, r.tr, r.data = nil, nil, nil
	sendRecPool.Put(r)
	if tr.hold != nil {
		defer tr.hold.Release()
	}
	tr.c.progress.Add(1)
	if tr.pending.Add(-1) == 0 {
		select {
		case tr.kick <- struct{}{}:
		default:
		}
	}
}

// send reads [off,off+n) of buf and sends it to peer on channel ch. With
// byRef (see Communicator.sendsByRef) it sends only the PeerRef: no read.
func (c *Communicator) send(ctx context.Context, tr *sendTracker, buf Buffer, hdr *Header, peer, ch, off, n int, byRef bool) error {
	var data []byte
	length := n * buf.DType().Size()
	if !byRef {
		var err error
		if data, err = buf.ReadChunk(off, n); err != nil {
			return err
		}
		length = len(data)
	}
	r := sendRecPool.Get().(*sendRec)
	r.buf, r.off, r.n, r.tr, r.byRef, r.data = buf, off, n, tr, byRef, data
	r.h = *hdr
	r.h.Offset = uint64(off)
	r.h.Length = uint32(length)
	tr.pending.Add(1)
	if tr.hold != nil {
		tr.hold.Hold()
	}
	return c.ep.Send(ctx, peer, ch, &r.h, data, PeerRef{Buf: buf, Off: off}, r)
}

// consume applies a received frame to buf: reduce or write.
func consume(buf Buffer, f *InFrame, off, n int, reduce bool, op Op) error {
	if f.Peer.Buf != nil {
		if pr, ok := buf.(PeerReducer); ok {
			var handled bool
			var err error
			if reduce {
				handled, err = pr.PeerReduce(off, f.Peer.Buf, f.Peer.Off, n, op)
			} else {
				handled, err = pr.PeerWrite(off, f.Peer.Buf, f.Peer.Off, n)
			}
			if handled {
				return err
			}
		}
		if byRefFrame(f) {
			return consumeByRef(buf, f, off, n, reduce, op)
		}
	}
	if reduce {
		return buf.ReduceChunk(off, f.Payload, op)
	}
	return buf.WriteChunk(off, f.Payload)
}
