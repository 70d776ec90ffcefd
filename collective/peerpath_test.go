package collective

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// refBuf is a host buffer that behaves like a device buffer towards the
// collectives: it asks for by-reference sends (RefSender), moves peer chunks
// itself (PeerReducer) and takes read-ahead hints (ChunkPrefetcher). It
// counts what the collectives did with it and checks every prefetch: a
// prefetched range must not be written before it is read, and must read the
// same bytes.
type refBuf struct {
	h *HostBuffer

	reads, peerOps, prefetches, hits atomic.Int64

	mu      sync.Mutex
	pending map[[2]int][]byte // prefetched range -> snapshot
	stale   int               // writes to a prefetched range before its read
	changed int               // reads whose bytes differ from the prefetch
}

var (
	_ RefSender       = (*refBuf)(nil)
	_ PeerReducer     = (*refBuf)(nil)
	_ ChunkPrefetcher = (*refBuf)(nil)
)

func newRefBuf(h *HostBuffer) *refBuf { return &refBuf{h: h, pending: map[[2]int][]byte{}} }

func (b *refBuf) DType() DType    { return b.h.DType() }
func (b *refBuf) Len() int        { return b.h.Len() }
func (b *refBuf) SendByRef() bool { return true }
func (b *refBuf) Sync() error     { return nil }

func (b *refBuf) wrote(off, n int) {
	b.mu.Lock()
	defer b.mu.Unlock()
	for k := range b.pending {
		if k[0] < off+n && off < k[0]+k[1] {
			b.stale++
			delete(b.pending, k)
		}
	}
}

func (b *refBuf) ReadChunk(off, n int) ([]byte, error) {
	b.reads.Add(1)
	d, err := b.h.ReadChunk(off, n)
	if err != nil {
		return nil, err
	}
	b.mu.Lock()
	if snap, ok := b.pending[[2]int{off, n}]; ok {
		delete(b.pending, [2]int{off, n})
		b.hits.Add(1)
		if !bytes.Equal(snap, d) {
			b.changed++
		}
	}
	b.mu.Unlock()
	return d, nil
}

func (b *refBuf) ReleaseChunk(off, n int, data []byte) {}

func (b *refBuf) PrefetchChunk(off, n int) error {
	b.prefetches.Add(1)
	d, err := b.h.rng(off, n)
	if err != nil {
		return err
	}
	b.mu.Lock()
	b.pending[[2]int{off, n}] = append([]byte(nil), d...)
	b.mu.Unlock()
	return nil
}

func (b *refBuf) WriteChunk(off int, src Segments) error {
	b.wrote(off, src.Len()/b.h.dt.Size())
	return b.h.WriteChunk(off, src)
}

func (b *refBuf) ReduceChunk(off int, src Segments, op Op) error {
	b.wrote(off, src.Len()/b.h.dt.Size())
	return b.h.ReduceChunk(off, src, op)
}

func (b *refBuf) DivChunk(off, n, divisor int) error {
	b.wrote(off, n)
	return b.h.DivChunk(off, n, divisor)
}

func (b *refBuf) PeerWrite(dstOff int, src Buffer, srcOff, n int) (bool, error) {
	s, ok := src.(*refBuf)
	if !ok {
		return false, nil
	}
	b.peerOps.Add(1)
	b.wrote(dstOff, n)
	return b.h.PeerWrite(dstOff, s.h, srcOff, n)
}

func (b *refBuf) PeerReduce(dstOff int, src Buffer, srcOff, n int, op Op) (bool, error) {
	s, ok := src.(*refBuf)
	if !ok {
		return false, nil
	}
	b.peerOps.Add(1)
	b.wrote(dstOff, n)
	return b.h.PeerReduce(dstOff, s.h, srcOff, n, op)
}

// noPeer hides PeerReducer, RefSender and ChunkPrefetcher of a buffer: it
// receives by-reference chunks through the fallback (reading the sender's
// buffer) and sends with payload.
type noPeer struct{ Buffer }

func fillRanks(dt DType, op Op, n, count int) []*HostBuffer {
	hs := make([]*HostBuffer, n)
	for r := range hs {
		hs[r] = NewHostBuffer(dt, count)
		for i := 0; i < count; i++ {
			hs[r].Set(i, value(dt, op, r, i))
		}
	}
	return hs
}

// refBufs wraps each of hs in a refBuf.
func refBufs(hs []*HostBuffer) []*refBuf {
	bufs := make([]*refBuf, len(hs))
	for r, h := range hs {
		bufs[r] = newRefBuf(h)
	}
	return bufs
}

func checkAllReduced(t *testing.T, hs []*HostBuffer, dt DType, op Op) {
	t.Helper()
	n := len(hs)
	for r, h := range hs {
		for i := 0; i < h.Len(); i++ {
			want := reference(dt, op, n, i)
			if got := h.At(i); got != want {
				t.Fatalf("rank %d element %d: got %v, want %v", r, i, got, want)
			}
		}
	}
}

// In one process every hop of the ring goes by reference: no rank reads a
// chunk to send it, every received chunk is a peer move, and the results
// are exact.
func TestByRefRingInProcess(t *testing.T) {
	for _, n := range []int{2, 4} {
		for _, dt := range []DType{Float32, Int64, BFloat16} {
			for _, op := range AllOps {
				t.Run(fmt.Sprintf("n=%d/%v/%v", n, dt, op), func(t *testing.T) {
					_, comms, err := NewLocalGroup("byref", 1, n, testConfig())
					if err != nil {
						t.Fatal(err)
					}
					defer CloseAll(comms)
					const count = 5003
					hs := fillRanks(dt, op, n, count)
					bufs := refBufs(hs)
					allReduceAll(t, comms, bufs, op)
					checkAllReduced(t, hs, dt, op)
					for r, b := range bufs {
						if b.reads.Load() != 0 || b.prefetches.Load() != 0 {
							t.Errorf("rank %d: %d chunk reads and %d prefetches, want none (every hop by reference)", r, b.reads.Load(), b.prefetches.Load())
						}
						if b.peerOps.Load() == 0 {
							t.Errorf("rank %d: no peer moves", r)
						}
					}
				})
			}
		}
	}
}

// The other pipelined collectives (broadcast, all-gather, reduce-scatter,
// send/receive) go by reference too.
func TestByRefOtherCollectives(t *testing.T) {
	const n, count = 3, 4099
	_, comms, err := NewLocalGroup("byref-other", 1, n, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	ctx := context.Background()
	hs := fillRanks(Int32, OpSum, n, count)
	bufs := refBufs(hs)
	run := func(name string, f func(c *Communicator) error) {
		t.Helper()
		for r, err := range RunAll(comms, f) {
			if err != nil {
				t.Fatalf("%s: rank %d: %v", name, r, err)
			}
		}
	}
	run("broadcast", func(c *Communicator) error { return c.Broadcast(ctx, bufs[c.Rank()], 1) })
	for r, h := range hs {
		for i := 0; i < count; i++ {
			if got, want := h.At(i), value(Int32, OpSum, 1, i); got != want {
				t.Fatalf("broadcast: rank %d element %d: got %v, want %v", r, i, got, want)
			}
		}
	}
	hs = fillRanks(Int32, OpSum, n, count)
	bufs = refBufs(hs)
	run("reduce-scatter", func(c *Communicator) error { return c.ReduceScatter(ctx, nil, bufs[c.Rank()], OpSum) })
	for r, h := range hs {
		off, l := Part(count, n, r)
		for i := off; i < off+l; i++ {
			if got, want := h.At(i), reference(Int32, OpSum, n, i); got != want {
				t.Fatalf("reduce-scatter: rank %d element %d: got %v, want %v", r, i, got, want)
			}
		}
	}
	run("all-gather", func(c *Communicator) error { return c.AllGather(ctx, bufs[c.Rank()], nil) })
	checkAllReduced(t, hs, Int32, OpSum)
	src, dst := newRefBuf(fillRanks(Int32, OpSum, 1, count)[0]), newRefBuf(NewHostBuffer(Int32, count))
	run("send/recv", func(c *Communicator) error {
		switch c.Rank() {
		case 0:
			return c.Send(ctx, src, 2)
		case 2:
			return c.Recv(ctx, dst, 0)
		}
		return nil
	})
	if !bytes.Equal(src.h.Bytes(), dst.h.Bytes()) {
		t.Fatal("send/recv: the receiver's buffer differs from the sender's")
	}
	for r, b := range append(bufs, src) {
		if b.reads.Load() != 0 {
			t.Errorf("buffer %d: %d chunk reads, want none", r, b.reads.Load())
		}
	}
}

// A receiver that cannot move the sender's chunk itself (here: a buffer
// without PeerReducer) reads it from the sender's buffer; mixed with
// by-reference senders the results stay exact.
func TestByRefFallbackReceiver(t *testing.T) {
	const n, count = 4, 7001
	for _, op := range []Op{OpSum, OpAvg, OpMax} {
		t.Run(op.String(), func(t *testing.T) {
			_, comms, err := NewLocalGroup("byref-fallback", 1, n, testConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer CloseAll(comms)
			hs := fillRanks(Float64, op, n, count)
			rbs := make([]*refBuf, n)
			bufs := make([]Buffer, n)
			for r := range bufs {
				rbs[r] = newRefBuf(hs[r])
				bufs[r] = rbs[r]
				if r%2 == 1 {
					bufs[r] = noPeer{rbs[r]}
				}
			}
			allReduceAll(t, comms, bufs, op)
			checkAllReduced(t, hs, Float64, op)
			// Even ranks send by reference to odd ranks, which cannot
			// peer-reduce: they read the even ranks' chunks (reads counted
			// on the even ranks' buffers). Odd ranks send with payload,
			// which even ranks cannot peer-move either (the sender hides
			// its type).
			for r, b := range rbs {
				if b.reads.Load() == 0 || b.peerOps.Load() != 0 {
					t.Errorf("rank %d: %d chunk reads, %d peer moves; want some reads, no peer moves", r, b.reads.Load(), b.peerOps.Load())
				}
				if r%2 == 0 && b.prefetches.Load() != 0 {
					t.Errorf("rank %d sends by reference but prefetched %d chunks", r, b.prefetches.Load())
				}
			}
		})
	}
}

// A ring across two "processes" (two data-plane servers, two ranks each):
// the hops inside a server go by reference, the hops between servers over
// TCP with payload, and chunks that go over TCP are prefetched.
func TestByRefHybridRingOverGRPC(t *testing.T) {
	srvs := listenServers(t, 2, DefaultNetConfig())
	addrs := []string{srvs[0].Addr(), srvs[0].Addr(), srvs[1].Addr(), srvs[1].Addr()}
	const n, count = 4, 20011
	for gen, op := range []Op{OpSum, OpProd, OpAvg} {
		t.Run(op.String(), func(t *testing.T) {
			comms := make([]*Communicator, n)
			defer CloseAll(comms)
			for r := range comms {
				c, err := New(srvs[r/2].Transport(), Group{Job: "byref-hybrid", Generation: uint64(gen + 1), Rank: r, Addrs: addrs}, testConfig())
				if err != nil {
					t.Fatal(err)
				}
				comms[r] = c
			}
			hs := fillRanks(Int32, op, n, count)
			bufs := refBufs(hs)
			allReduceAll(t, comms, bufs, op)
			checkAllReduced(t, hs, Int32, op)
			for r, b := range bufs {
				b.mu.Lock()
				stale, changed := b.stale, b.changed
				b.mu.Unlock()
				reads, peer := b.reads.Load(), b.peerOps.Load()
				if r%2 == 0 { // sends to r+1 in memory, receives from r-1 over TCP
					if reads != 0 || peer != 0 || b.prefetches.Load() != 0 {
						t.Errorf("rank %d: %d reads, %d peer moves, %d prefetches; want none", r, reads, peer, b.prefetches.Load())
					}
				} else { // sends to r+1 over TCP, receives from r-1 in memory
					if reads == 0 || peer == 0 || b.hits.Load() == 0 {
						t.Errorf("rank %d: %d reads, %d peer moves, %d prefetched reads; want some of each", r, reads, peer, b.hits.Load())
					}
				}
				if stale != 0 || changed != 0 {
					t.Errorf("rank %d: %d prefetched ranges written before their read, %d read different bytes", r, stale, changed)
				}
			}
		})
	}
}

// checkFrame on by-reference frames: a reference to the expected chunk
// passes (also with the zero Length the in-memory transports report); a
// wrong dtype, offset or range, or a wrong header, is a mismatch.
func TestCheckRefFrame(t *testing.T) {
	_, comms, err := NewLocalGroup("byref-check", 1, 2, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	c := comms[1]
	exp := c.header(CollAllReduce, Float32, OpSum, 1000, AlgoRing, 100, -1)
	src := newRefBuf(NewHostBuffer(Float32, 1000))
	frame := func(mod func(f *InFrame)) *InFrame {
		f := &InFrame{Header: exp, Peer: PeerRef{Buf: src, Off: 200}}
		f.Header.Src, f.Header.Offset, f.Header.Length = 0, 200, 400
		if mod != nil {
			mod(f)
		}
		return f
	}
	if err := c.checkFrame(&exp, frame(nil), 0, 200, 100); err != nil {
		t.Fatalf("a good reference: %v", err)
	}
	if err := c.checkFrame(&exp, frame(func(f *InFrame) { f.Header.Length = 0 }), 0, 200, 100); err != nil {
		t.Fatalf("a good reference with zero Length: %v", err)
	}
	bad := map[string]func(f *InFrame){
		"dtype":  func(f *InFrame) { f.Peer.Buf = newRefBuf(NewHostBuffer(Int32, 1000)) },
		"offset": func(f *InFrame) { f.Peer.Off = 300 },
		"range":  func(f *InFrame) { f.Peer.Buf = newRefBuf(NewHostBuffer(Float32, 250)) },
		"header": func(f *InFrame) { f.Header.Offset = 300 },
		"length": func(f *InFrame) { f.Header.Length = 800 },
		"op":     func(f *InFrame) { f.Header.Op = OpMax },
	}
	for name, mod := range bad {
		err := c.checkFrame(&exp, frame(mod), 0, 200, 100)
		if !errors.Is(err, ErrMismatch) {
			t.Errorf("%s: got %v, want a mismatch", name, err)
		}
	}
}
