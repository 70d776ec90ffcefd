package collective

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// stagerBuf is a RecvStager over a HostBuffer: BeginRecv hands out a
// staging buffer of its own (as a device buffer hands out a pinned slot),
// CommitRecv applies it. It counts every path a chunk can take in.
type stagerBuf struct {
	h                 *HostBuffer
	begun, committed  atomic.Int64
	aborted, frameIns atomic.Int64
	mu                sync.Mutex
	out               map[*[]byte]bool // tokens handed out, not yet spent
	bad               int              // tokens spent twice or unknown
}

var _ RecvStager = (*stagerBuf)(nil)

func newStagerBuf(h *HostBuffer) *stagerBuf { return &stagerBuf{h: h, out: map[*[]byte]bool{}} }

func (b *stagerBuf) DType() DType                         { return b.h.DType() }
func (b *stagerBuf) Len() int                             { return b.h.Len() }
func (b *stagerBuf) ReadChunk(off, n int) ([]byte, error) { return b.h.ReadChunk(off, n) }
func (b *stagerBuf) ReleaseChunk(off, n int, data []byte) {}
func (b *stagerBuf) DivChunk(off, n, divisor int) error   { return b.h.DivChunk(off, n, divisor) }
func (b *stagerBuf) Sync() error                          { return nil }
func (b *stagerBuf) WriteChunk(off int, src Segments) error {
	b.frameIns.Add(1)
	return b.h.WriteChunk(off, src)
}
func (b *stagerBuf) ReduceChunk(off int, src Segments, op Op) error {
	b.frameIns.Add(1)
	return b.h.ReduceChunk(off, src, op)
}

func (b *stagerBuf) BeginRecv(off, n int) ([]byte, any, error) {
	if _, err := b.h.rng(off, n); err != nil {
		return nil, nil, err
	}
	p := make([]byte, n*b.h.DType().Size())
	b.begun.Add(1)
	b.mu.Lock()
	b.out[&p] = true
	b.mu.Unlock()
	return p, &p, nil
}

func (b *stagerBuf) spend(token any) []byte {
	p, _ := token.(*[]byte)
	b.mu.Lock()
	defer b.mu.Unlock()
	if p == nil || !b.out[p] {
		b.bad++
		return nil
	}
	delete(b.out, p)
	return *p
}

func (b *stagerBuf) CommitRecv(off, n int, token any, reduce bool, op Op) error {
	p := b.spend(token)
	if p == nil || len(p) != n*b.h.DType().Size() {
		return fmt.Errorf("%w: bad token", ErrBadArgument)
	}
	b.committed.Add(1)
	if reduce {
		return b.h.ReduceChunk(off, Segments{p}, op)
	}
	return b.h.WriteChunk(off, Segments{p})
}

func (b *stagerBuf) AbortRecv(token any) {
	if b.spend(token) != nil {
		b.aborted.Add(1)
	}
}

// outstanding is the number of tokens neither committed nor aborted.
func (b *stagerBuf) outstanding() (int, int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.out), b.bad
}

// On TCP lanes every received chunk of a RecvStager buffer goes through
// BeginRecv/CommitRecv (none through WriteChunk/ReduceChunk), exact for
// every op and dtype at awkward counts; with DataPlaneGRPC it takes the
// frame path; every token is spent exactly once.
func TestStageSinkOverLanes(t *testing.T) {
	for _, plane := range []string{DataPlaneTCP, DataPlaneGRPC} {
		t.Run(plane, func(t *testing.T) {
			gcfg := DefaultNetConfig()
			gcfg.DataPlane = plane
			cfg := testConfig()
			g, err := NewLoopbackGroup("stage", 1, 3, cfg, gcfg)
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			dts := AllDTypes
			counts := []int{1, 5, 4099, 20011}
			if testing.Short() {
				dts, counts = []DType{Float32, Int32, BFloat16}, []int{5, 4099}
			}
			for _, dt := range dts {
				for _, op := range AllOps {
					for _, count := range counts {
						hs := fillRanks(dt, op, 3, count)
						bufs := make([]*stagerBuf, 3)
						for r := range bufs {
							bufs[r] = newStagerBuf(hs[r])
						}
						allReduceAll(t, g.Comms, bufs, op)
						checkAllReduced(t, hs, dt, op)
						for r, b := range bufs {
							if out, bad := b.outstanding(); out != 0 || bad != 0 {
								t.Fatalf("%v %v n=%d rank %d: %d tokens outstanding, %d spent wrongly", dt, op, count, r, out, bad)
							}
							big := count*dt.Size() > cfg.SmallBytes
							switch {
							case plane == DataPlaneTCP && big && (b.committed.Load() == 0 || b.frameIns.Load() != 0):
								t.Fatalf("%v %v n=%d rank %d over lanes: %d staged receives, %d frame writes; want only staged", dt, op, count, r, b.committed.Load(), b.frameIns.Load())
							case plane == DataPlaneGRPC && b.begun.Load() != 0:
								t.Fatalf("%v %v n=%d rank %d over gRPC streams: %d staged receives, want 0", dt, op, count, r, b.begun.Load())
							}
						}
					}
				}
			}
		})
	}
}

// A header that does not match fails every rank as a mismatch before
// anything is staged, and a link cut mid-payload gives the token back.
func TestStageSinkMismatchAndAbort(t *testing.T) {
	g, err := NewLoopbackGroup("stage-mm", 1, 2, testConfig(), DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	bufs := []*stagerBuf{newStagerBuf(NewHostBuffer(Float32, 10000)), newStagerBuf(NewHostBuffer(Float32, 10001))}
	errs := RunAll(g.Comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
	})
	for r, err := range errs {
		if !errors.Is(err, ErrMismatch) {
			t.Fatalf("rank %d: %v, want a mismatch", r, err)
		}
	}
	for r, b := range bufs {
		if out, bad := b.outstanding(); out != 0 || bad != 0 {
			t.Fatalf("rank %d: %d tokens outstanding, %d spent wrongly", r, out, bad)
		}
	}
}

// The sink's own contract: Begin checks the header before staging; an
// empty chunk stages nothing; finish gives back a staged token on error and
// applies it otherwise.
func TestStageSinkUnit(t *testing.T) {
	c := &Communicator{rank: 1, n: 2}
	b := newStagerBuf(NewHostBuffer(Int32, 8))
	exp := &Header{Kind: FrameData, DType: Int32, Op: OpSum}
	s := &stageSink{c: c, exp: exp, st: b, from: 0, u: unit{off: 2, n: 4, reduce: true}}
	bad := *exp
	bad.DType = Float32
	bad.Offset, bad.Length = 2, 16
	if _, err := s.Begin(&bad); !errors.Is(err, ErrMismatch) || b.begun.Load() != 0 {
		t.Fatalf("bad header: %v, %d staged; want a mismatch and nothing staged", err, b.begun.Load())
	}
	good := *exp
	good.Offset, good.Length = 2, 16
	p, err := s.Begin(&good)
	if err != nil || len(p) != 16 {
		t.Fatalf("Begin: %d bytes, %v", len(p), err)
	}
	if err := s.finish(errors.New("cut"), OpSum); err == nil || b.aborted.Load() != 1 {
		t.Fatalf("finish on error: %v, %d aborted", err, b.aborted.Load())
	}
	if p, err = s.Begin(&good); err != nil {
		t.Fatal(err)
	}
	copy(p, Int32s([]int32{1, 2, 3, 4}).Bytes())
	if err := s.finish(nil, OpSum); err != nil || b.committed.Load() != 1 {
		t.Fatalf("finish: %v, %d committed", err, b.committed.Load())
	}
	if got := b.h.AsInt32(); got[2] != 1 || got[5] != 4 || got[1] != 0 || got[6] != 0 {
		t.Fatalf("buffer after commit: %v", got)
	}
	s.u = unit{off: 3, n: 0}
	empty := *exp
	empty.Offset = 3
	if p, err := s.Begin(&empty); err != nil || p != nil || s.begun {
		t.Fatalf("empty chunk: %v, %v, begun %v", p, err, s.begun)
	}
	if err := s.Piece(0, nil); err == nil {
		t.Fatal("Piece on a staged sink succeeded")
	}
}
