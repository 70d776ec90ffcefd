package pipeline

import (
	"errors"
	"fmt"
	"sync"
)

// Direction says which way a transfer goes.
type Direction uint8

// Directions of transfers between neighbouring stages.
const (
	// DirActivation is a forward activation, from stage s to s+1.
	DirActivation Direction = 1
	// DirGradient is a backward gradient, from stage s+1 to s.
	DirGradient Direction = 2
	// DirFinish ends a link: each side sends it after its last transfer and
	// closes the link once it has the peer's, so no data is in flight when
	// a link goes away.
	DirFinish Direction = 3
)

func (d Direction) String() string {
	switch d {
	case DirActivation:
		return "activation"
	case DirGradient:
		return "gradient"
	case DirFinish:
		return "finish"
	}
	return fmt.Sprintf("Direction(%d)", uint8(d))
}

// Tag identifies a transfer. A receiver checks every field against what its
// schedule expects, so traffic of another job, an older generation, another
// step or micro-batch is refused, never used.
type Tag struct {
	JobID      string
	Generation uint64
	Step       int
	MicroBatch int
	// Chunk is the receiving model chunk of interleaved schedules; 0
	// otherwise.
	Chunk int
	Dir   Direction
}

func (t Tag) String() string {
	if t.Chunk != 0 {
		return fmt.Sprintf("job %q gen %d step %d micro-batch %d chunk %d %s", t.JobID, t.Generation, t.Step, t.MicroBatch, t.Chunk, t.Dir)
	}
	return fmt.Sprintf("job %q gen %d step %d micro-batch %d %s", t.JobID, t.Generation, t.Step, t.MicroBatch, t.Dir)
}

// Message is one tensor transfer: a row-major Rows×Cols float32 matrix.
type Message struct {
	Tag        Tag
	Rows, Cols int
	Data       []float32

	// release, when set, gives Data back to the link that received it.
	release func([]float32)
	// ready and sent are set on messages whose Data a device fills
	// asynchronously (AsyncDevice): the endpoint's sender goroutine waits
	// with ready before the link reads Data, and calls sent once the link
	// no longer needs Data, giving the device its staging memory back.
	ready func() error
	sent  func()
}

// copyingLink is a Link whose Send is done with m.Data when it returns (it
// wrote or copied it); Data staged by a device can then be reused at once.
// Over other links the endpoint copies staged data before sending.
type copyingLink interface {
	Link
	sendCopies()
}

// detach waits for a staged message's data and, unless the link copies on
// Send, replaces it with a copy of its own so the staging memory can go back
// to the device now. It returns whether m.sent is still due after Send.
func (m *Message) detach(l Link) (sentDue bool, err error) {
	if m.ready != nil {
		err = m.ready()
		m.ready = nil
	}
	if m.sent == nil {
		return false, err
	}
	if _, ok := l.(copyingLink); ok && err == nil {
		return true, nil
	}
	if err == nil {
		m.Data = append([]float32(nil), m.Data...)
	}
	m.finishSend()
	return false, err
}

// finishSend calls m.sent once.
func (m *Message) finishSend() {
	if m.sent != nil {
		f := m.sent
		m.sent = nil
		f()
	}
}

// Release hands a received message's memory back to its link for reuse;
// the message must not be used afterwards. Releasing is optional (memory
// not released is garbage collected) and safe to call twice.
func (m *Message) Release() {
	if m.release != nil {
		r := m.release
		m.release = nil
		r(m.Data)
		m.Data = nil
	}
}

// Validate checks the shape against the data.
func (m *Message) Validate() error {
	if m.Rows < 0 || m.Cols < 0 || m.Rows*m.Cols != len(m.Data) {
		return fmt.Errorf("%w: %v: shape %d×%d does not match %d values", ErrProtocol, m.Tag, m.Rows, m.Cols, len(m.Data))
	}
	return nil
}

var (
	// ErrLinkClosed is returned by a Link used after Close or after its
	// peer went away.
	ErrLinkClosed = errors.New("pipeline link closed")
	// ErrProtocol means a peer sent something the schedule does not
	// expect: another job or generation, the wrong micro-batch, a bad frame.
	ErrProtocol = errors.New("pipeline protocol error")
)

// Link is an ordered, reliable, bidirectional message pipe between two
// neighbouring stages. Messages sent on one end arrive on the other in
// order. Send may be called from one goroutine while Recv is called from
// another; neither is called concurrently with itself. Close unblocks both
// and may be called more than once, from any goroutine.
type Link interface {
	// Send transmits m. It may block while the peer is not reading (flow
	// control). It may read m.Data after it returns (until the data is on
	// its way), so the caller must not change m.Data after Send.
	Send(m *Message) error
	// Recv returns the next message from the peer.
	Recv() (*Message, error)
	Close() error
}

// Aborter is implemented by links that can tell the peer why this side
// gives up (the collective data plane sends an abort frame); RunStage calls
// Abort on a failure before it closes the link, so the neighbour fails at
// once with the cause instead of waiting for its receive timeout.
type Aborter interface {
	Abort(cause error)
}

// MemLink is one end of an in-memory Link pair, for tests. Its FailSend and
// FailRecv hooks (set before use) inject errors.
type MemLink struct {
	in, out chan *Message
	closed  chan struct{}
	peer    *MemLink
	once    sync.Once

	// FailSend, when set, is called before every Send; a non-nil error is
	// returned instead of sending.
	FailSend func(m *Message) error
	// FailRecv, when set, is called on every received message; a non-nil
	// error is returned instead of it.
	FailRecv func(m *Message) error
}

var _ copyingLink = (*MemLink)(nil)

func (*MemLink) sendCopies() {}

// NewMemLinkPair returns the two ends of an in-memory link. Each direction
// buffers up to buffer messages before Send blocks (0: Send waits for Recv).
func NewMemLinkPair(buffer int) (*MemLink, *MemLink) {
	ab := make(chan *Message, buffer)
	ba := make(chan *Message, buffer)
	a := &MemLink{in: ba, out: ab, closed: make(chan struct{})}
	b := &MemLink{in: ab, out: ba, closed: make(chan struct{})}
	a.peer, b.peer = b, a
	return a, b
}

// Send copies m (as a network would) and delivers it.
func (l *MemLink) Send(m *Message) error {
	if l.FailSend != nil {
		if err := l.FailSend(m); err != nil {
			return err
		}
	}
	c := *m
	c.Data = append([]float32(nil), m.Data...)
	select {
	case <-l.closed:
		return ErrLinkClosed
	case <-l.peer.closed:
		return ErrLinkClosed
	default:
	}
	select {
	case l.out <- &c:
		return nil
	case <-l.closed:
		return ErrLinkClosed
	case <-l.peer.closed:
		return ErrLinkClosed
	}
}

// Recv returns the next message.
func (l *MemLink) Recv() (*Message, error) {
	select {
	case m := <-l.in:
		if l.FailRecv != nil {
			if err := l.FailRecv(m); err != nil {
				return nil, err
			}
		}
		return m, nil
	case <-l.closed:
		return nil, ErrLinkClosed
	case <-l.peer.closed:
		// Deliver what the peer sent before it closed.
		select {
		case m := <-l.in:
			return m, nil
		default:
			return nil, ErrLinkClosed
		}
	}
}

// Close closes this end; the peer's calls fail once it has drained.
func (l *MemLink) Close() error {
	l.once.Do(func() { close(l.closed) })
	return nil
}

// StageLinks are a stage's links to its neighbours: Prev is nil on the first
// stage and Next nil on the last. Ring joins the last stage to the first,
// for interleaved schedules only (nil otherwise, and on other stages).
type StageLinks struct {
	Prev, Next Link
	Ring       Link
}

// Abort aborts (where the link can) and closes both links.
func (s StageLinks) Abort(cause error) {
	for _, l := range []Link{s.Prev, s.Next, s.Ring} {
		if a, ok := l.(Aborter); ok {
			a.Abort(cause)
		}
	}
	s.Close()
}

// Close closes both links.
func (s StageLinks) Close() {
	if s.Prev != nil {
		s.Prev.Close()
	}
	if s.Next != nil {
		s.Next.Close()
	}
	if s.Ring != nil {
		s.Ring.Close()
	}
}

// NewMemPipelineRing is NewMemPipeline plus the ring link between the last
// and the first stage, for interleaved schedules (stages >= 2).
func NewMemPipelineRing(stages, buffer int) []StageLinks {
	out := NewMemPipeline(stages, buffer)
	if stages >= 2 {
		a, b := NewMemLinkPair(buffer)
		out[stages-1].Ring = a
		out[0].Ring = b
	}
	return out
}

// NewMemPipeline returns in-memory links for stages stages: element s is
// stage s's StageLinks.
func NewMemPipeline(stages, buffer int) []StageLinks {
	out := make([]StageLinks, stages)
	for s := 0; s+1 < stages; s++ {
		a, b := NewMemLinkPair(buffer)
		out[s].Next = a
		out[s+1].Prev = b
	}
	return out
}

// recvBuffers hands out the memory a link receives messages into and takes
// it back (Message.Release). Safe for concurrent use.
type recvBuffers interface {
	// get returns a buffer of n values.
	get(n int) []float32
	// put gives back a buffer from get; it must not be used afterwards.
	put(b []float32)
}

// recvMemoryUser is a Link that can receive into memory lent by the
// stage's device (pinnedRecv), set before the link is used.
type recvMemoryUser interface {
	Link
	useRecvBuffers(recvBuffers)
}

// bufPool keeps released receive buffers of a link for reuse.
type bufPool chan []float32

var _ recvBuffers = bufPool(nil)

func newBufPool() bufPool { return make(bufPool, 16) }

// get returns a buffer of n values, reused when a large enough one is free.
func (p bufPool) get(n int) []float32 {
	for {
		select {
		case b := <-p:
			if cap(b) >= n {
				return b[:n]
			}
			// Too small: drop it and look further.
		default:
			return make([]float32, n)
		}
	}
}

// put offers b for reuse; a full pool drops it.
func (p bufPool) put(b []float32) {
	select {
	case p <- b:
	default:
	}
}
