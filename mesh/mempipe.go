package mesh

import (
	"bytes"
	"io"
	"net"
	"os"
	"sync"
	"time"
)

// memPipe returns the two ends of an in-memory stream. Unlike net.Pipe,
// a write does not wait for the reader: each direction buffers without
// bound, as a TCP socket buffer does for the sizes memberlist writes
// (memberlist writes a whole message, then reads the answer, and would
// otherwise stall whenever the peer is slow to read). Deadlines work as
// on a net.Conn.
func memPipe(a, b net.Addr) (net.Conn, net.Conn) {
	ab, ba := newPipeBuf(), newPipeBuf()
	return &pipeEnd{r: ba, w: ab, local: a, remote: b}, &pipeEnd{r: ab, w: ba, local: b, remote: a}
}

// pipeBuf is one direction of a memPipe.
type pipeBuf struct {
	mu     sync.Mutex
	buf    bytes.Buffer
	closed bool          // the writer closed: EOF once drained
	gone   bool          // the reader closed: writes fail
	ready  chan struct{} // capacity 1: data or close happened
}

func newPipeBuf() *pipeBuf { return &pipeBuf{ready: make(chan struct{}, 1)} }

func (p *pipeBuf) signal() {
	select {
	case p.ready <- struct{}{}:
	default:
	}
}

// pipeEnd is one end of a memPipe.
type pipeEnd struct {
	r, w          *pipeBuf
	local, remote net.Addr

	dmu       sync.Mutex
	rDeadline time.Time
	wDeadline time.Time
}

func (e *pipeEnd) Read(b []byte) (int, error) {
	for {
		e.r.mu.Lock()
		if e.r.gone {
			e.r.mu.Unlock()
			return 0, net.ErrClosed
		}
		if e.r.buf.Len() > 0 {
			n, _ := e.r.buf.Read(b)
			e.r.mu.Unlock()
			return n, nil
		}
		if e.r.closed {
			e.r.mu.Unlock()
			return 0, io.EOF
		}
		e.r.mu.Unlock()
		e.dmu.Lock()
		dl := e.rDeadline
		e.dmu.Unlock()
		var timeout <-chan time.Time
		if !dl.IsZero() {
			d := time.Until(dl)
			if d <= 0 {
				return 0, os.ErrDeadlineExceeded
			}
			t := time.NewTimer(d)
			timeout = t.C
			select {
			case <-e.r.ready:
				t.Stop()
			case <-timeout:
				return 0, os.ErrDeadlineExceeded
			}
			continue
		}
		<-e.r.ready
	}
}

func (e *pipeEnd) Write(b []byte) (int, error) {
	e.dmu.Lock()
	dl := e.wDeadline
	e.dmu.Unlock()
	if !dl.IsZero() && !time.Now().Before(dl) {
		return 0, os.ErrDeadlineExceeded
	}
	e.w.mu.Lock()
	defer e.w.mu.Unlock()
	if e.w.closed || e.w.gone {
		return 0, net.ErrClosed
	}
	e.w.buf.Write(b)
	e.w.signal()
	return len(b), nil
}

// Close ends both directions: the peer reads EOF after the buffered
// data, and its writes fail.
func (e *pipeEnd) Close() error {
	e.w.mu.Lock()
	e.w.closed = true
	e.w.signal()
	e.w.mu.Unlock()
	e.r.mu.Lock()
	e.r.gone = true
	e.r.buf.Reset()
	e.r.signal()
	e.r.mu.Unlock()
	return nil
}

func (e *pipeEnd) LocalAddr() net.Addr  { return e.local }
func (e *pipeEnd) RemoteAddr() net.Addr { return e.remote }

func (e *pipeEnd) SetDeadline(t time.Time) error {
	e.dmu.Lock()
	e.rDeadline, e.wDeadline = t, t
	e.dmu.Unlock()
	e.r.signal() // a blocked Read re-reads its deadline
	return nil
}

func (e *pipeEnd) SetReadDeadline(t time.Time) error {
	e.dmu.Lock()
	e.rDeadline = t
	e.dmu.Unlock()
	e.r.signal()
	return nil
}

func (e *pipeEnd) SetWriteDeadline(t time.Time) error {
	e.dmu.Lock()
	e.wDeadline = t
	e.dmu.Unlock()
	return nil
}
