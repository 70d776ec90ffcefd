package collective

import (
	"context"
	"fmt"
	"sync"
	"time"
)

// LocalTransport connects ranks that live in one process. Frames are handed
// over by reference: the receiver reads (or, through PeerReducer, copies
// directly from) the sender's Buffer, so no byte is copied twice. It is also
// the in-memory transport of the unit tests, with fault hooks: SetFault drops
// or delays frames, Kill makes a rank die as if its process was killed.
type LocalTransport struct {
	// QueueDepth is the number of frames that may wait per (peer, channel)
	// before the sender blocks (default 8).
	QueueDepth int

	mu      sync.Mutex
	eps     map[localKey]*localEndpoint
	waiters map[localKey]chan struct{}
	fault   FaultFunc
}

var _ Transport = (*LocalTransport)(nil)

// FaultAction is what a FaultFunc decides for one frame.
type FaultAction struct {
	// Drop loses the frame silently (as a partition would).
	Drop bool
	// Delay holds the sender this long before delivering (order is kept).
	Delay time.Duration
}

// FaultFunc is consulted for every frame sent through a LocalTransport. It is
// called concurrently from the sending goroutines and must not block.
type FaultFunc func(job string, src, dst, ch int, h *Header) FaultAction

type localKey struct {
	job  string
	gen  uint64
	rank int
}

// NewLocalTransport returns an in-process transport.
func NewLocalTransport() *LocalTransport {
	return &LocalTransport{eps: map[localKey]*localEndpoint{}, waiters: map[localKey]chan struct{}{}}
}

// SetFault installs (or, with nil, removes) a fault hook.
func (t *LocalTransport) SetFault(f FaultFunc) {
	t.mu.Lock()
	t.fault = f
	t.mu.Unlock()
}

// Kill makes a rank fail as if its process died: its own operations fail,
// and every peer that exchanges with it sees a broken link.
func (t *LocalTransport) Kill(job string, gen uint64, rank int) {
	t.mu.Lock()
	ep := t.eps[localKey{job, gen, rank}]
	var peers []*localEndpoint
	for k, e := range t.eps {
		if k.job == job && k.gen == gen && k.rank != rank {
			peers = append(peers, e)
		}
	}
	t.mu.Unlock()
	if ep == nil {
		return
	}
	ep.dead.Store(true)
	ep.fail.fail(fmt.Errorf("%w: rank %d was killed", ErrPeerFailed, rank))
	for _, p := range peers {
		p.fail.fail(fmt.Errorf("%w: link to rank %d broke (rank killed)", ErrPeerFailed, rank))
	}
}

// Open implements Transport.
func (t *LocalTransport) Open(spec EndpointSpec) (Endpoint, error) {
	if spec.Rank < 0 || spec.Rank >= len(spec.Addrs) || spec.Channels < 1 {
		return nil, fmt.Errorf("%w: endpoint rank %d of %d ranks, %d channels", ErrBadArgument, spec.Rank, len(spec.Addrs), spec.Channels)
	}
	depth := t.QueueDepth
	if depth <= 0 {
		depth = 8
	}
	n := len(spec.Addrs)
	ep := &localEndpoint{t: t, spec: spec, fail: newFailState(), queues: make([]chan *InFrame, n*spec.Channels)}
	for i := range ep.queues {
		ep.queues[i] = make(chan *InFrame, depth)
	}
	k := localKey{spec.Job, spec.Generation, spec.Rank}
	t.mu.Lock()
	defer t.mu.Unlock()
	if old := t.eps[k]; old != nil && !old.closed.Load() {
		return nil, fmt.Errorf("%w: rank %d of job %q generation %d is already open", ErrBadArgument, spec.Rank, spec.Job, spec.Generation)
	}
	t.eps[k] = ep
	if w := t.waiters[k]; w != nil {
		close(w)
		delete(t.waiters, k)
	}
	return ep, nil
}

func (t *LocalTransport) lookup(ctx context.Context, k localKey, failed <-chan struct{}) (*localEndpoint, error) {
	for {
		t.mu.Lock()
		ep := t.eps[k]
		if ep != nil {
			t.mu.Unlock()
			return ep, nil
		}
		w := t.waiters[k]
		if w == nil {
			w = make(chan struct{})
			t.waiters[k] = w
		}
		t.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return nil, context.Cause(ctx)
		case <-failed:
			return nil, ErrAborted
		}
	}
}

type localEndpoint struct {
	t      *LocalTransport
	spec   EndpointSpec
	fail   *failState
	queues []chan *InFrame
	dead   atomicBool
	closed atomicBool

	peersMu sync.Mutex
	peers   []*localEndpoint
}

var framePool = sync.Pool{New: func() any { return new(InFrame) }}

func releaseLocal(f *InFrame) {
	d := f.owner.(SendDone)
	*f = InFrame{}
	framePool.Put(f)
	d.SendDone()
}

// localFrame wraps payload (and the sender's buffer reference) as a frame
// from rank src handed over in memory; its Release reports done.
func localFrame(h *Header, src int, payload []byte, ref PeerRef, done SendDone) *InFrame {
	f := framePool.Get().(*InFrame)
	f.Header = *h
	f.Header.Src = int32(src)
	f.Header.Length = uint32(len(payload))
	f.segs[0] = payload
	f.Payload = f.segs[:1]
	f.Peer = ref
	f.owner = done
	f.release = releaseLocal
	return f
}

// deliverLocal puts f on the in-memory queue q of rank peer, whose failure
// state is pf (self is the sender's). A closed or failed receiver takes
// nothing more; f is released whenever it is not delivered. where is added
// to the peer-failed error after the rank ("" or " (this process)").
func deliverLocal(ctx context.Context, q chan *InFrame, f *InFrame, self, pf *failState, peer int, where string) error {
	select {
	case <-pf.ch:
		f.Release()
		return fmt.Errorf("%w: rank %d%s failed: %w", ErrPeerFailed, peer, where, pf.Err())
	default:
	}
	var err error
	select {
	case q <- f:
		select {
		case <-pf.ch:
			// The receiver failed or closed meanwhile: a closed one
			// drained its queues already, so this frame (and any other
			// of this sender's still queued) would never be released.
			// A failed receiver's operations fail, so nothing needs them.
			drainLocal(q)
		default:
		}
		return nil
	case <-ctx.Done():
		err = context.Cause(ctx)
	case <-self.ch:
		err = self.Err()
	case <-pf.ch:
		err = fmt.Errorf("%w: rank %d%s failed: %w", ErrPeerFailed, peer, where, pf.Err())
	}
	f.Release()
	return err
}

// drainLocal releases the frames queued in q without reading them.
func drainLocal(q <-chan *InFrame) {
	for {
		select {
		case f := <-q:
			f.Release()
		default:
			return
		}
	}
}

// receiveLocal takes the next frame handed over in memory from q, preferring
// a queued frame to the end of ctx or of the receiving rank (fail).
func receiveLocal(ctx context.Context, q <-chan *InFrame, fail *failState) (*InFrame, error) {
	select {
	case f := <-q:
		return f, nil
	default:
	}
	select {
	case f := <-q:
		return f, nil
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-fail.ch:
		return nil, fail.Err()
	}
}

func (e *localEndpoint) peer(ctx context.Context, p int) (*localEndpoint, error) {
	e.peersMu.Lock()
	if e.peers == nil {
		e.peers = make([]*localEndpoint, len(e.spec.Addrs))
	}
	pe := e.peers[p]
	e.peersMu.Unlock()
	if pe != nil {
		return pe, nil
	}
	pe, err := e.t.lookup(ctx, localKey{e.spec.Job, e.spec.Generation, p}, e.fail.ch)
	if err != nil {
		return nil, err
	}
	e.peersMu.Lock()
	e.peers[p] = pe
	e.peersMu.Unlock()
	return pe, nil
}

func (e *localEndpoint) Send(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	if err := e.Err(); err != nil {
		done.SendDone()
		return err
	}
	pe, err := e.peer(ctx, peer)
	if err != nil {
		done.SendDone()
		return err
	}
	e.t.mu.Lock()
	fault := e.t.fault
	e.t.mu.Unlock()
	if e.dead.Load() || pe.dead.Load() {
		done.SendDone() // a dead process sends nothing; frames to one are lost
		return nil
	}
	if fault != nil {
		a := fault(e.spec.Job, e.spec.Rank, peer, ch, h)
		if a.Delay > 0 {
			tm := time.NewTimer(a.Delay)
			select {
			case <-tm.C:
			case <-ctx.Done():
				tm.Stop()
				done.SendDone()
				return context.Cause(ctx)
			}
		}
		if a.Drop {
			done.SendDone()
			return nil
		}
	}
	if ch >= pe.spec.Channels || len(pe.spec.Addrs) != len(e.spec.Addrs) {
		done.SendDone()
		return &MismatchError{Msg: fmt.Sprintf("rank %d uses %d ranks and %d channels but rank %d uses %d ranks and %d channels: give every rank the same group and collective config",
			e.spec.Rank, len(e.spec.Addrs), e.spec.Channels, peer, len(pe.spec.Addrs), pe.spec.Channels)}
	}
	f := localFrame(h, e.spec.Rank, payload, ref, done)
	return deliverLocal(ctx, pe.queues[e.spec.Rank*pe.spec.Channels+ch], f, e.fail, pe.fail, peer, "")
}

func (e *localEndpoint) Recv(ctx context.Context, peer, ch int) (*InFrame, error) {
	return receiveLocal(ctx, e.queues[peer*e.spec.Channels+ch], e.fail)
}

func (e *localEndpoint) Abort(ctx context.Context, cause error) {
	e.fail.fail(cause)
	if e.dead.Load() {
		return
	}
	msg := abortMessage(cause)
	class := abortClassOf(cause)
	e.t.mu.Lock()
	var peers []*localEndpoint
	for k, p := range e.t.eps {
		if k.job == e.spec.Job && k.gen == e.spec.Generation && k.rank != e.spec.Rank {
			peers = append(peers, p)
		}
	}
	fault := e.t.fault
	e.t.mu.Unlock()
	for _, p := range peers {
		if fault != nil && fault(e.spec.Job, e.spec.Rank, p.spec.Rank, 0, &Header{Kind: FrameAbort}).Drop {
			continue
		}
		p.fail.fail(&RemoteError{Rank: e.spec.Rank, Class: abortClassErr(class), Msg: msg})
	}
}

func (e *localEndpoint) Failed() <-chan struct{} { return e.fail.ch }
func (e *localEndpoint) Err() error              { return e.fail.Err() }

func (e *localEndpoint) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.fail.fail(ErrClosed)
	// Return queued frames to their senders.
	for _, q := range e.queues {
		drainLocal(q)
	}
	e.t.mu.Lock()
	k := localKey{e.spec.Job, e.spec.Generation, e.spec.Rank}
	if e.t.eps[k] == e {
		delete(e.t.eps, k)
	}
	e.t.mu.Unlock()
	return nil
}
