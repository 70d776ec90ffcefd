package collective

import (
	"context"
	"sync"
	"sync/atomic"
)

// Counters are the data-plane totals of one node: bytes and frames sent and
// received, and operations started, by collective kind. Wrap a Transport
// with CountingTransport to fill them. Safe for concurrent use; reading
// them costs a few atomic loads.
type Counters struct {
	byKind [collEnd]kindCounters
}

type kindCounters struct {
	sentBytes, recvBytes, sentFrames, recvFrames, ops atomic.Uint64
}

// KindCounters is a snapshot of one collective kind's counters.
type KindCounters struct {
	Kind                   CollKind
	SentBytes, RecvBytes   uint64
	SentFrames, RecvFrames uint64
	// Ops counts operations this node's ranks took part in (one per rank
	// and operation that moved at least one frame).
	Ops uint64
}

// Snapshot returns the counters of every kind that has moved data.
func (c *Counters) Snapshot() []KindCounters {
	var out []KindCounters
	for k := CollAllReduce; k < collEnd; k++ {
		kc := &c.byKind[k]
		s := KindCounters{Kind: k, SentBytes: kc.sentBytes.Load(), RecvBytes: kc.recvBytes.Load(),
			SentFrames: kc.sentFrames.Load(), RecvFrames: kc.recvFrames.Load(), Ops: kc.ops.Load()}
		if s.SentFrames+s.RecvFrames+s.Ops > 0 {
			out = append(out, s)
		}
	}
	return out
}

func (c *Counters) kind(k CollKind) *kindCounters {
	if k == 0 || k >= collEnd {
		return nil
	}
	return &c.byKind[k]
}

// CountingTransport wraps t so that every frame its endpoints send or
// receive is counted in c.
func CountingTransport(t Transport, c *Counters) Transport {
	return &countingTransport{t: t, c: c}
}

type countingTransport struct {
	t Transport
	c *Counters
}

func (ct *countingTransport) Open(spec EndpointSpec) (Endpoint, error) {
	ep, err := ct.t.Open(spec)
	if err != nil {
		return nil, err
	}
	return &countingEndpoint{Endpoint: ep, c: ct.c}, nil
}

// countingEndpoint counts frames; an operation is counted when its
// sequence number is first seen on this endpoint.
type countingEndpoint struct {
	Endpoint
	c *Counters

	mu      sync.Mutex
	lastSeq uint64
	seen    bool
}

func (e *countingEndpoint) op(h *Header) {
	e.mu.Lock()
	newOp := !e.seen || h.Seq > e.lastSeq
	if newOp {
		e.seen, e.lastSeq = true, h.Seq
	}
	e.mu.Unlock()
	if newOp {
		if kc := e.c.kind(h.Coll); kc != nil {
			kc.ops.Add(1)
		}
	}
}

func (e *countingEndpoint) Send(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	if h != nil && h.Kind == FrameData {
		e.op(h)
		if kc := e.c.kind(h.Coll); kc != nil {
			kc.sentFrames.Add(1)
			kc.sentBytes.Add(uint64(len(payload)))
		}
	}
	return e.Endpoint.Send(ctx, peer, ch, h, payload, ref, done)
}

func (e *countingEndpoint) Recv(ctx context.Context, peer, ch int) (*InFrame, error) {
	f, err := e.Endpoint.Recv(ctx, peer, ch)
	if err == nil && f != nil {
		e.count(f)
	}
	return f, err
}

func (e *countingEndpoint) count(f *InFrame) {
	if f.Header.Kind == FrameData {
		e.op(&f.Header)
		if kc := e.c.kind(f.Header.Coll); kc != nil {
			kc.recvFrames.Add(1)
			n := uint64(f.Payload.Len())
			if n == 0 && f.Peer.Buf != nil {
				n = uint64(f.Header.Length)
			}
			kc.recvBytes.Add(n)
		}
	}
}

// RecvTo implements StreamReceiver (through the wrapped endpoint when it
// streams, else by Recv).
func (e *countingEndpoint) RecvTo(ctx context.Context, peer, ch int, sink FrameSink) (*InFrame, Header, error) {
	sr, ok := e.Endpoint.(StreamReceiver)
	if !ok {
		f, err := e.Recv(ctx, peer, ch)
		if err != nil {
			return nil, Header{}, err
		}
		return f, f.Header, nil
	}
	f, h, err := sr.RecvTo(ctx, peer, ch, sink)
	if err == nil && f == nil && h.Kind == FrameData {
		e.op(&h)
		if kc := e.c.kind(h.Coll); kc != nil {
			kc.recvFrames.Add(1)
			kc.recvBytes.Add(uint64(h.Length))
		}
	} else if err == nil && f != nil {
		e.count(f)
	}
	return f, h, err
}
