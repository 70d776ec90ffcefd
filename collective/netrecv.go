package collective

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
)

// The receiving side of a link: the receiving rank reads its inbound
// stream or lane itself, into a pooled buffer (Recv) or straight into its
// destination (RecvTo with a FrameSink).

// Recv implements Endpoint: it reads the inbound stream (or lane)
// directly.
func (e *netEndpoint) Recv(ctx context.Context, peer, ch int) (*InFrame, error) {
	f, _, err := e.RecvTo(ctx, peer, ch, nil)
	return f, err
}

var laneFramePool = sync.Pool{New: func() any { return new(InFrame) }}

func releaseLane(f *InFrame) {
	if bp, ok := f.owner.(*[]byte); ok {
		sharedDirtyPool.Put(bp)
	}
	f.segs[0] = nil
	f.Payload, f.owner, f.release = nil, nil, nil
	laneFramePool.Put(f)
}

// RecvTo implements StreamReceiver. With a nil sink it is Recv: a lane's
// payload is read into a pooled buffer.
func (e *netEndpoint) RecvTo(ctx context.Context, peer, ch int, sink FrameSink) (*InFrame, Header, error) {
	if e.local[peer] {
		f, err := receiveLocal(ctx, e.lq[peer*e.spec.Channels+ch], e.fail)
		if err != nil {
			return nil, Header{}, err
		}
		return f, f.Header, nil
	}
	sl := e.slot(peer, ch)
	select {
	case <-sl.ready:
	default:
		select {
		case <-sl.ready:
		case <-ctx.Done():
			return nil, Header{}, context.Cause(ctx)
		case <-e.fail.ch:
			return nil, Header{}, e.fail.Err()
		}
	}
	if err := e.fail.Err(); err != nil {
		return nil, Header{}, err
	}
	if sl.lane == nil {
		f, err := e.recvStream(sl, peer, ch)
		if err != nil {
			return nil, Header{}, err
		}
		return f, f.Header, nil
	}
	l := sl.lane
	h, err := l.readHeader(ctx)
	if err != nil {
		if !errors.As(err, new(*laneBroken)) && !errors.Is(err, context.Cause(ctx)) {
			sl.finish()
		}
		return nil, h, e.laneErr(ctx, "from", peer, ch, err)
	}
	n := int(h.Length)
	if sink == nil {
		f := laneFramePool.Get().(*InFrame)
		f.Header = h
		f.Payload = f.segs[:0]
		if n > 0 {
			bp := sharedDirtyPool.Get(n)
			if err := l.readFull(ctx, *bp, true); err != nil {
				sharedDirtyPool.Put(bp)
				laneFramePool.Put(f)
				return nil, h, e.laneErr(ctx, "from", peer, ch, err)
			}
			f.segs[0] = *bp
			f.Payload = f.segs[:1]
			f.owner = bp
		}
		f.release = releaseLane
		return f, h, nil
	}
	l.rh = h // a field, not &h: the header would escape to the heap per frame
	dst, err := sink.Begin(&l.rh)
	if err != nil {
		l.rbroken = true // the rest of the frame stays unread
		return nil, h, err
	}
	if dst != nil {
		if len(dst) != n {
			l.rbroken = true
			return nil, h, fmt.Errorf("%w: frame sink gave %d bytes for a %d-byte payload", ErrBadArgument, len(dst), n)
		}
		err = l.readFull(ctx, dst, true)
	} else {
		err = l.readPieces(ctx, n, sink)
	}
	if err != nil {
		return nil, h, e.laneErr(ctx, "from", peer, ch, err)
	}
	return nil, h, nil
}

func (e *netEndpoint) recvStream(sl *inSlot, peer, ch int) (*InFrame, error) {
	f := grpcFramePool.Get().(*InFrame)
	if err := sl.stream.RecvMsg(f); err != nil {
		grpcFramePool.Put(f)
		sl.finish()
		if ferr := e.fail.Err(); ferr != nil {
			return nil, ferr
		}
		if err == io.EOF {
			err = errors.New("the sender closed it")
		}
		ferr := fmt.Errorf("%w: link from rank %d (channel %d) ended: %v", ErrPeerFailed, peer, ch, err)
		e.fail.fail(ferr)
		return nil, ferr
	}
	return f, nil
}
