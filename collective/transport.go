package collective

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"

	"google.golang.org/grpc/mem"
)

// Transport connects the ranks of a group. Implementations: NetTransport
// (the data plane between nodes; see Service) and LocalTransport (ranks in one
// process: zero-copy, with fault hooks for tests).
type Transport interface {
	// Open creates rank's endpoint for the group. Peers' endpoints may be
	// opened later (or in other processes): frames sent to a peer that has
	// not opened yet wait for it, bounded by the operation's context.
	Open(spec EndpointSpec) (Endpoint, error)
}

// EndpointSpec identifies one rank of one group.
type EndpointSpec struct {
	// Job and Generation key the group; ranks of different generations never
	// exchange data.
	Job        string
	Generation uint64
	// Rank is this endpoint's rank, Addrs[i] the address ("host:port") of
	// the node serving rank i (several ranks may share one address).
	Rank  int
	Addrs []string
	// Channels is the number of parallel links to each peer.
	Channels int
}

// SendDone is told, exactly once per Endpoint.Send call (also when Send
// fails), that the transport no longer references the payload.
type SendDone interface{ SendDone() }

// PeerRef says where a payload lives in the sender's Buffer, for transports
// that can hand the receiver the sender's memory (ranks in one process).
type PeerRef struct {
	Buf Buffer
	Off int
}

// Endpoint is one rank's view of its links.
//
// Threading: Send for a given (peer, ch) and Recv for a given (peer, ch) are
// each called by one goroutine at a time; different (peer, ch) pairs are used
// concurrently. Frames on one (peer, ch) arrive in the order they were sent.
type Endpoint interface {
	// Send transmits a frame to peer on channel ch. payload is borrowed
	// until done.SendDone() is called; Send may return before that. It
	// blocks while the link is full (flow control) and returns early if ctx
	// ends or the endpoint fails.
	Send(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error
	// Recv returns the next frame from peer on channel ch. The caller must
	// call Release on it.
	Recv(ctx context.Context, peer, ch int) (*InFrame, error)
	// Abort tells every peer (best effort, bounded by ctx) that this rank
	// failed with cause, and fails this endpoint. Peers fail with a
	// *RemoteError that carries cause's text and class (ErrMismatch,
	// ErrTimeout, ...).
	Abort(ctx context.Context, cause error)
	// Failed is closed once the endpoint failed: a link broke, a peer sent an
	// abort, or Abort was called. Err then returns the cause.
	Failed() <-chan struct{}
	Err() error
	// Close releases the links. It is safe to call more than once.
	Close() error
}

// StreamReceiver is implemented by endpoints whose frames can arrive as a
// byte stream (NetTransport's TCP lanes): the receiver places a
// frame's payload itself, straight into its destination or piece by piece
// through a small cache-resident buffer, instead of getting a pooled copy.
// The same threading rules as Recv apply.
type StreamReceiver interface {
	// RecvTo receives the next frame from peer on channel ch. Where the
	// frame arrives on a byte stream, RecvTo reads its header, calls
	// sink.Begin, then moves the payload as Begin asked, and returns a nil
	// frame and the header. Where it cannot (frames handed over in memory,
	// links on gRPC streams) it returns the frame as Recv would, without
	// calling sink; the caller then handles and releases it. An error from
	// the sink fails the link: the rest of the frame is not read.
	RecvTo(ctx context.Context, peer, ch int, sink FrameSink) (*InFrame, Header, error)
}

// FrameSink places one frame's payload for StreamReceiver.RecvTo.
type FrameSink interface {
	// Begin checks the header and says where the payload goes: dst
	// (len(dst) == h.Length) to read it there directly, or nil to get it
	// through Piece.
	Begin(h *Header) (dst []byte, err error)
	// Piece receives the payload in order, p being bytes [off, off+len(p))
	// of it; every piece but the last is a multiple of 64 bytes long. p is
	// reused after Piece returns.
	Piece(off int, p []byte) error
}

// InFrame is a received frame.
type InFrame struct {
	Header  Header
	Payload Segments
	// Peer is set by in-process transports: the payload is Peer.Buf's
	// elements starting at Peer.Off (see PeerReducer).
	Peer PeerRef

	segs    [1][]byte
	bufs    []mem.Buffer
	release func(*InFrame)
	owner   any
}

// Release returns the frame's memory to its transport.
func (f *InFrame) Release() {
	if f.release != nil {
		f.release(f)
	}
}

// failState is the shared "failed once, with a cause" latch of endpoints.
type failState struct {
	once sync.Once
	ch   chan struct{}
	mu   sync.Mutex
	err  error
}

func newFailState() *failState { return &failState{ch: make(chan struct{})} }

func (f *failState) fail(err error) {
	f.once.Do(func() {
		f.mu.Lock()
		f.err = err
		f.mu.Unlock()
		close(f.ch)
	})
}

func (f *failState) Err() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err
}

// RemoteError is how a rank learns that another rank failed the group: it
// names the rank and wraps the same class of error (ErrMismatch, ErrTimeout,
// ErrPeerFailed, ErrAborted), so errors.Is works across ranks.
type RemoteError struct {
	Rank  int
	Class error
	Msg   string
}

func (e *RemoteError) Error() string {
	return fmt.Sprintf("%s (reported by rank %d)", e.Msg, e.Rank)
}

// Unwrap returns the error class.
func (e *RemoteError) Unwrap() error { return e.Class }

// abortClasses are the error classes that travel between ranks. The index
// is the class's number on the wire (an abort frame's Tag, a lane's failure
// byte); the reason names it in the status that ends a Link stream
// (netstatus.go). Append only: both are wire formats.
var abortClasses = []struct {
	err    error
	reason string
}{
	{nil, "UNKNOWN"},
	{ErrMismatch, "MISMATCH"},
	{ErrTimeout, "TIMEOUT"},
	{ErrPeerFailed, "PEER_FAILED"},
	{ErrAborted, "ABORTED"},
	{ErrClosed, "CLOSED"},
	{ErrStaleGeneration, "STALE_GENERATION"},
	{ErrCheckFailed, "CHECK_FAILED"},
}

// abortClassOf is the class number of err (0: none of abortClasses).
func abortClassOf(err error) uint64 {
	for i := 1; i < len(abortClasses); i++ {
		if errors.Is(err, abortClasses[i].err) {
			return uint64(i)
		}
	}
	return 0
}

// abortClassErr is the error of class number c; an unknown class is
// ErrPeerFailed.
func abortClassErr(c uint64) error {
	if c > 0 && c < uint64(len(abortClasses)) {
		return abortClasses[c].err
	}
	return ErrPeerFailed
}

// abortMessage bounds and cleans an abort reason for the wire.
func abortMessage(err error) string {
	var re *RemoteError
	msg := err.Error()
	if errors.As(err, &re) {
		msg = re.Msg
	}
	if len(msg) > maxAbortLength {
		msg = msg[:maxAbortLength]
	}
	return strings.ToValidUTF8(msg, "?")
}
