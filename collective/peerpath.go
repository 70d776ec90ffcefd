package collective

import "fmt"

// Chunks that travel by reference between ranks of one process.
//
// A transport that hands frames to some peers in memory (LocalTransport for
// every peer, NetTransport for ranks served at the same address) sets
// InFrame.Peer on them. When the sending buffer is expensive to read to the
// host (device memory: ReadChunk is a copy to pinned memory and a wait) and
// says so through RefSender, the pipelined collectives send such a chunk as
// its PeerRef only: no ReadChunk, no payload. The receiver moves it through
// PeerReducer (a peer copy or a kernel reading the peer's memory) or, when
// its buffer cannot reach the sender's, reads the chunk itself with the
// sender's ReadChunk. A ring whose ranks span processes thus uses peer moves
// for its hops inside a process and the network for the others.

// RefSender is implemented by buffers whose chunks should go to ranks of the
// same process by reference only (see above). Host buffers do not need it:
// their ReadChunk is a view.
type RefSender interface {
	// SendByRef reports whether chunks may be sent as a PeerRef without
	// payload. The buffer must then serve ReadChunk calls made by the
	// receiving rank's goroutines (the fallback) while the chunk is in
	// flight.
	SendByRef() bool
}

// RefEndpoint is implemented by endpoints that deliver frames to some peers
// in memory, with InFrame.Peer set to the sender's PeerRef.
type RefEndpoint interface {
	// ByRef reports whether frames to peer are handed over in memory.
	ByRef(peer int) bool
}

// ChunkPrefetcher is implemented by buffers whose ReadChunk copies (device
// memory). PrefetchChunk starts the copy that a later ReadChunk(off, n) of
// the same range returns, ordered after every write issued before it, and
// does not wait for it. It is a hint: an implementation may ignore it, and a
// write to the range issued after it must make the later ReadChunk see the
// write (drop the prefetched copy). The pipelined collectives call it for the
// chunk a rank will forward as soon as the receive it depends on is applied.
type ChunkPrefetcher interface {
	PrefetchChunk(off, n int) error
}

// ByRef implements RefEndpoint: every peer of a LocalTransport is in memory.
func (e *localEndpoint) ByRef(int) bool { return true }

// ByRef implements RefEndpoint: ranks served at this address exchange frames
// in memory unless NetConfig.NoLocalShortcut is set.
func (e *netEndpoint) ByRef(peer int) bool {
	return peer >= 0 && peer < len(e.local) && e.local[peer]
}

// ByRef implements RefEndpoint for the wrapped endpoint.
func (e *countingEndpoint) ByRef(peer int) bool { return endpointByRef(e.Endpoint, peer) }

func endpointByRef(ep Endpoint, peer int) bool {
	r, ok := ep.(RefEndpoint)
	return ok && r.ByRef(peer)
}

// sendsByRef reports whether chunks of buf go to peer as a PeerRef only.
func (c *Communicator) sendsByRef(buf Buffer, peer int) bool {
	rs, ok := buf.(RefSender)
	return ok && rs.SendByRef() && endpointByRef(c.ep, peer)
}

// byRefFrame reports whether f carries only a reference to the sender's
// buffer (no payload).
func byRefFrame(f *InFrame) bool {
	return f.Peer.Buf != nil && f.Payload.Len() == 0
}

// checkRefFrame checks a by-reference frame: its header as any frame's (the
// in-memory transports count no payload, so a zero Length stands for the
// chunk's), and that the reference names the expected elements of a buffer
// of the expected dtype.
func (c *Communicator) checkRefFrame(exp *Header, f *InFrame, from, off, n int) error {
	h := f.Header
	if h.Length == 0 {
		h.Length = uint32(n * exp.DType.Size())
	}
	if err := c.checkHeader(exp, &h, from, off, n); err != nil {
		return err
	}
	pb := f.Peer.Buf
	if pb.DType() != exp.DType || f.Peer.Off != off || f.Peer.Off+n > pb.Len() {
		return &MismatchError{Msg: fmt.Sprintf("rank %d expected elements [%d,%d) of %s from rank %d but got a reference to element %d of its %v buffer of %d elements: give every rank the same collective config", c.rank, off, off+n, exp.describe(""), from, f.Peer.Off, pb.DType(), pb.Len())}
	}
	return nil
}

// consumeByRef applies a by-reference frame whose sender's buffer this
// buffer cannot reach directly: it reads the chunk from the sender's buffer.
func consumeByRef(buf Buffer, f *InFrame, off, n int, reduce bool, op Op) error {
	if n == 0 {
		return nil
	}
	src := f.Peer.Buf
	data, err := src.ReadChunk(f.Peer.Off, n)
	if err != nil {
		return err
	}
	defer src.ReleaseChunk(f.Peer.Off, n, data)
	if reduce {
		return buf.ReduceChunk(off, Segments{data}, op)
	}
	return buf.WriteChunk(off, Segments{data})
}
