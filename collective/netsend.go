package collective

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
)

// The sending side of a link: dialling the peer's Service, asking for a
// lane, watching the stream for the link's end, and Send.

var linkDesc = &grpc.StreamDesc{StreamName: "Link", ServerStreams: true, ClientStreams: true}

func (e *netEndpoint) dial(ctx, streamParent context.Context, peer, ch int) (*grpc.ClientConn, grpc.ClientStream, context.CancelFunc, error) {
	addr := e.spec.Addrs[peer]
	cc, err := grpc.NewClient("passthrough:///"+addr, e.t.opts...)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: rank %d address %q: %v", ErrBadArgument, peer, addr, err)
	}
	cc.Connect()
	for {
		st := cc.GetState()
		if st == connectivity.Ready {
			break
		}
		if !cc.WaitForStateChange(ctx, st) {
			_ = cc.Close()
			return nil, nil, nil, fmt.Errorf("%w: cannot reach rank %d at %s: %v", ErrPeerFailed, peer, addr, context.Cause(ctx))
		}
	}
	sctx, cancel := context.WithCancel(streamParent)
	md := metadata.Pairs(mdJob, e.spec.Job, mdGen, strconv.FormatUint(e.spec.Generation, 10),
		mdSrc, strconv.Itoa(e.spec.Rank), mdDst, strconv.Itoa(peer), mdChan, strconv.Itoa(ch))
	if ch != controlChannel && e.t.svc.cfg.DataPlane == DataPlaneTCP {
		md.Append(mdLane, "1")
	}
	stream, err := cc.NewStream(metadata.NewOutgoingContext(sctx, md), linkDesc, linkMethod)
	if err != nil {
		cancel()
		_ = cc.Close()
		return nil, nil, nil, fmt.Errorf("%w: opening link to rank %d at %s: %v", ErrPeerFailed, peer, addr, err)
	}
	return cc, stream, cancel, nil
}

// openLane completes a data link's lane: it waits for the receiver's
// answer on stream (bounded by ctx, which cancels the stream) and connects
// the lane it offers. A nil lane and nil error mean the receiver serves no
// lanes: the link stays on its stream.
//
// If ctx ends first, the stream is left open: the caller hands its cancel
// to teardown, so the receiver sees it end only after this rank's abort.
func (e *netEndpoint) openLane(ctx context.Context, stream grpc.ClientStream, peer int) (*laneConn, error) {
	addr := e.spec.Addrs[peer]
	type answer struct {
		token, unix string
		err         error
	}
	ans := make(chan answer, 1)
	e.wg.Add(1)
	go func() { // ends with the stream (teardown cancels it at the latest)
		defer e.wg.Done()
		md, err := stream.Header()
		if err != nil {
			ans <- answer{err: err}
			return
		}
		if v := md.Get(mdLaneToken); len(v) == 1 {
			a := answer{token: v[0]}
			if u := md.Get(mdLaneUnix); len(u) == 1 {
				a.unix = u[0]
			}
			ans <- a
			return
		}
		// No answer: the stream ended (refused) before it was accepted.
		var f InFrame
		err = stream.RecvMsg(&f)
		if err == nil || err == io.EOF {
			err = errors.New("it ended the link without answering the lane request")
		}
		ans <- answer{err: err}
	}()
	var a answer
	select {
	case a = <-ans:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-e.fail.ch:
		return nil, e.fail.Err()
	}
	if a.err != nil {
		return nil, streamErr(peer, addr, a.err)
	}
	v := []string{a.token}
	if v[0] == laneNone {
		return nil, nil
	}
	tok, ok := parseLaneToken(v[0])
	if !ok {
		return nil, fmt.Errorf("%w: rank %d at %s answered the lane request with a malformed token", ErrPeerFailed, peer, addr)
	}
	lane, err := dialLane(ctx, &e.t.svc.cfg, addr, unixLaneTarget(e.t.svc.cfg.UnixLanes, e.spec.Addrs[e.spec.Rank], addr, a.unix), tok, func(c net.Conn) { e.addLane(newLaneConn(c, c)) })
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		var lf *laneFailed
		if errors.As(err, &lf) {
			return nil, &RemoteError{Rank: peer, Class: abortClassErr(uint64(lf.class)), Msg: lf.msg}
		}
		return nil, fmt.Errorf("%w: data lane to rank %d at %s: %v (to run the data plane over gRPC only, use --data-plane grpc)", ErrPeerFailed, peer, addr, err)
	}
	return lane, nil
}

// watch waits for the end of an outbound link. A clean end (the peer
// closed its endpoint) only marks the link closed; anything else (the peer's
// node went away, refused the generation, ...) fails the endpoint.
func (e *netEndpoint) watch(l *outLink, stream grpc.ClientStream, peer int, done chan struct{}) {
	defer e.wg.Done()
	defer close(done)
	var f InFrame
	err := stream.RecvMsg(&f)
	if e.closed.Load() {
		return
	}
	if err == nil || err == io.EOF {
		l.peerClosed.Store(true)
		return
	}
	if st, class, ok := linkClass(err); ok && st.Code() == codes.Aborted {
		e.fail.fail(&RemoteError{Rank: peer, Class: abortClassErr(class), Msg: st.Message()})
		return
	}
	e.fail.fail(streamErr(peer, e.spec.Addrs[peer], err))
}

// sendLocal hands a frame to a rank of this process by reference: the
// receiver reads the sender's memory (or peer-copies through PeerReducer) and
// its Release reports SendDone.
func (e *netEndpoint) sendLocal(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	e.qmu.Lock()
	pe := e.lpeers[peer]
	e.qmu.Unlock()
	if pe == nil {
		var err error
		pe, err = e.t.svc.wait(ctx, localKey{e.spec.Job, e.spec.Generation, peer})
		if err != nil {
			done.SendDone()
			return streamErr(peer, e.spec.Addrs[peer], err)
		}
		e.qmu.Lock()
		e.lpeers[peer] = pe
		e.qmu.Unlock()
	}
	if pe.spec.Channels != e.spec.Channels || pe.n != e.n {
		done.SendDone()
		return &MismatchError{Msg: fmt.Sprintf("rank %d uses %d ranks and %d channels but rank %d uses %d ranks and %d channels: give every rank the same group and collective config",
			e.spec.Rank, e.n, e.spec.Channels, peer, pe.n, pe.spec.Channels)}
	}
	f := localFrame(h, e.spec.Rank, payload, ref, done)
	return deliverLocal(ctx, pe.lq[e.spec.Rank*pe.spec.Channels+ch], f, e.fail, pe.fail, peer, " (this process)")
}

// Send implements Endpoint.
func (e *netEndpoint) Send(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	if e.local[peer] {
		if err := e.fail.Err(); err != nil {
			done.SendDone()
			return err
		}
		return e.sendLocal(ctx, peer, ch, h, payload, ref, done)
	}
	l := &e.links[peer*e.spec.Channels+ch]
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := e.fail.Err(); err != nil {
		done.SendDone()
		return err
	}
	if l.stream == nil {
		cc, stream, cancel, err := e.dial(ctx, context.Background(), peer, ch)
		if err != nil {
			done.SendDone()
			return err
		}
		var lane *laneConn
		if e.t.svc.cfg.DataPlane == DataPlaneTCP {
			if lane, err = e.openLane(ctx, stream, peer); err != nil {
				// The stream ends in teardown, after the abort (the
				// receiver would otherwise see a broken link first).
				e.qmu.Lock()
				e.cancels = append(e.cancels, func() { cancel(); _ = cc.Close() })
				e.qmu.Unlock()
				done.SendDone()
				return err
			}
		}
		if e.closed.Load() || (lane != nil && !e.addLane(lane)) {
			if lane != nil {
				_ = lane.close()
			}
			cancel()
			_ = cc.Close()
			done.SendDone()
			if err := e.fail.Err(); err != nil && !errors.Is(err, ErrClosed) {
				return err
			}
			return ErrClosed
		}
		l.cc, l.stream, l.cancel, l.lane = cc, stream, cancel, lane
		e.qmu.Lock()
		e.cancels = append(e.cancels, cancel)
		e.qmu.Unlock()
		l.watchDone = make(chan struct{})
		e.wg.Add(1)
		go e.watch(l, stream, peer, l.watchDone)
	}
	if l.peerClosed.Load() {
		done.SendDone()
		return fmt.Errorf("%w: rank %d at %s closed its endpoint", ErrPeerFailed, peer, e.spec.Addrs[peer])
	}
	hh := *h
	hh.Src = int32(e.spec.Rank)
	hh.Length = uint32(len(payload))
	if l.lane != nil {
		// Synchronous: when writeFrame returns, the kernel has the bytes.
		err := l.lane.writeFrame(ctx, &hh, payload)
		done.SendDone()
		if err != nil {
			return e.laneErr(ctx, "to", peer, ch, err)
		}
		return nil
	}
	m := outMsgPool.Get().(*outMsg)
	if mem.IsBelowBufferPoolingThreshold(cap(payload)) {
		m.whole = make([]byte, HeaderSize+len(payload))
		PutHeader(m.whole, &hh)
		copy(m.whole[HeaderSize:], payload)
		err := l.stream.SendMsg(m)
		m.whole = nil
		outMsgPool.Put(m)
		done.SendDone()
		return e.sendErr(peer, err)
	}
	PutHeader(m.hdr[:], &hh)
	m.data = payload
	m.done = l.lend(done)
	return e.sendErr(peer, l.stream.SendMsg(m))
}

func (e *netEndpoint) sendErr(peer int, err error) error {
	if err == nil {
		return nil
	}
	if ferr := e.fail.Err(); ferr != nil {
		return ferr
	}
	return fmt.Errorf("%w: sending to rank %d at %s: %v", ErrPeerFailed, peer, e.spec.Addrs[peer], err)
}
