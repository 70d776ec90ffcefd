package netemu

import (
	"io"
	"sync"
)

// Pipe returns the two ends of an in-memory packet pipe, a stand-in for a
// TUN device in tests: each Write on one end is one Read on the other
// (whole packets, copied), up to 1,024 packets buffered; Close on either
// end ends both (Reads return io.EOF, Writes io.ErrClosedPipe).
func Pipe() (io.ReadWriteCloser, io.ReadWriteCloser) {
	s := &pipeState{done: make(chan struct{})}
	ab, ba := make(chan []byte, 1024), make(chan []byte, 1024)
	return &pipeEnd{s: s, in: ba, out: ab}, &pipeEnd{s: s, in: ab, out: ba}
}

type pipeState struct {
	once sync.Once
	done chan struct{}
}

type pipeEnd struct {
	s       *pipeState
	in, out chan []byte
}

func (p *pipeEnd) Read(b []byte) (int, error) {
	select {
	case <-p.s.done:
		return 0, io.EOF
	case pkt := <-p.in:
		return copy(b, pkt), nil
	}
}

func (p *pipeEnd) Write(b []byte) (int, error) {
	select {
	case <-p.s.done:
		return 0, io.ErrClosedPipe
	default:
	}
	select {
	case <-p.s.done:
		return 0, io.ErrClosedPipe
	case p.out <- append([]byte(nil), b...):
		return len(b), nil
	}
}

func (p *pipeEnd) Close() error {
	p.s.once.Do(func() { close(p.s.done) })
	return nil
}
