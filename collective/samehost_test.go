package collective

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
)

// fakeHost stands in for one host's shared memory and device IPC: rings
// register under their offer; Join finds the neighbours' offers there, and
// AllReduce meets every rank's ring in memory.
type fakeHost struct {
	mu       sync.Mutex
	done     chan struct{} // closed when the current all-reduce completes
	rings    map[string]*fakeRing
	cantJoin map[int]bool // ranks whose Join fails (another host, no IPC)
	noRing   map[int]bool // ranks whose buffer cannot make a ring
	arrived  []*fakeRing
	nextID   int
}

func newFakeHost() *fakeHost {
	return &fakeHost{rings: map[string]*fakeRing{}, cantJoin: map[int]bool{}, noRing: map[int]bool{}, done: make(chan struct{})}
}

// sameHostBuf is a host buffer that offers a fake same-host ring.
type sameHostBuf struct {
	*HostBuffer
	host  *fakeHost
	made  atomic.Int32 // SameHostRing calls
	rings []*fakeRing
}

var _ SameHostReducer = (*sameHostBuf)(nil)

func (b *sameHostBuf) SameHostRing(rank, size int) (SameHostRing, error) {
	b.made.Add(1)
	h := b.host
	if h.noRing[rank] {
		return nil, errors.New("fake: no IPC here")
	}
	h.mu.Lock()
	h.nextID++
	r := &fakeRing{host: h, buf: b.HostBuffer, rank: rank, size: size, name: fmt.Sprintf("ring-%d-rank%d", h.nextID, rank)}
	h.rings[r.name] = r
	h.mu.Unlock()
	b.rings = append(b.rings, r)
	return r, nil
}

type fakeRing struct {
	host       *fakeHost
	buf        *HostBuffer
	rank, size int
	name       string
	joined     []*fakeRing
	reduces    atomic.Int32
	closes     atomic.Int32
}

func (r *fakeRing) Offer() []byte { return []byte(r.name) }

func (r *fakeRing) Join(offers [][]byte) error {
	h := r.host
	if h.cantJoin[r.rank] {
		return errors.New("fake: cannot open the neighbours' handles")
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(offers) != r.size || string(offers[r.rank]) != r.name {
		return fmt.Errorf("fake: offers %q do not hold mine (%s) at rank %d", offers, r.name, r.rank)
	}
	for _, o := range offers {
		p := h.rings[string(o)]
		if p == nil {
			return fmt.Errorf("fake: no ring %q", o)
		}
		r.joined = append(r.joined, p)
	}
	return nil
}

// AllReduce: the last rank to arrive reduces every rank's buffer and
// copies the result to all; the others wait for it or for ctx.
func (r *fakeRing) AllReduce(ctx context.Context, op Op) error {
	r.reduces.Add(1)
	h := r.host
	h.mu.Lock()
	if r.joined == nil {
		h.mu.Unlock()
		return errors.New("fake: AllReduce before Join")
	}
	h.arrived = append(h.arrived, r)
	if len(h.arrived) < r.size {
		done := h.done
		h.mu.Unlock()
		select {
		case <-done:
			return nil
		case <-ctx.Done():
			return context.Cause(ctx)
		}
	}
	defer h.mu.Unlock()
	acc := NewHostBuffer(r.buf.DType(), r.buf.Len())
	copy(acc.Bytes(), h.arrived[0].buf.Bytes())
	for _, p := range h.arrived[1:] {
		if err := acc.ReduceChunk(0, Segments{p.buf.Bytes()}, op); err != nil {
			return err
		}
	}
	if op == OpAvg {
		if err := acc.DivChunk(0, acc.Len(), r.size); err != nil {
			return err
		}
	}
	for _, p := range h.arrived {
		copy(p.buf.Bytes(), acc.Bytes())
	}
	h.arrived = nil
	close(h.done)
	h.done = make(chan struct{})
	return nil
}

func (r *fakeRing) Closed() bool { return r.closes.Load() > 0 }

func (r *fakeRing) Close() error {
	r.closes.Add(1)
	r.host.mu.Lock()
	delete(r.host.rings, r.name)
	r.host.mu.Unlock()
	return nil
}

func sameHostBufs(h *fakeHost, n, count int) []*sameHostBuf {
	bufs := make([]*sameHostBuf, n)
	for r := range bufs {
		bufs[r] = &sameHostBuf{HostBuffer: NewHostBuffer(Float32, count), host: h}
	}
	return bufs
}

// allReduceSameHost fills every rank's buffer, all-reduces (sum) and checks
// the result; it returns each rank's algorithm.
func allReduceSameHost(t *testing.T, comms []*Communicator, bufs []*sameHostBuf) []string {
	t.Helper()
	for r, b := range bufs {
		fill(b.HostBuffer, OpSum, r)
	}
	algos := make([]string, len(comms))
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		if err := c.AllReduce(context.Background(), bufs[c.Rank()], OpSum); err != nil {
			return err
		}
		algos[c.Rank()] = c.LastAllReduceAlgorithm()
		return nil
	}))
	for r, b := range bufs {
		for i := 0; i < b.Len(); i++ {
			if got, want := b.At(i), reference(Float32, OpSum, len(comms), i); got != want {
				t.Fatalf("rank %d element %d = %v, want %v (algorithm %s)", r, i, got, want, algos[r])
			}
		}
	}
	return algos
}

func sameAlgo(t *testing.T, algos []string, want string) {
	t.Helper()
	for r, a := range algos {
		if a != want {
			t.Fatalf("rank %d used %q, want %q (all: %v)", r, a, want, algos)
		}
	}
}

// Ranks in separate "processes" (a server each) on one host agree once per
// buffer and then all-reduce on the buffers' same-host ring; a second
// buffer gets its own agreement.
func TestSameHostRingAgreedOncePerBuffer(t *testing.T) {
	g, err := NewLoopbackGroup("job", 1, 3, testConfig(), DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	h := newFakeHost()
	bufs := sameHostBufs(h, 3, 10007)
	for i := 0; i < 3; i++ {
		sameAlgo(t, allReduceSameHost(t, g.Comms, bufs), AlgoNameSameHost)
	}
	for r, b := range bufs {
		if b.made.Load() != 1 || len(b.rings) != 1 {
			t.Fatalf("rank %d: %d rings made for one buffer, want 1", r, b.made.Load())
		}
		if got := b.rings[0].reduces.Load(); got != 3 {
			t.Fatalf("rank %d: ring ran %d all-reduces, want 3", r, got)
		}
	}
	other := sameHostBufs(h, 3, 513)
	sameAlgo(t, allReduceSameHost(t, g.Comms, other), AlgoNameSameHost)
	if other[0].made.Load() != 1 || bufs[0].made.Load() != 1 {
		t.Fatalf("a new buffer: rings made %d (new) %d (old), want 1 and 1", other[0].made.Load(), bufs[0].made.Load())
	}
	// ForgetBuffer closes the ring; the next AllReduce agrees again.
	noErrs(t, RunAll(g.Comms, func(c *Communicator) error { return c.ForgetBuffer(bufs[c.Rank()]) }))
	for r, b := range bufs {
		if b.rings[0].closes.Load() != 1 {
			t.Fatalf("rank %d: forgotten ring closed %d times, want 1", r, b.rings[0].closes.Load())
		}
	}
	sameAlgo(t, allReduceSameHost(t, g.Comms, bufs), AlgoNameSameHost)
	if bufs[1].made.Load() != 2 {
		t.Fatalf("after ForgetBuffer: %d rings made, want 2", bufs[1].made.Load())
	}
	// A ring its buffer closed (a freed buffer) is dropped at the next
	// agreement.
	for _, b := range other {
		b.rings[0].Close()
	}
	third := sameHostBufs(h, 3, 77)
	sameAlgo(t, allReduceSameHost(t, g.Comms, third), AlgoNameSameHost)
	for r, c := range g.Comms {
		c.sameHostMu.Lock()
		_, kept := c.sameHost[other[r]]
		c.sameHostMu.Unlock()
		if kept {
			t.Fatalf("rank %d still keeps the closed ring of a freed buffer", r)
		}
	}
	// Close closes every ring still agreed.
	g.Close()
	for r := range third {
		if c := third[r].rings[0].closes.Load(); c != 1 {
			t.Fatalf("rank %d: ring closed %d times by Communicator.Close, want 1", r, c)
		}
	}
}

// One rank that cannot join (another host, a container without the host's
// IPC) or cannot make a ring at all sends the whole group to the network,
// for good (no second agreement for that buffer), and every ring made is
// closed.
func TestSameHostRingFallsBackTogether(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(h *fakeHost)
	}{
		{"join fails on rank 1", func(h *fakeHost) { h.cantJoin[1] = true }},
		{"no ring on rank 2", func(h *fakeHost) { h.noRing[2] = true }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, err := NewLoopbackGroup("job", 1, 3, testConfig(), DefaultNetConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			h := newFakeHost()
			tc.set(h)
			bufs := sameHostBufs(h, 3, 100003)
			sameAlgo(t, allReduceSameHost(t, g.Comms, bufs), AlgoNameRing)
			sameAlgo(t, allReduceSameHost(t, g.Comms, bufs), AlgoNameRing)
			for r, b := range bufs {
				if b.made.Load() != 1 {
					t.Fatalf("rank %d: %d agreements for one buffer, want 1", r, b.made.Load())
				}
				for _, ring := range b.rings {
					if ring.closes.Load() != 1 || ring.reduces.Load() != 0 {
						t.Fatalf("rank %d: unused ring closed %d times, ran %d all-reduces; want 1 and 0", r, ring.closes.Load(), ring.reduces.Load())
					}
				}
			}
		})
	}
}

// Ranks that share a server (one process) use by-reference hops, and
// NoSameHost keeps separate processes on the network: neither asks the
// buffer for a ring.
func TestSameHostRingNotOffered(t *testing.T) {
	cfg := testConfig()
	cfg.NoSameHost = true
	for name, mk := range map[string]func() (*LoopbackGroup, error){
		"one process": func() (*LoopbackGroup, error) { return NewSharedGroup("job", 1, 2, testConfig(), DefaultNetConfig()) },
		"NoSameHost":  func() (*LoopbackGroup, error) { return NewLoopbackGroup("job", 1, 2, cfg, DefaultNetConfig()) },
	} {
		t.Run(name, func(t *testing.T) {
			g, err := mk()
			if err != nil {
				t.Fatal(err)
			}
			defer g.Close()
			bufs := sameHostBufs(newFakeHost(), 2, 4099)
			sameAlgo(t, allReduceSameHost(t, g.Comms, bufs), AlgoNameRing)
			for r, b := range bufs {
				if b.made.Load() != 0 {
					t.Fatalf("rank %d: buffer asked for a same-host ring", r)
				}
			}
		})
	}
}

func TestSameHostAddrs(t *testing.T) {
	for _, tc := range []struct {
		addrs []string
		want  bool
	}{
		{[]string{"127.0.0.1:1", "127.0.0.1:2"}, true},
		{[]string{"127.0.0.1:1", "127.0.0.2:2", "[::1]:3", "localhost:4"}, true},
		{[]string{"10.0.0.1:1", "10.0.0.1:2"}, true},
		{[]string{"127.0.0.1:1", "127.0.0.1:1"}, false}, // one process
		{[]string{"10.0.0.1:1", "10.0.0.2:1"}, false},
		{[]string{"10.0.0.1:1", "127.0.0.1:2"}, false},
		{[]string{"nohost"}, false},
	} {
		if got := SameHostAddrs(tc.addrs); got != tc.want {
			t.Errorf("SameHostAddrs(%v) = %v, want %v", tc.addrs, got, tc.want)
		}
	}
}
