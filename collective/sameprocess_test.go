package collective

import (
	"context"
	"errors"
	"fmt"
	"math"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// sameProcessConfig is testConfig with the same-process path on, its
// goroutine split forced down to small blocks so that the tests' buffers
// use several goroutines and pieces per rank.
func sameProcessConfig(t *testing.T) Config {
	t.Helper()
	old := directMinWorker
	directMinWorker = 4 << 10
	t.Cleanup(func() { directMinWorker = old })
	cfg := testConfig()
	cfg.NoSameProcess = false
	cfg.SameProcessWorkers = 8
	return cfg
}

// sameProcessGroups builds n ranks of one process both ways: on a
// LocalTransport and on one NetTransport server (every rank at its
// address, as one agent's ranks are).
func sameProcessGroups(t *testing.T, n int, cfg Config) map[string][]*Communicator {
	t.Helper()
	_, local, err := NewLocalGroup("job", 1, n, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { CloseAll(local) })
	g, err := NewSharedGroup("job", 1, n, cfg, DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(g.Close)
	return map[string][]*Communicator{"local": local, "shared": g.Comms}
}

func sameAlgos(t *testing.T, comms []*Communicator, want, what string) {
	t.Helper()
	for _, c := range comms {
		if got := c.LastAllReduceAlgorithm(); got != want {
			t.Fatalf("%s: rank %d ran %q, want %q", what, c.Rank(), got, want)
		}
	}
}

// Every op and dtype, at odd sizes (pieces and goroutine parts that do not
// divide evenly, a last part of one element), equals the exact reference on
// every rank.
func TestSameProcessAllReduceEveryOpDType(t *testing.T) {
	cfg := sameProcessConfig(t)
	counts := []int{1, 3, 7, 1000, 5003, 70001}
	ns := []int{2, 3, 4, 5, 7}
	if testing.Short() {
		ns = []int{2, 3}
	}
	for _, n := range ns {
		for tr, comms := range sameProcessGroups(t, n, cfg) {
			for _, dt := range AllDTypes {
				for _, op := range AllOps {
					for _, count := range counts {
						what := fmt.Sprintf("%s n=%d %v %v count=%d", tr, n, dt, op, count)
						allReduceChecked(t, comms, dt, op, count, what)
						sameAlgos(t, comms, AlgoNameSameProcess, what)
					}
				}
			}
		}
	}
}

// Float sums are bit-identical to the sequential sum in rank order, on every
// rank, whatever the number of goroutines.
func TestSameProcessFloatSumIsRankOrderSum(t *testing.T) {
	for _, n := range []int{2, 3, 4} {
		for _, workers := range []int{1, 3, 16} {
			cfg := sameProcessConfig(t)
			cfg.SameProcessWorkers = workers
			for tr, comms := range sameProcessGroups(t, n, cfg) {
				const count = 100003
				bufs := make([]*HostBuffer, n)
				want := make([]float32, count)
				for r := range bufs {
					bufs[r] = NewHostBuffer(Float32, count)
					v := bufs[r].AsFloat32()
					for i := range v {
						v[i] = float32(math.Sin(float64(r*count+i))) * float32(1+i%7) * 1e-3
						if r == 0 {
							want[i] = v[i]
						} else {
							want[i] += v[i]
						}
					}
				}
				allReduceAll(t, comms, bufs, OpSum)
				for r := range bufs {
					for i, x := range bufs[r].AsFloat32() {
						if math.Float32bits(x) != math.Float32bits(want[i]) {
							t.Fatalf("%s n=%d workers=%d: rank %d element %d = %v, want %v", tr, n, workers, r, i, x, want[i])
						}
					}
				}
			}
		}
	}
}

// Ranks that call different operations, or run different algorithms, fail
// with a mismatch on every rank; none hangs.
func TestSameProcessMismatchFailsEveryRank(t *testing.T) {
	cases := map[string]func(r int) (Buffer, Op, bool){
		"count": func(r int) (Buffer, Op, bool) { return NewHostBuffer(Float32, 1000+r), OpSum, false },
		"dtype": func(r int) (Buffer, Op, bool) {
			if r == 1 {
				return NewHostBuffer(Int32, 1000), OpSum, false
			}
			return NewHostBuffer(Float32, 1000), OpSum, false
		},
		"op": func(r int) (Buffer, Op, bool) {
			if r == 2 {
				return NewHostBuffer(Float32, 1000), OpMax, false
			}
			return NewHostBuffer(Float32, 1000), OpSum, false
		},
		// rank 0 keeps to the ring (another config): the others' direct
		// frames and its ring frames disagree on the algorithm.
		"ring": func(r int) (Buffer, Op, bool) { return NewHostBuffer(Float32, 100000), OpSum, r == 0 },
	}
	for name, mk := range cases {
		for _, tr := range []string{"local", "shared"} {
			t.Run(name+"/"+tr, func(t *testing.T) {
				base := sameProcessConfig(t)
				comms := make([]*Communicator, 3)
				var ring [3]bool
				for r := range comms {
					_, _, ring[r] = mk(r)
				}
				// one group per case, each rank with its own config
				var (
					lt  *LocalTransport
					grp *LoopbackGroup
				)
				if tr == "local" {
					lt = NewLocalTransport()
				} else {
					s, err := Listen("127.0.0.1:0", DefaultNetConfig())
					if err != nil {
						t.Fatal(err)
					}
					grp = &LoopbackGroup{Servers: []*Server{s}}
					t.Cleanup(grp.Close)
				}
				for r := range comms {
					cfg := base
					cfg.NoSameProcess = ring[r]
					var err error
					if lt != nil {
						comms[r], err = New(lt, Group{Job: "mm", Generation: 1, Rank: r, Addrs: []string{"a", "a", "a"}}, cfg)
					} else {
						a := grp.Servers[0].Addr()
						comms[r], err = New(grp.Servers[0].Transport(), Group{Job: "mm", Generation: 1, Rank: r, Addrs: []string{a, a, a}}, cfg)
						grp.Comms = append(grp.Comms, comms[r])
					}
					if err != nil {
						t.Fatal(err)
					}
				}
				if lt != nil {
					defer CloseAll(comms)
				}
				errs := RunAll(comms, func(c *Communicator) error {
					b, op, _ := mk(c.Rank())
					return c.AllReduce(context.Background(), b, op)
				})
				for r, err := range errs {
					if !errors.Is(err, ErrMismatch) {
						t.Fatalf("rank %d: %v, want ErrMismatch", r, err)
					}
				}
			})
		}
	}
}

func TestSameProcessKilledPeerFailsSurvivors(t *testing.T) {
	tr, comms, err := NewLocalGroup("job", 1, 4, sameProcessConfig(t))
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	errs := make(chan error, 3)
	for _, c := range comms {
		if c.Rank() == 2 {
			continue
		}
		go func() { errs <- c.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<16), OpSum) }()
	}
	poll.Until(t, 10*time.Second, func() bool {
		return comms[0].active.Load() == 1 && comms[1].active.Load() == 1 && comms[3].active.Load() == 1
	})
	tr.Kill("job", 1, 2)
	for i := 0; i < 3; i++ {
		if err := <-errs; !errors.Is(err, ErrPeerFailed) {
			t.Fatalf("survivor error %v, want ErrPeerFailed", err)
		}
	}
}

func TestSameProcessHungPeerTimesOut(t *testing.T) {
	cfg := sameProcessConfig(t)
	cfg.Timeout = 300 * time.Millisecond
	_, comms, err := NewLocalGroup("job", 1, 3, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	errs := RunAll(comms[:2], func(c *Communicator) error {
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<16), OpSum)
	})
	for r, err := range errs {
		if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrPeerFailed) {
			t.Fatalf("rank %d: %v, want a timeout", r, err)
		}
	}
}

// Only groups whose every rank is in this process take the path: ranks on
// separate servers, or some on another server, run the ring; so do buffers
// that are not plain host memory.
func TestSameProcessOnlyWhereEveryRankIsLocal(t *testing.T) {
	cfg := sameProcessConfig(t)
	g, err := NewLoopbackGroup("sep", 1, 2, cfg, DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	allReduceChecked(t, g.Comms, Float32, OpSum, 100000, "separate servers")
	sameAlgos(t, g.Comms, AlgoNameRing, "separate servers")

	s0, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	s1, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	mixed := &LoopbackGroup{Servers: []*Server{s0, s1}}
	defer mixed.Close()
	addrs := []string{s0.Addr(), s0.Addr(), s1.Addr()}
	for r, s := range []*Server{s0, s0, s1} {
		c, err := New(s.Transport(), Group{Job: "mixed", Generation: 1, Rank: r, Addrs: addrs}, cfg)
		if err != nil {
			t.Fatal(err)
		}
		mixed.Comms = append(mixed.Comms, c)
	}
	allReduceChecked(t, mixed.Comms, Float32, OpSum, 100000, "mixed")
	sameAlgos(t, mixed.Comms, AlgoNameRing, "mixed")

	_, comms, err := NewLocalGroup("wrapped", 1, 2, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	host := newFakeHost()
	bufs := []*sameHostBuf{{HostBuffer: NewHostBuffer(Float32, 1000), host: host}, {HostBuffer: NewHostBuffer(Float32, 1000), host: host}}
	for r, b := range bufs {
		fill(b.HostBuffer, OpSum, r)
	}
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
	}))
	for r, b := range bufs {
		checkResult(t, b.HostBuffer, OpSum, 2, r, "not a HostBuffer")
	}
	for _, c := range comms {
		if c.LastAllReduceAlgorithm() == AlgoNameSameProcess {
			t.Fatalf("rank %d ran the same-process path on a %T", c.Rank(), bufs[0])
		}
	}
}

// A retracted share waits for the peers inside the buffer and lets no later
// one in: after a failed operation returns, no peer touches its memory.
func TestDirectShareRetractWaitsForUsers(t *testing.T) {
	s := newDirectShare(2)
	for range 2 {
		if !s.enter() {
			t.Fatal("enter refused before retract")
		}
	}
	done := make(chan struct{})
	go func() { s.retract(); close(done) }()
	s.leave()
	select {
	case <-done:
		t.Fatal("retract returned with a peer still inside")
	default:
	}
	poll.Until(t, 5*time.Second, func() bool {
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.retracted
	})
	if s.enter() {
		t.Fatal("enter allowed after retract")
	}
	s.leave()
	<-done
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := s.wait(ctx); err == nil {
		t.Fatal("wait without releases returned nil")
	}
	// Both peers released, one without finishing its block: the owner's
	// operation must fail, not return a buffer with a block never written.
	s.finish()
	s.SendDone()
	s.SendDone()
	if err := s.wait(context.Background()); !errors.Is(err, ErrPeerFailed) {
		t.Fatalf("wait after an unfinished release: %v, want ErrPeerFailed", err)
	}
	s.finish()
	if err := s.wait(context.Background()); err != nil {
		t.Fatal(err)
	}
}
