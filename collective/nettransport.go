package collective

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
)

// The data plane between nodes: NetTransport and its endpoints.
//
// An endpoint's outbound links (netsend.go) are gRPC client streams to the
// peers' Services, each with a TCP lane when the peer serves lanes; its
// inbound links are the streams and lanes its own Service accepted for it
// (service.go), read by the rank itself (netrecv.go). Ranks at this rank's
// own address exchange frames in memory (peerpath.go). This file holds the
// endpoint's state, its lanes, and how it fails and closes.

// NetTransport opens endpoints whose inbound side is served by a Service
// and whose outbound links are gRPC streams, each with a TCP lane unless
// NetConfig.DataPlane is DataPlaneGRPC.
type NetTransport struct {
	svc  *Service
	opts []grpc.DialOption
}

var _ Transport = (*NetTransport)(nil)

// NewNetTransport returns a transport that receives through svc (which
// must be registered on a running *grpc.Server reachable at this node's
// address in every group's Addrs).
func NewNetTransport(svc *Service) *NetTransport {
	return &NetTransport{svc: svc, opts: svc.cfg.dialOptions()}
}

// Open implements Transport.
func (t *NetTransport) Open(spec EndpointSpec) (Endpoint, error) {
	n := len(spec.Addrs)
	if spec.Rank < 0 || spec.Rank >= n || spec.Channels < 1 {
		return nil, fmt.Errorf("%w: endpoint rank %d of %d ranks, %d channels", ErrBadArgument, spec.Rank, n, spec.Channels)
	}
	ep := &netEndpoint{
		t: t, spec: spec, n: n, fail: newFailState(),
		slots: make([]*inSlot, n*spec.Channels),
		links: make([]outLink, n*spec.Channels),
		log:   t.svc.log.With("job", spec.Job, "generation", spec.Generation, "rank", spec.Rank),
	}
	ep.local = make([]bool, n)
	for p := range ep.local {
		ep.local[p] = p != spec.Rank && !t.svc.cfg.NoLocalShortcut && spec.Addrs[p] == spec.Addrs[spec.Rank]
	}
	ep.lq = make([]chan *InFrame, n*spec.Channels)
	ep.lpeers = make([]*netEndpoint, n)
	for p, l := range ep.local {
		if l {
			for ch := 0; ch < spec.Channels; ch++ {
				ep.lq[p*spec.Channels+ch] = make(chan *InFrame, 8)
			}
		}
	}
	if err := t.svc.add(ep); err != nil {
		return nil, err
	}
	return ep, nil
}

// outLink is one outbound link (peer, channel): its connection and stream,
// dialled by the first Send, and its lane when the peer serves lanes. mu
// serialises the Sends of the link.
type outLink struct {
	mu         sync.Mutex
	cc         *grpc.ClientConn
	stream     grpc.ClientStream
	lane       *laneConn // frames go here when set
	cancel     context.CancelFunc
	watchDone  chan struct{}
	peerClosed atomicBool
	// lent are the payloads lent to gRPC on this link whose SendDone may
	// not have been reported yet; Close reports those gRPC never frees.
	lent []*lentPayload
}

// maxLent bounds lent before the reported ones are pruned.
const maxLent = 64

// lend records that done's payload is lent to gRPC; called with mu held.
func (l *outLink) lend(done SendDone) *lentPayload {
	if len(l.lent) >= maxLent {
		kept := l.lent[:0]
		for _, p := range l.lent {
			if !p.ended.Load() {
				kept = append(kept, p)
			}
		}
		clear(l.lent[len(kept):])
		l.lent = kept
	}
	p := &lentPayload{done: done}
	l.lent = append(l.lent, p)
	return p
}

// lentGrace is how long after a link's connection is closed its lent
// payloads that gRPC has not given back are ended by the endpoint. gRPC
// gives its connection's writer 5 s to finish before it closes the socket
// under it; the same wait here keeps a payload's memory from being released
// while a writer that is still running may read it.
var lentGrace = 5 * time.Second

// endLent hands the link's lent payloads over to be ended: at once those
// gRPC gives back itself (a live writer frees a cancelled stream's frames),
// after lentGrace the rest (frames a writer that exited on a broken
// connection never freed). Called with mu held, once the link's connection
// is closed.
func (l *outLink) endLent() {
	lent := l.lent
	l.lent = nil
	for _, p := range lent {
		if !p.ended.Load() {
			time.AfterFunc(lentGrace, func() {
				for _, p := range lent {
					p.end()
				}
			})
			return
		}
	}
}

// netEndpoint is a rank's Endpoint on NetTransport: outbound links by
// (peer, channel), inbound slots filled by the Service, in-memory queues for
// ranks of this process, and the failure state they all share.
type netEndpoint struct {
	t      *NetTransport
	spec   EndpointSpec
	n      int
	fail   *failState
	closed atomicBool
	log    hclog.Logger

	qmu   sync.Mutex
	slots []*inSlot
	links []outLink
	// Ranks served by this same process (same address) exchange frames in
	// memory, by reference, instead of over TCP: local[p] says which.
	local   []bool
	lq      []chan *InFrame
	lpeers  []*netEndpoint
	cancels []context.CancelFunc
	wg      sync.WaitGroup

	// lanes are every lane of this endpoint, both directions (under qmu);
	// lanesShut says they were closed (the endpoint failed or closed).
	lanes     []*laneConn
	lanesShut bool
}

// addLane records l so that a failure closes it; it reports false (and
// closes l) when the endpoint has already failed.
func (e *netEndpoint) addLane(l *laneConn) bool {
	e.qmu.Lock()
	shut := e.lanesShut
	if !shut {
		e.lanes = append(e.lanes, l)
	}
	e.qmu.Unlock()
	if shut {
		_ = l.close()
	}
	return !shut
}

// attachLane is the Service's side: l carries the frames of slot sl.
func (e *netEndpoint) attachLane(sl *inSlot, l *laneConn) bool {
	if !e.addLane(l) {
		return false
	}
	if !sl.attachLane(l) {
		_ = l.close()
		return false
	}
	return true
}

// shutLanes closes every lane (teardown, after the peers were told why):
// blocked reads and writes return at once. A
// sender's data already written stays in the kernel and is still
// delivered (a lane carries data one way only).
func (e *netEndpoint) shutLanes() {
	e.qmu.Lock()
	lanes := e.lanes
	e.lanes, e.lanesShut = nil, true
	e.qmu.Unlock()
	for _, l := range lanes {
		_ = l.close()
	}
}

func (e *netEndpoint) slot(src, ch int) *inSlot {
	e.qmu.Lock()
	defer e.qmu.Unlock()
	i := src*e.spec.Channels + ch
	if e.slots[i] == nil {
		e.slots[i] = &inSlot{ready: make(chan struct{}), readerDone: make(chan struct{})}
	}
	return e.slots[i]
}

// laneErr turns a lane I/O error into the endpoint's error; a lane cut in
// the middle of a frame, or broken, fails the endpoint.
func (e *netEndpoint) laneErr(ctx context.Context, what string, peer, ch int, err error) error {
	if ferr := e.fail.Err(); ferr != nil {
		return ferr
	}
	var lb *laneBroken
	broken := errors.As(err, &lb)
	if ctx.Err() != nil && (!broken || errors.Is(err, context.Cause(ctx))) {
		// Cancelled. A lane cut mid-frame stays marked broken: using it
		// again fails the endpoint (a cancelled collective aborts the
		// communicator anyway).
		return context.Cause(ctx)
	}
	if !broken && errors.Is(err, io.EOF) {
		err = errors.New("the sender closed it")
	}
	ferr := fmt.Errorf("%w: data lane %s rank %d at %s (channel %d): %w", ErrPeerFailed, what, peer, e.spec.Addrs[peer], ch, err)
	e.fail.fail(ferr)
	if f := e.fail.Err(); f != nil {
		return f
	}
	return ferr
}

// Abort implements Endpoint: one short control stream to every peer.
func (e *netEndpoint) Abort(ctx context.Context, cause error) {
	e.fail.fail(cause)
	msg := []byte(abortMessage(cause))
	h := Header{Kind: FrameAbort, Tag: abortClassOf(cause), Generation: e.spec.Generation, Group: GroupHash(e.spec.Job), Src: int32(e.spec.Rank), Length: uint32(len(msg))}
	frame := AppendFrame(nil, &h, msg)
	var wg sync.WaitGroup
	for p := 0; p < e.n; p++ {
		if p == e.spec.Rank {
			continue
		}
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			cc, stream, cancel, err := e.dial(ctx, ctx, p, controlChannel)
			if err != nil {
				return
			}
			defer func() { cancel(); _ = cc.Close() }()
			m := &outMsg{whole: frame}
			if stream.SendMsg(m) == nil && stream.CloseSend() == nil {
				var f InFrame
				_ = stream.RecvMsg(&f) // until the peer has read it (or ctx ends)
			}
		}(p)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		<-done // dial and streams end with ctx
	}
	e.teardown()
}

// teardown cancels every link's stream, which unblocks senders stuck on
// flow control, and closes every lane; the links are unusable afterwards.
func (e *netEndpoint) teardown() {
	e.qmu.Lock()
	cancels := e.cancels
	e.cancels = nil
	e.qmu.Unlock()
	for _, c := range cancels {
		c()
	}
	e.shutLanes()
}

func (e *netEndpoint) Failed() <-chan struct{} { return e.fail.ch }
func (e *netEndpoint) Err() error              { return e.fail.Err() }

// Close implements Endpoint.
func (e *netEndpoint) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.t.svc.remove(e)
	e.fail.fail(ErrClosed) // our inbound handlers return: peers see a clean end
	// Half-close every outbound link and give the receivers until they close
	// their endpoints (at most CloseWait) to read what is still buffered:
	// cancelling a stream discards its unread data.
	wctx, wcancel := context.WithTimeout(context.Background(), e.t.svc.cfg.CloseWait)
	defer wcancel()
	for i := range e.links {
		l := &e.links[i]
		l.mu.Lock()
		if l.stream != nil {
			_ = l.stream.CloseSend()
		}
		l.mu.Unlock()
	}
	for i := range e.links {
		l := &e.links[i]
		if l.watchDone == nil {
			continue
		}
		select {
		case <-l.watchDone:
		case <-wctx.Done():
		}
	}
	for i := range e.links {
		l := &e.links[i]
		l.mu.Lock()
		if l.stream != nil {
			l.cancel()
			_ = l.cc.Close()
			l.stream = nil
		}
		l.endLent()
		if l.lane != nil {
			_ = l.lane.close()
			l.lane = nil
		}
		l.mu.Unlock()
	}
	e.teardown()
	e.wg.Wait()
	for _, q := range e.lq { // give queued in-process frames back to their senders
		if q != nil {
			drainLocal(q)
		}
	}
	return nil
}
