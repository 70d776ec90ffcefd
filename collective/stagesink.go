package collective

import "fmt"

// RecvStager is implemented by buffers whose received chunks pass through
// host staging memory on their way in (device memory: pinned slots, then a
// copy to the device and a reduce kernel). On links that deliver a frame as
// a byte stream (StreamReceiver: the TCP lanes) the pipelined collectives
// read the payload straight into the memory BeginRecv returns and then call
// CommitRecv, so the bytes are copied once, socket to staging, instead of
// socket to a pooled buffer to staging (what WriteChunk and ReduceChunk of
// a received frame cost).
//
// The threading contract of Buffer applies: calls for disjoint ranges may
// run concurrently.
type RecvStager interface {
	// BeginRecv returns host memory of exactly n*DType().Size() bytes to
	// receive elements [off, off+n) into, and a token for CommitRecv or
	// AbortRecv, one of which must follow.
	BeginRecv(off, n int) (p []byte, token any, err error)
	// CommitRecv stores (reduce false) or reduces with op (reduce true;
	// OpAvg reduces as a sum) the received bytes into elements [off,
	// off+n), as WriteChunk or ReduceChunk would. Device buffers may return
	// before the work is done (see Buffer); the token is spent either way.
	CommitRecv(off, n int, token any, reduce bool, op Op) error
	// AbortRecv gives back a token whose payload was not received.
	AbortRecv(token any)
}

// stageSink receives a chunk of a RecvStager buffer from a byte-stream link
// straight into the buffer's staging memory.
type stageSink struct {
	c     *Communicator
	exp   *Header
	st    RecvStager
	from  int
	u     unit
	token any
	begun bool
}

var _ FrameSink = (*stageSink)(nil)

// Begin implements FrameSink.
func (s *stageSink) Begin(h *Header) ([]byte, error) {
	if err := s.c.checkHeader(s.exp, h, s.from, s.u.off, s.u.n); err != nil {
		return nil, err
	}
	if s.u.n == 0 {
		return nil, nil // no payload: nothing to stage or apply
	}
	p, tok, err := s.st.BeginRecv(s.u.off, s.u.n)
	if err != nil {
		return nil, err
	}
	s.token, s.begun = tok, true
	return p, nil
}

// Piece implements FrameSink; Begin always gives the whole destination, so
// only an empty payload reaches it (with no pieces).
func (s *stageSink) Piece(off int, p []byte) error {
	return fmt.Errorf("%w: staged receive of elements [%d,%d) got a piece at byte %d", ErrBadArgument, s.u.off, s.u.off+s.u.n, off)
}

// finish applies (err == nil) or gives back (err != nil) what Begin staged.
func (s *stageSink) finish(err error, op Op) error {
	if !s.begun {
		return err
	}
	s.begun = false
	tok := s.token
	s.token = nil
	if err != nil {
		s.st.AbortRecv(tok)
		return err
	}
	return s.st.CommitRecv(s.u.off, s.u.n, tok, s.u.reduce, op)
}
