package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// CollectiveConfig says how OpenCollectiveLinks connects a stage to its
// neighbours over the collective data plane (the node's gRPC Service, or a
// LocalTransport in tests).
type CollectiveConfig struct {
	JobID      string
	Generation uint64
	Stage      int
	Stages     int
	// Addrs[s] is the data-plane address ("host:port") of the node running
	// stage s.
	Addrs []string
	// Channels is the number of parallel flows (each a TCP lane, or an
	// HTTP/2 connection with collective.DataPlaneGRPC) per link; messages
	// are cut into ChunkBytes chunks spread over them in turn. Default 4.
	Channels int
	// ChunkBytes is the largest frame. Default 1 MiB (at most
	// collective.MaxFrameBytes).
	ChunkBytes int
	// Ring also links the last stage to the first (StageLinks.Ring), for
	// interleaved schedules.
	Ring bool
}

// DefaultCollectiveConfig returns the defaults of the optional fields.
func DefaultCollectiveConfig() CollectiveConfig {
	return CollectiveConfig{Channels: 4, ChunkBytes: 1 << 20}
}

// Validate checks the config.
func (c *CollectiveConfig) Validate() error {
	switch {
	case c.JobID == "":
		return fmt.Errorf("%w: collective links need a job ID", ErrInvalidSpec)
	case c.Stages < 1 || c.Stage < 0 || c.Stage >= c.Stages:
		return fmt.Errorf("%w: stage %d of %d is out of range", ErrInvalidSpec, c.Stage, c.Stages)
	case len(c.Addrs) != c.Stages:
		return fmt.Errorf("%w: %d addresses for %d stages; give one per stage", ErrInvalidSpec, len(c.Addrs), c.Stages)
	case c.Channels < 1 || c.Channels > 64:
		return fmt.Errorf("%w: channels must be 1..64, got %d", ErrInvalidSpec, c.Channels)
	case c.ChunkBytes < 4096 || c.ChunkBytes > collective.MaxFrameBytes || c.ChunkBytes%4 != 0:
		return fmt.Errorf("%w: chunk bytes must be a multiple of 4 in [4096, %d], got %d", ErrInvalidSpec, collective.MaxFrameBytes, c.ChunkBytes)
	}
	return nil
}

// LinkGroup is the collective group key of the link between stages s and
// s+1 of a job: each link is its own two-rank group (stage s is rank 0), so
// a neighbour that finishes and closes its side affects only that link.
func LinkGroup(jobID string, s int) string {
	return fmt.Sprintf("%s/pipeline-link/%d", jobID, s)
}

// OpenCollectiveLinks opens the stage's links over t. Peers may open theirs
// later: the first transfer waits for them, within the transport's bounds.
func OpenCollectiveLinks(t collective.Transport, cfg CollectiveConfig) (StageLinks, error) {
	d := DefaultCollectiveConfig()
	if cfg.Channels == 0 {
		cfg.Channels = d.Channels
	}
	if cfg.ChunkBytes == 0 {
		cfg.ChunkBytes = d.ChunkBytes
	}
	if err := cfg.Validate(); err != nil {
		return StageLinks{}, err
	}
	var links StageLinks
	open := func(link, rank int) (*CollectiveLink, error) {
		peer := (link + 1) % cfg.Stages
		if rank == 1 {
			peer = link
		}
		ep, err := t.Open(collective.EndpointSpec{
			Job: LinkGroup(cfg.JobID, link), Generation: cfg.Generation, Rank: rank,
			Addrs: []string{cfg.Addrs[link], cfg.Addrs[(link+1)%cfg.Stages]}, Channels: cfg.Channels,
		})
		if err != nil {
			return nil, fmt.Errorf("stage %d: open link to stage %d: %w", cfg.Stage, peer, err)
		}
		return newCollectiveLink(ep, rank, cfg), nil
	}
	if cfg.Stage > 0 {
		l, err := open(cfg.Stage-1, 1)
		if err != nil {
			return links, err
		}
		links.Prev = l
	}
	if cfg.Stage < cfg.Stages-1 {
		l, err := open(cfg.Stage, 0)
		if err != nil {
			links.Close()
			return StageLinks{}, err
		}
		links.Next = l
	}
	if cfg.Ring && cfg.Stages >= 2 && (cfg.Stage == 0 || cfg.Stage == cfg.Stages-1) {
		// Link p−1 joins the last stage (rank 0) to the first (rank 1).
		rank := 0
		if cfg.Stage == 0 {
			rank = 1
		}
		l, err := open(cfg.Stages-1, rank)
		if err != nil {
			links.Close()
			return StageLinks{}, err
		}
		links.Ring = l
	}
	return links, nil
}

// CollectiveLink is a Link over a two-rank collective.Endpoint.
type CollectiveLink struct {
	ep         collective.Endpoint
	peer       int
	channels   int
	chunkElems int
	jobID      string
	group      uint64
	generation uint64
	ctx        context.Context
	cancel     context.CancelFunc
	sendSeq    int // chunks sent, for the channel of the next
	recvSeq    int
	free       recvBuffers // a bufPool, or the stage device's memory (useRecvBuffers)
	rx         recvState   // the message Recv is reassembling
	closeOnce  sync.Once
	// slots bounds the chunks handed to the transport and not yet done
	// with: Send returns once its chunks are queued, not sent.
	slots chan struct{}
}

var (
	_ Link           = (*CollectiveLink)(nil)
	_ Aborter        = (*CollectiveLink)(nil)
	_ recvMemoryUser = (*CollectiveLink)(nil)
)

// useRecvBuffers makes the link receive into b's memory; call it before
// the first Recv.
func (l *CollectiveLink) useRecvBuffers(b recvBuffers) { l.free = b }

func newCollectiveLink(ep collective.Endpoint, rank int, cfg CollectiveConfig) *CollectiveLink {
	ctx, cancel := context.WithCancel(context.Background())
	return &CollectiveLink{
		ep: ep, peer: 1 - rank, channels: cfg.Channels, chunkElems: cfg.ChunkBytes / 4,
		jobID: cfg.JobID, group: collective.GroupHash(cfg.JobID), generation: cfg.Generation,
		ctx: ctx, cancel: cancel, free: newBufPool(),
		slots: make(chan struct{}, 4*cfg.Channels),
	}
}

// slotRelease gives a chunk's slot back when the transport is done with it.
type slotRelease chan struct{}

func (d slotRelease) SendDone() { <-d }

// Send cuts m into chunks, one per channel in turn, and returns once they
// are queued with the transport (at most 4 per channel outstanding); the
// transport reads m.Data until it is done with each chunk, so m.Data must
// not change after Send (the pipeline never changes a sent message).
func (l *CollectiveLink) Send(m *Message) error {
	if err := m.Validate(); err != nil {
		return err
	}
	n := len(m.Data)
	chunks := max(1, (n+l.chunkElems-1)/l.chunkElems)
	payload := f32bytes(m.Data)
	for i := 0; i < chunks; i++ {
		off, end := i*l.chunkElems, min(n, (i+1)*l.chunkElems)
		h := collective.Header{
			Kind: collective.FrameData, Coll: collective.CollSendRecv, DType: collective.Float32,
			Channels: uint16(l.channels), Root: int32(m.Rows), Group: l.group, Generation: m.Tag.Generation,
			Seq: uint64(m.Tag.Step), Count: uint64(n), Offset: uint64(off),
			Tag: uint64(m.Tag.Chunk)<<40 | uint64(uint32(m.Tag.MicroBatch))<<8 | uint64(m.Tag.Dir), ChunkElems: uint64(m.Cols),
			Length: uint32((end - off) * 4),
		}
		select {
		case l.slots <- struct{}{}:
		case <-l.ctx.Done():
			return fmt.Errorf("%w: %v", ErrLinkClosed, l.ctx.Err())
		}
		ch := l.sendSeq % l.channels
		l.sendSeq++
		// The transport calls SendDone exactly once per Send, also on failure.
		if err := l.ep.Send(l.ctx, l.peer, ch, &h, payload[off*4:end*4], collective.PeerRef{}, slotRelease(l.slots)); err != nil {
			return l.linkErr(err)
		}
	}
	return nil
}

// Recv reassembles the next message from its chunks. Over a byte-stream
// link (the data plane's TCP lanes) each chunk is read straight into the
// message; otherwise it is copied out of the received frame.
func (l *CollectiveLink) Recv() (*Message, error) {
	l.rx = recvState{l: l}
	sr, stream := l.ep.(collective.StreamReceiver)
	for {
		ch := l.recvSeq % l.channels
		if stream {
			f, _, err := sr.RecvTo(l.ctx, l.peer, ch, &l.rx)
			if err != nil {
				l.rx.drop()
				return nil, l.linkErr(err)
			}
			l.recvSeq++
			if f != nil {
				err = l.rx.frame(f)
			}
			if err != nil {
				l.rx.drop()
				return nil, err
			}
		} else {
			f, err := l.ep.Recv(l.ctx, l.peer, ch)
			if err != nil {
				l.rx.drop()
				return nil, l.linkErr(err)
			}
			l.recvSeq++
			if err := l.rx.frame(f); err != nil {
				l.rx.drop()
				return nil, err
			}
		}
		if m := l.rx.m; m != nil && l.rx.got == len(m.Data) {
			l.rx = recvState{}
			return m, nil
		}
	}
}

// recvState is the message being reassembled; it is also the
// collective.FrameSink that places each chunk.
type recvState struct {
	l   *CollectiveLink
	m   *Message
	got int // values received
}

var _ collective.FrameSink = (*recvState)(nil)

// Begin implements collective.FrameSink: it checks the chunk against the
// message and returns where its bytes go.
func (r *recvState) Begin(h *collective.Header) ([]byte, error) {
	l := r.l
	tag := Tag{JobID: l.jobID, Generation: h.Generation, Step: int(h.Seq), MicroBatch: int(uint32(h.Tag >> 8)), Chunk: int(h.Tag >> 40), Dir: Direction(h.Tag & 0xff)}
	if h.Group != l.group {
		tag.JobID = fmt.Sprintf("unknown job (hash %016x)", h.Group)
	}
	if r.m == nil {
		if h.Offset != 0 || h.Count > MaxMessageBytes/4 || h.Root < 0 || (h.ChunkElems != 0 && h.Count%h.ChunkElems != 0) {
			return nil, fmt.Errorf("%w: %v: bad first chunk (offset %d, count %d, rows %d, cols %d)", ErrProtocol, tag, h.Offset, h.Count, h.Root, h.ChunkElems)
		}
		r.m = &Message{Tag: tag, Rows: int(h.Root), Cols: int(h.ChunkElems), Data: l.buffer(int(h.Count)), release: l.recycle}
	} else if tag != r.m.Tag || int(h.Offset) != r.got || int(h.Count) != len(r.m.Data) {
		return nil, fmt.Errorf("%w: chunk of %v (offset %d) inside %v at offset %d", ErrProtocol, tag, h.Offset, r.m.Tag, r.got)
	}
	n := int(h.Length)
	if n%4 != 0 || r.got*4+n > len(r.m.Data)*4 {
		return nil, fmt.Errorf("%w: %v: chunks overflow %d values", ErrProtocol, r.m.Tag, len(r.m.Data))
	}
	dst := f32bytes(r.m.Data)[r.got*4 : r.got*4+n]
	r.got += n / 4
	return dst, nil
}

// Piece implements collective.FrameSink (never used: Begin always gives a
// destination).
func (r *recvState) Piece(int, []byte) error {
	return fmt.Errorf("%w: unexpected piece", ErrProtocol)
}

// frame places a chunk that arrived as a frame.
func (r *recvState) frame(f *collective.InFrame) error {
	defer f.Release()
	h := f.Header
	h.Length = uint32(f.Payload.Len())
	dst, err := r.Begin(&h)
	if err != nil {
		return err
	}
	f.Payload.CopyTo(dst)
	return nil
}

// drop gives a partly received message's buffer back.
func (r *recvState) drop() {
	if r.m != nil {
		r.m.Release()
	}
	*r = recvState{}
}

func (l *CollectiveLink) buffer(n int) []float32 { return l.free.get(n) }

func (l *CollectiveLink) recycle(b []float32) { l.free.put(b) }

func (l *CollectiveLink) linkErr(err error) error {
	if errors.Is(err, collective.ErrClosed) || errors.Is(err, context.Canceled) {
		return fmt.Errorf("%w: %v", ErrLinkClosed, err)
	}
	return err
}

// Abort tells the peer that this side failed with cause (bounded by 2 s),
// then closes the link.
func (l *CollectiveLink) Abort(cause error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	l.ep.Abort(ctx, cause)
	l.Close()
}

// Close closes the link's endpoint.
func (l *CollectiveLink) Close() error {
	var err error
	l.closeOnce.Do(func() {
		l.cancel()
		err = l.ep.Close()
	})
	return err
}
