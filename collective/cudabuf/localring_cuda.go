//go:build cuda

package cudabuf

import (
	"errors"
	"fmt"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// LocalRing is an all-reduce among ranks whose buffers all live in this
// process (one or several ranks per GPU): a ring reduce-scatter then
// all-gather where every hop is a device-side operation, never the host.
// Reduce-scatter hops run a reduce kernel that reads the left neighbour's
// memory directly (NVLink/PCIe peer access); all-gather hops are
// cuMemcpyPeerAsync copies on the copy engines. Every segment is split into
// chunks so neighbours pipeline; the dependencies between ranks are CUDA
// events (read-after-write on the left neighbour's previous step,
// write-after-read on the right neighbour's read of the same chunk), so the
// host only enqueues and waits once at the end.
//
// A LocalRing is for one set of buffers; not safe for concurrent AllReduce
// calls.
type LocalRing struct {
	bufs   []*Buffer
	chunk  int
	events [][][]*cuda.Event // [rank][step][chunk]
	nchunk int
}

// NewLocalRing prepares a ring over bufs (rank i = bufs[i]); all must share
// one Backend, dtype and length. chunkBytes is the pipelining unit (0: 8 MiB).
func NewLocalRing(bufs []*Buffer, chunkBytes int) (*LocalRing, error) {
	if len(bufs) == 0 {
		return nil, fmt.Errorf("%w: local ring of no buffers", collective.ErrBadArgument)
	}
	for i, b := range bufs {
		if b.be != bufs[0].be || b.dt != bufs[0].dt || b.n != bufs[0].n {
			return nil, fmt.Errorf("%w: rank %d buffer is %v×%d, rank 0 %v×%d (same backend, dtype and length needed)",
				collective.ErrMismatch, i, b.dt, b.n, bufs[0].dt, bufs[0].n)
		}
	}
	if chunkBytes <= 0 {
		chunkBytes = 8 << 20
	}
	n := len(bufs)
	l := &LocalRing{bufs: bufs, chunk: chunkBytes}
	segBytes := (bufs[0].n + n - 1) / n * bufs[0].dt.Size()
	l.nchunk = max(1, (segBytes+chunkBytes-1)/chunkBytes)
	steps := 2 * (n - 1)
	l.events = make([][][]*cuda.Event, n)
	for r := range bufs {
		l.events[r] = make([][]*cuda.Event, steps)
		for t := 0; t < steps; t++ {
			for c := 0; c < l.nchunk; c++ {
				ev, err := bufs[r].ds.dev.NewEvent(false)
				if err != nil {
					l.Close()
					return nil, err
				}
				l.events[r][t] = append(l.events[r][t], ev)
			}
		}
	}
	return l, nil
}

// Close destroys the ring's events (not the buffers).
func (l *LocalRing) Close() error {
	var errs []error
	for _, rs := range l.events {
		for _, ts := range rs {
			for _, ev := range ts {
				errs = append(errs, ev.Close())
			}
		}
	}
	l.events = nil
	return errors.Join(errs...)
}

// chunkRange returns elements [off, off+cnt) of chunk c of segment seg.
func (l *LocalRing) chunkRange(seg, c int) (off, cnt int) {
	n, N := len(l.bufs), l.bufs[0].n
	s0, s1 := seg*N/n, (seg+1)*N/n
	ln := s1 - s0
	a, b := c*ln/l.nchunk, (c+1)*ln/l.nchunk
	return s0 + a, b - a
}

func mod(a, n int) int { return ((a % n) + n) % n }

// ringStep is rank r's part of step t of a ring all-reduce over n ranks:
// reduce-scatter steps (t < n-1) reduce segment seg from the left neighbour
// into r; all-gather steps copy segment seg from the left neighbour. After
// step n-2 rank r holds the complete segment r+1.
func ringStep(r, t, n int) (seg int, reduce bool) {
	if t < n-1 {
		return mod(r-t-1, n), true
	}
	return mod(r-(t-(n-1)), n), false
}

// AllReduce reduces every rank's buffer in place with op and waits for the
// result on every device.
func (l *LocalRing) AllReduce(op collective.Op) error {
	cop, err := Op(op)
	if err != nil {
		return err
	}
	n := len(l.bufs)
	for _, b := range l.bufs {
		if err := b.Sync(); err != nil {
			return err
		}
	}
	if n > 1 {
		if err := l.enqueue(cop, op == collective.OpAvg); err != nil {
			for _, b := range l.bufs {
				b.Sync()
			}
			return err
		}
	}
	var errs []error
	for _, b := range l.bufs {
		errs = append(errs, b.Sync())
	}
	return errors.Join(errs...)
}

func (l *LocalRing) enqueue(cop cuda.Op, avg bool) error {
	for _, b := range l.bufs {
		defer b.wrSeq.Add(1) // later staged reads wait for this work
	}
	n := len(l.bufs)
	es := int64(l.bufs[0].dt.Size())
	steps := 2 * (n - 1)
	for t := 0; t < steps; t++ {
		for c := 0; c < l.nchunk; c++ {
			for r := 0; r < n; r++ {
				dst, left := l.bufs[r], l.bufs[mod(r-1, n)]
				seg, reduce := ringStep(r, t, n)
				// reduce-scatter kernels on the write stream, all-gather
				// copies (copy engines) on the read stream, so they overlap;
				// every dependency between them is an event below
				s := dst.wr
				if !reduce {
					s = dst.rd
				}
				// read-after-write: the left neighbour produced this chunk
				// in its previous step
				if t > 0 {
					if err := s.Wait(l.events[mod(r-1, n)][t-1][c]); err != nil {
						return err
					}
				}
				if !reduce {
					// write-after-read: the right neighbour read this chunk
					// of ours in its reduce-scatter step t-(n-1)
					if err := s.Wait(l.events[mod(r+1, n)][t-(n-1)][c]); err != nil {
						return err
					}
				}
				off, cnt := l.chunkRange(seg, c)
				if cnt > 0 {
					var err error
					switch {
					case reduce:
						err = s.Reduce(cop, dst.cdt, dst.at(off), left.at(off), int64(cnt))
						if err == nil && avg && t == n-2 {
							// the segment is complete: divide it before the
							// all-gather hands it on
							err = s.Div(dst.cdt, dst.at(off), int64(cnt), float64(n))
						}
					case dst.ds == left.ds:
						err = s.CopyDtoD(dst.at(off), left.at(off), int64(cnt)*es)
					default:
						err = s.CopyPeer(dst.at(off), dst.ds.dev, left.at(off), left.ds.dev, int64(cnt)*es)
					}
					if err != nil {
						return err
					}
				}
				if err := s.Record(l.events[r][t][c]); err != nil {
					return err
				}
			}
		}
	}
	return nil
}
