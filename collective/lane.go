package collective

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// TCP lanes: the bulk path of the data plane.
//
// gRPC-Go sends every message as 16 KiB HTTP/2 DATA frames, copied into its
// write buffer and through its writer goroutine and flow-control accounting;
// on a CPU-bound host that costs about half of what plain TCP moves. So, as
// NCCL bootstraps and then uses plain sockets, each data link (sender,
// receiver, channel) keeps its gRPC stream as the control path (setup,
// authentication by the node's gRPC credentials, the end of the link) and
// moves its frames over a plain TCP connection, the lane:
//
//  1. The sender opens the Link stream with metadata "gpumesh-lane: 1".
//  2. The receiver's Service, once the receiving rank is open and the
//     stream is accepted, answers with a response header carrying a random
//     one-time token (32 bytes, hex) bound to (endpoint, sender, channel).
//     A Service that serves no lanes answers "none" and the link stays on
//     the stream.
//  3. The sender connects to the same address (same port: Service.Listener
//     tells lanes from gRPC connections by their first byte) and sends the
//     8-byte laneMagic, then (inside TLS when NetConfig.LaneServerTLS and
//     LaneClientTLS are set) the token. The receiver checks and consumes the
//     token and answers one status byte (0: accepted; else a 2-byte length
//     and the reason, then it closes). Anything else is refused with a log
//     line and closed.
//  4. Frames travel on the lane exactly as on the stream: the 83-byte header
//     of frame.go (decoded and checked by DecodeHeader), then the payload.
//     The sender writes header and payload with one writev straight from the
//     caller's buffer; the receiver reads into pooled buffers, or through
//     Endpoint RecvTo straight into the destination.
//
// A lane carries data one way only (the receiver never writes after the
// status byte), so closing either end never discards data the other end
// still has to read.

// laneMagic starts every lane connection. Its first byte 'G' differs from
// the first byte of an HTTP/2 client preface ('P') and of a TLS record
// (0x16), so one byte decides.
const laneMagic = "GMDLANE1"

const (
	laneTokenSize = 32
	mdLane        = "gpumesh-lane"
	mdLaneToken   = "gpumesh-lane-token"
	laneNone      = "none"
	// laneStatusOK is the receiver's answer to an accepted lane.
	laneStatusOK = 0
	// laneStatusRefused is followed by a 2-byte length and the reason.
	laneStatusRefused = 1
	// laneStatusFailed says the receiving rank has failed: an abort class
	// byte, a 2-byte length and the failure's text follow (the sender fails
	// with the same *RemoteError an abort would give it).
	laneStatusFailed = 2
	// pieceBytes is the read size of RecvTo's piece mode: small enough that
	// a piece and the destination range it is reduced into stay in L2.
	pieceBytes = 256 << 10
)

type laneToken [laneTokenSize]byte

// laneOffer is a token handed out on an accepted Link stream, waiting for
// the sender's lane.
type laneOffer struct {
	ep  *netEndpoint
	sl  *inSlot
	src int
	ch  int
}

// offerLane registers a new one-time token for (ep, src, ch).
func (s *Service) offerLane(ep *netEndpoint, sl *inSlot, src, ch int) (laneToken, error) {
	var tok laneToken
	if _, err := rand.Read(tok[:]); err != nil {
		return tok, err
	}
	s.mu.Lock()
	s.offers[tok] = &laneOffer{ep: ep, sl: sl, src: src, ch: ch}
	s.mu.Unlock()
	return tok, nil
}

// withdrawLane removes a token that was not used.
func (s *Service) withdrawLane(tok laneToken) {
	s.mu.Lock()
	delete(s.offers, tok)
	s.mu.Unlock()
}

func (s *Service) takeLane(tok laneToken) *laneOffer {
	s.mu.Lock()
	defer s.mu.Unlock()
	o := s.offers[tok]
	delete(s.offers, tok)
	return o
}

// servesLanes says whether this Service hands out lane tokens: lanes are
// on in its config and a Listener of it accepts lane connections.
func (s *Service) servesLanes() bool {
	return s.cfg.DataPlane != DataPlaneGRPC && s.lanesServed.Load()
}

// serveLane runs the receiving side of a lane handshake on conn (whose
// laneMagic has been read) and attaches it to its link, or refuses it.
func (s *Service) serveLane(conn net.Conn) {
	remote := conn.RemoteAddr().String()
	refuse := func(reason string) {
		s.log.Warn("refused a data-plane lane connection", "remote", remote, "reason", reason)
		_, _ = conn.Write(laneAnswer(laneStatusRefused, nil, reason))
		_ = conn.Close()
	}
	if s.cfg.DataPlane == DataPlaneGRPC {
		refuse("this node runs its data plane over gRPC only (--data-plane grpc)")
		return
	}
	_ = conn.SetDeadline(time.Now().Add(s.cfg.LaneHandshakeTimeout))
	raw := conn
	if s.cfg.LaneServerTLS != nil {
		tc := tls.Server(conn, s.cfg.LaneServerTLS)
		if err := tc.Handshake(); err != nil {
			s.log.Warn("refused a data-plane lane connection", "remote", remote, "reason", "TLS handshake failed", "error", err)
			_ = conn.Close()
			return
		}
		conn = tc
	}
	var tok laneToken
	if _, err := io.ReadFull(conn, tok[:]); err != nil {
		s.log.Warn("refused a data-plane lane connection", "remote", remote, "reason", "no token", "error", err)
		_ = conn.Close()
		return
	}
	o := s.takeLane(tok)
	if o == nil {
		refuse("unknown or already used lane token (a lane must follow its own accepted data-plane stream)")
		return
	}
	if err := o.ep.fail.Err(); err != nil {
		// The rank failed after it offered the lane: say why, as an abort
		// would, so that the sender fails with the cause, not a refusal.
		_, _ = conn.Write(laneAnswer(laneStatusFailed, []byte{byte(abortClassOf(err))}, abortMessage(err)))
		_ = conn.Close()
		return
	}
	tuneLaneSocket(raw, s.cfg.LaneSocketBuffer)
	l := newLaneConn(conn, raw)
	if !o.ep.attachLane(o.sl, l) {
		refuse(fmt.Sprintf("rank %d of job %q is closed or failed", o.ep.spec.Rank, o.ep.spec.Job))
		return
	}
	_ = conn.SetDeadline(time.Time{})
	s.lanesAccepted.Add(1)
	if _, ok := raw.(*net.UnixConn); ok {
		s.unixLanesAccepted.Add(1)
	}
	if _, err := conn.Write([]byte{laneStatusOK}); err != nil {
		// The reader sees the broken lane and fails the endpoint.
		_ = l.close()
	}
	s.log.Debug("data-plane lane attached", "remote", remote, "job", o.ep.spec.Job, "rank", o.ep.spec.Rank, "from", o.src, "channel", o.ch)
}

// dialLane connects a lane to addr and presents tok. A connection that
// fails after the token was sent may already be attached at the receiver:
// it goes to keep instead of being closed, so that the endpoint closes it
// in its teardown, after the peers have heard why (an abrupt close would
// reach the receiver first, as a broken link). unixName, when not empty, is
// the receiver's same-host lane socket, tried first (lane_unix.go).
func dialLane(ctx context.Context, cfg *NetConfig, addr, unixName string, tok laneToken, keep func(net.Conn)) (*laneConn, error) {
	raw, err := dialLaneConn(ctx, addr, unixName)
	if err != nil {
		return nil, err
	}
	dl := time.Now().Add(cfg.LaneHandshakeTimeout)
	if cd, ok := ctx.Deadline(); ok && cd.Before(dl) {
		dl = cd
	}
	_ = raw.SetDeadline(dl)
	stop := context.AfterFunc(ctx, func() { _ = raw.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	sent := false
	fail := func(err error) (*laneConn, error) {
		if sent {
			keep(raw)
		} else {
			_ = raw.Close()
		}
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		return nil, err
	}
	if _, err := io.WriteString(raw, laneMagic); err != nil {
		return fail(err)
	}
	conn := raw
	if cfg.LaneClientTLS != nil {
		tc := tls.Client(raw, cfg.LaneClientTLS)
		if err := tc.HandshakeContext(ctx); err != nil {
			return fail(fmt.Errorf("lane TLS handshake: %w", err))
		}
		conn = tc
	}
	sent = true
	if _, err := conn.Write(tok[:]); err != nil {
		return fail(err)
	}
	var st [1]byte
	if _, err := io.ReadFull(conn, st[:]); err != nil {
		return fail(fmt.Errorf("no answer to the lane handshake: %w", err))
	}
	if st[0] == laneStatusFailed {
		var class [1]byte
		_, _ = io.ReadFull(conn, class[:])
		msg := readLaneReason(conn)
		_ = raw.Close()
		return nil, &laneFailed{class: class[0], msg: msg}
	}
	if st[0] != laneStatusOK {
		return fail(fmt.Errorf("lane refused: %s", readLaneReason(conn)))
	}
	if !stop() {
		return fail(context.Cause(ctx))
	}
	_ = raw.SetDeadline(time.Time{})
	tuneLaneSocket(raw, cfg.LaneSocketBuffer)
	return newLaneConn(conn, raw), nil
}

// laneAnswer encodes a receiver's answer other than laneStatusOK: the status
// byte, extra (the abort class for laneStatusFailed), then the reason with a
// 2-byte little-endian length.
func laneAnswer(status byte, extra []byte, reason string) []byte {
	out := make([]byte, 0, 1+len(extra)+2+len(reason))
	out = append(out, status)
	out = append(out, extra...)
	out = binary.LittleEndian.AppendUint16(out, uint16(len(reason)))
	return append(out, reason...)
}

// readLaneReason reads the length-prefixed reason of a laneAnswer (what
// arrives of it: the receiver closes right after).
func readLaneReason(r io.Reader) string {
	var lb [2]byte
	_, _ = io.ReadFull(r, lb[:])
	msg := make([]byte, binary.LittleEndian.Uint16(lb[:]))
	n, _ := io.ReadFull(r, msg)
	return string(msg[:n])
}

// laneFailed is the receiver's answer when its rank has failed.
type laneFailed struct {
	class byte
	msg   string
}

func (e *laneFailed) Error() string { return e.msg }

func tuneLaneSocket(c net.Conn, buf int) {
	type buffered interface {
		SetReadBuffer(int) error
		SetWriteBuffer(int) error
	}
	if tc, ok := c.(*net.TCPConn); ok {
		_ = tc.SetNoDelay(true)
	}
	if bc, ok := c.(buffered); ok && buf > 0 {
		_ = bc.SetReadBuffer(buf)
		_ = bc.SetWriteBuffer(buf)
	}
}

func parseLaneToken(s string) (laneToken, bool) {
	var tok laneToken
	if len(s) != 2*laneTokenSize {
		return tok, false
	}
	if _, err := hex.Decode(tok[:], []byte(s)); err != nil {
		return tok, false
	}
	return tok, true
}

// laneConn is one end of a lane.
type laneConn struct {
	c   net.Conn // the byte stream (a *tls.Conn over raw with TLS)
	raw net.Conn // the TCP connection (deadlines, close)
	tls bool

	wr, rd laneIO

	// sender state (one goroutine at a time: the link's mutex)
	hdr     [HeaderSize]byte
	iov     [2][]byte
	bufs    net.Buffers
	wbroken bool // a frame was cut

	// receiver state (one goroutine at a time: the endpoint contract)
	rhdr    [HeaderSize]byte
	rh      Header
	scratch []byte
	rbroken bool // a frame was left partly read

	closeOnce sync.Once
}

func newLaneConn(c, raw net.Conn) *laneConn {
	l := &laneConn{c: c, raw: raw, tls: c != raw}
	l.wr.setDL = raw.SetWriteDeadline
	l.rd.setDL = raw.SetReadDeadline
	return l
}

func (l *laneConn) close() error {
	var err error
	l.closeOnce.Do(func() {
		l.wr.release()
		l.rd.release()
		err = l.raw.Close()
	})
	return err
}

// laneIO makes blocking I/O in one direction of a lane interruptible by
// the context of the call, without allocating per call: a context is
// registered (context.AfterFunc) when it first shows up, and its
// cancellation sets a past deadline only while an I/O call is running.
type laneIO struct {
	mu    sync.Mutex
	setDL func(time.Time) error
	ctx   context.Context
	stop  func() bool
	id    uint64
	busy  bool
	fired bool
}

// begin starts an I/O call under ctx.
func (s *laneIO) begin(ctx context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ctx != s.ctx {
		if s.stop != nil {
			s.stop()
		}
		s.id++
		id := s.id
		s.ctx, s.fired = ctx, false
		s.stop = context.AfterFunc(ctx, func() { s.interrupt(id) })
	}
	if s.fired {
		return context.Cause(ctx)
	}
	s.busy = true
	return nil
}

// end finishes an I/O call; it reports whether the context interrupted it
// (the deadline is cleared again).
func (s *laneIO) end() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.busy = false
	if s.fired {
		_ = s.setDL(time.Time{})
		return true
	}
	return false
}

func (s *laneIO) interrupt(id uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if id != s.id {
		return
	}
	s.fired = true
	if s.busy {
		_ = s.setDL(time.Unix(1, 0))
	}
}

func (s *laneIO) release() {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.stop != nil {
		s.stop()
		s.stop = nil
	}
	s.ctx = nil
	s.id++
}

// laneBroken marks an error that left a lane in the middle of a frame: the
// link cannot be used any more.
type laneBroken struct{ err error }

func (e *laneBroken) Error() string { return e.err.Error() }
func (e *laneBroken) Unwrap() error { return e.err }

// writeFrame sends header h and payload with one writev (plain TCP). It
// returns the context's cause if ctx ended before a byte was written, a
// *laneBroken error if the frame was cut, or the I/O error.
func (l *laneConn) writeFrame(ctx context.Context, h *Header, payload []byte) error {
	if l.wbroken {
		return &laneBroken{errors.New("an earlier frame on this lane was cut")}
	}
	PutHeader(l.hdr[:], h)
	l.iov[0], l.iov[1] = l.hdr[:], payload
	l.bufs = l.iov[:]
	if len(payload) == 0 {
		l.bufs = l.iov[:1]
	}
	if err := l.wr.begin(ctx); err != nil {
		return err
	}
	laneRelease()
	n, err := l.bufs.WriteTo(l.c)
	interrupted := l.wr.end()
	l.iov[1], l.bufs = nil, nil
	if err == nil {
		return nil
	}
	if interrupted {
		err = context.Cause(ctx)
	}
	if n > 0 || l.tls {
		l.wbroken = true
		return &laneBroken{err}
	}
	return err
}

// readFull reads len(b) bytes; started says whether a frame is already
// partly read (then any error breaks the lane).
func (l *laneConn) readFull(ctx context.Context, b []byte, started bool) error {
	if err := l.rd.begin(ctx); err != nil {
		if started {
			return &laneBroken{err}
		}
		return err
	}
	n, err := io.ReadFull(l.c, b)
	interrupted := l.rd.end()
	if err == nil {
		laneAcquire()
		return nil
	}
	if interrupted {
		err = context.Cause(ctx)
	}
	if started || n > 0 || l.tls {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		l.rbroken = true
		return &laneBroken{err}
	}
	return err
}

// readHeader reads and decodes the next frame header.
func (l *laneConn) readHeader(ctx context.Context) (Header, error) {
	if l.rbroken {
		return Header{}, &laneBroken{errors.New("an earlier frame on this lane was refused or cut")}
	}
	if err := l.readFull(ctx, l.rhdr[:], false); err != nil {
		return Header{}, err
	}
	h, err := DecodeHeader(l.rhdr[:])
	if err != nil {
		l.rbroken = true
		return h, &laneBroken{err}
	}
	if h.Kind != FrameData {
		l.rbroken = true
		return h, &laneBroken{fmt.Errorf("%w: frame of kind %d on a data lane", ErrBadFrame, h.Kind)}
	}
	return h, nil
}

// readPieces reads n payload bytes through the scratch buffer and hands
// them to sink in pieces of at most pieceBytes (multiples of 64 bytes but
// the last).
func (l *laneConn) readPieces(ctx context.Context, n int, sink FrameSink) error {
	if l.scratch == nil {
		l.scratch = make([]byte, pieceBytes)
	}
	for off := 0; off < n; {
		k := min(n-off, pieceBytes)
		if err := l.readFull(ctx, l.scratch[:k], true); err != nil {
			return err
		}
		if err := sink.Piece(off, l.scratch[:k]); err != nil {
			l.rbroken = true
			return &laneBroken{err}
		}
		off += k
	}
	return nil
}

// Listener returns a net.Listener for grpc.Server.Serve that shares ln's
// port between gRPC and this Service's TCP lanes: each accepted
// connection's first byte says which it is (laneMagic starts with 'G'; an
// HTTP/2 preface with 'P', TLS with 0x16), lanes are served here and
// everything else is handed to gRPC unchanged. With NetConfig.UnixLanes it
// also serves lanes from this host on a Unix socket (lane_unix.go). Closing
// it closes ln (and that socket) and waits for the connections it is still
// classifying. A Service with DataPlane "grpc" hands every connection to
// gRPC (and refuses lanes).
func (s *Service) Listener(ln net.Listener) net.Listener {
	m := &muxListener{inner: ln, svc: s, conns: make(chan net.Conn), done: make(chan struct{})}
	s.lanesServed.Store(true)
	m.wg.Add(1)
	go m.acceptLoop()
	if s.cfg.UnixLanes && s.cfg.DataPlane != DataPlaneGRPC {
		if m.unix = s.listenUnixLanes(); m.unix != nil {
			m.wg.Add(1)
			go m.acceptUnix(m.unix)
		}
	}
	return m
}

type muxListener struct {
	inner net.Listener
	unix  net.Listener // same-host lanes, or nil
	svc   *Service
	conns chan net.Conn
	done  chan struct{}
	wg    sync.WaitGroup
	once  sync.Once
	mu    sync.Mutex
	err   error
}

var _ net.Listener = (*muxListener)(nil)

func (m *muxListener) acceptLoop() {
	defer m.wg.Done()
	err := m.serve(m.inner, false)
	if err == nil {
		return
	}
	m.mu.Lock()
	m.err = err
	m.mu.Unlock()
	m.closeDone()
}

// serve accepts connections from ln and classifies each (lanesOnly: see
// classify), backing off on temporary errors, until ln fails (its error)
// or the listener is closed (nil).
func (m *muxListener) serve(ln net.Listener, lanesOnly bool) error {
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				select {
				case <-time.After(backoff):
					continue
				case <-m.done:
					return nil
				}
			}
			return err
		}
		backoff = 0
		m.wg.Add(1)
		go m.classify(c, lanesOnly)
	}
}

// classify reads the first byte of c (and the rest of laneMagic when it
// could be a lane) and routes the connection; lanesOnly closes anything
// that is not a lane.
func (m *muxListener) classify(c net.Conn, lanesOnly bool) {
	defer m.wg.Done()
	// Closing the listener cuts connections still being classified or in
	// their lane handshake.
	stop := context.AfterFunc(doneContext(m.done), func() { _ = c.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	_ = c.SetReadDeadline(time.Now().Add(m.svc.cfg.LaneHandshakeTimeout))
	var b [len(laneMagic)]byte
	n, err := io.ReadFull(c, b[:1])
	if err == nil && b[0] == laneMagic[0] {
		var k int
		k, err = io.ReadFull(c, b[1:])
		n += k
	}
	if err != nil && n == 0 {
		_ = c.Close() // closed or silent before saying anything
		return
	}
	_ = c.SetReadDeadline(time.Time{})
	if n == len(laneMagic) && string(b[:]) == laneMagic {
		m.svc.serveLane(c)
		return
	}
	if lanesOnly {
		_ = c.Close()
		return
	}
	pc := &prefixConn{Conn: c, prefix: append([]byte(nil), b[:n]...)}
	select {
	case m.conns <- pc:
	case <-m.done:
		_ = c.Close()
	}
}

// Accept implements net.Listener: the next gRPC connection.
func (m *muxListener) Accept() (net.Conn, error) {
	select {
	case c := <-m.conns:
		return c, nil
	case <-m.done:
		m.mu.Lock()
		defer m.mu.Unlock()
		if m.err != nil {
			return nil, m.err
		}
		return nil, net.ErrClosed
	}
}

func (m *muxListener) closeDone() { m.once.Do(func() { close(m.done) }) }

// Close implements net.Listener: it closes the port and waits for the
// connections being classified (their I/O is cut at once).
func (m *muxListener) Close() error {
	m.closeDone()
	err := m.inner.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	if m.unix != nil {
		_ = m.unix.Close()
	}
	m.wg.Wait()
	return err
}

// Addr implements net.Listener.
func (m *muxListener) Addr() net.Addr { return m.inner.Addr() }

// prefixConn replays bytes already read from a connection.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// doneContext is a context that ends when done is closed.
type doneContext chan struct{}

func (d doneContext) Deadline() (time.Time, bool) { return time.Time{}, false }
func (d doneContext) Done() <-chan struct{}       { return d }
func (d doneContext) Value(any) any               { return nil }
func (d doneContext) Err() error {
	select {
	case <-d:
		return context.Canceled
	default:
		return nil
	}
}
