package collective

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gpumesh/gpumesh/internal/poll"
)

func TestMain(m *testing.M) {
	// The tests' buffers are small: keep every configured channel busy
	// (TestSmallOperationsUseFewerChannels checks the real minimum).
	minChannelBytes = 0
	goleak.VerifyTestMain(m)
}

func testConfig() Config {
	cfg := DefaultConfig()
	cfg.ChunkBytes = 4 << 10
	cfg.Channels = 2
	cfg.SmallBytes = 256
	cfg.Timeout = 10 * time.Second
	// These tests are the ring's (and recursive doubling's): ranks of one
	// process would otherwise take the same-process path, whose own tests
	// are in sameprocess_test.go.
	cfg.NoSameProcess = true
	return cfg
}

// value is the test input of rank r at element i: small integers, so that
// every dtype and every reduction order gives exact results.
func value(dt DType, op Op, r, i int) float64 {
	switch op {
	case OpProd:
		return float64((r+i)%2 + 1) // 1 or 2
	case OpMax, OpMin:
		if dt == Uint8 {
			return float64((r*7 + i*3) % 11)
		}
		return float64((r*7+i*3)%11) - 5
	}
	v := float64((r*7+i*3)%5) - 2
	if dt == Uint8 {
		v += 2
	}
	return v
}

func reference(dt DType, op Op, n, i int) float64 {
	acc := value(dt, op, 0, i)
	for r := 1; r < n; r++ {
		v := value(dt, op, r, i)
		switch op {
		case OpSum, OpAvg:
			acc += v
		case OpProd:
			acc *= v
		case OpMax:
			acc = math.Max(acc, v)
		case OpMin:
			acc = math.Min(acc, v)
		}
	}
	if op == OpAvg {
		if dt.IsFloat() {
			acc /= float64(n)
			switch dt {
			case Float16:
				acc = float64(F16ToF32(F64ToF16(acc)))
			case BFloat16:
				acc = float64(BF16ToF32(F64ToBF16(acc)))
			case Float32:
				acc = float64(float32(acc))
			}
		} else {
			acc = float64(int64(acc) / int64(n)) // truncation toward zero
		}
	}
	if dt == Uint8 {
		acc = float64(uint8(int64(acc)))
	}
	return acc
}

func fill(b *HostBuffer, op Op, r int) {
	for i := 0; i < b.Len(); i++ {
		b.Set(i, value(b.DType(), op, r, i))
	}
}

func checkResult(t *testing.T, b *HostBuffer, op Op, n, rank int, what string) {
	t.Helper()
	for i := 0; i < b.Len(); i++ {
		want := reference(b.DType(), op, n, i)
		if got := b.At(i); got != want {
			t.Fatalf("%s: rank %d element %d = %v, want %v", what, rank, i, got, want)
		}
	}
}

func noErrs(t *testing.T, errs []error) {
	t.Helper()
	for r, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
}

// allReduceAll all-reduces bufs[r] with op on rank r of comms, every rank
// at once, and fails the test if a rank returns an error.
func allReduceAll[B Buffer](t *testing.T, comms []*Communicator, bufs []B, op Op) {
	t.Helper()
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), bufs[c.Rank()], op)
	}))
}

// allReduceChecked gives each rank of comms a buffer of count elements of
// dt holding its test input (fill), all-reduces them with op and checks
// every rank's result; what names the case in failures.
func allReduceChecked(t *testing.T, comms []*Communicator, dt DType, op Op, count int, what string) {
	t.Helper()
	bufs := make([]*HostBuffer, len(comms))
	for r := range bufs {
		bufs[r] = NewHostBuffer(dt, count)
		fill(bufs[r], op, r)
	}
	allReduceAll(t, comms, bufs, op)
	for r := range bufs {
		checkResult(t, bufs[r], op, len(comms), r, what)
	}
}

func TestAllReduceEveryOpDType(t *testing.T) {
	counts := []int{0, 1, 3, 7, 64, 1000, 5003}
	ns := []int{1, 2, 3, 4, 5, 6, 7, 8}
	if testing.Short() {
		ns = []int{1, 2, 3, 5}
	}
	for _, n := range ns {
		_, comms, err := NewLocalGroup("job", 1, n, testConfig())
		if err != nil {
			t.Fatal(err)
		}
		for _, dt := range AllDTypes {
			for _, op := range AllOps {
				for _, count := range counts {
					allReduceChecked(t, comms, dt, op, count, fmt.Sprintf("n=%d %v %v count=%d", n, dt, op, count))
				}
			}
		}
		CloseAll(comms)
	}
}

func TestFloatSumBitwiseReproducible(t *testing.T) {
	for _, n := range []int{2, 3, 5} {
		for _, count := range []int{33, 40000} { // recursive doubling and ring
			var first [][]byte
			for run := 0; run < 3; run++ {
				_, comms, err := NewLocalGroup("job", uint64(run), n, testConfig())
				if err != nil {
					t.Fatal(err)
				}
				bufs := make([]*HostBuffer, n)
				for r := range bufs {
					bufs[r] = NewHostBuffer(Float32, count)
					v := bufs[r].AsFloat32()
					for i := range v {
						v[i] = float32(math.Sin(float64(r*count+i))) * float32(1+i%7) * 1e-3
					}
				}
				allReduceAll(t, comms, bufs, OpSum)
				CloseAll(comms)
				for r := 1; r < n; r++ {
					if string(bufs[r].Bytes()) != string(bufs[0].Bytes()) {
						t.Fatalf("n=%d count=%d: rank %d differs from rank 0", n, count, r)
					}
				}
				if run == 0 {
					first = append(first, append([]byte(nil), bufs[0].Bytes()...))
				} else if string(first[0]) != string(bufs[0].Bytes()) {
					t.Fatalf("n=%d count=%d: run %d differs from run 0", n, count, run)
				}
			}
		}
	}
}

func TestAllReduceIntoLeavesSource(t *testing.T) {
	_, comms, err := NewLocalGroup("job", 1, 3, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	src := make([]*HostBuffer, 3)
	dst := make([]*HostBuffer, 3)
	for r := range src {
		src[r] = NewHostBuffer(Int64, 4099)
		fill(src[r], OpSum, r)
		dst[r] = NewHostBuffer(Int64, 4099)
	}
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		return c.AllReduceInto(context.Background(), dst[c.Rank()], src[c.Rank()], OpSum)
	}))
	for r := range src {
		checkResult(t, dst[r], OpSum, 3, r, "out of place")
		for i := 0; i < src[r].Len(); i++ {
			if src[r].At(i) != value(Int64, OpSum, r, i) {
				t.Fatalf("rank %d source changed at %d", r, i)
			}
		}
	}
}

func TestReduceScatterAndAllGather(t *testing.T) {
	combos := []struct {
		dt DType
		op Op
	}{{Float32, OpSum}, {Int32, OpAvg}, {BFloat16, OpMax}, {Float64, OpProd}}
	for ci, n := range []int{1, 2, 3, 4, 7} {
		dt, op := combos[ci%len(combos)].dt, combos[ci%len(combos)].op
		_, comms, err := NewLocalGroup("job", 1, n, testConfig())
		if err != nil {
			t.Fatal(err)
		}
		for _, count := range []int{0, 1, 5, 1001, 10007} {
			for _, inPlace := range []bool{true, false} {
				src := make([]*HostBuffer, n)
				dst := make([]*HostBuffer, n)
				for r := range src {
					src[r] = NewHostBuffer(dt, count)
					fill(src[r], op, r)
					dst[r] = NewHostBuffer(dt, BlockLen(count, n, r))
				}
				noErrs(t, RunAll(comms, func(c *Communicator) error {
					if inPlace {
						return c.ReduceScatter(context.Background(), nil, src[c.Rank()], op)
					}
					return c.ReduceScatter(context.Background(), dst[c.Rank()], src[c.Rank()], op)
				}))
				for r := range src {
					off, l := Part(count, n, r)
					for i := 0; i < l; i++ {
						got := dst[r].At(i)
						if inPlace {
							got = src[r].At(off + i)
						} else if src[r].At(off+i) != value(dt, op, r, off+i) {
							t.Fatalf("out-of-place ReduceScatter changed the source")
						}
						if want := reference(dt, op, n, off+i); got != want {
							t.Fatalf("%v %v n=%d count=%d inPlace=%v: rank %d element %d = %v, want %v", dt, op, n, count, inPlace, r, off+i, got, want)
						}
					}
				}
				// AllGather the blocks back.
				out := make([]*HostBuffer, n)
				for r := range out {
					out[r] = NewHostBuffer(dt, count)
					if inPlace {
						off, l := Part(count, n, r)
						es := dt.Size()
						copy(out[r].Bytes()[off*es:(off+l)*es], src[r].Bytes()[off*es:(off+l)*es])
					}
				}
				noErrs(t, RunAll(comms, func(c *Communicator) error {
					if inPlace {
						return c.AllGather(context.Background(), out[c.Rank()], nil)
					}
					return c.AllGather(context.Background(), out[c.Rank()], dst[c.Rank()])
				}))
				for r := range out {
					checkResult(t, out[r], op, n, r, fmt.Sprintf("allgather %v %v n=%d count=%d", dt, op, n, count))
				}
			}
		}
		CloseAll(comms)
	}
}

func TestBroadcastAndSendRecv(t *testing.T) {
	n := 4
	_, comms, err := NewLocalGroup("job", 1, n, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	for root := 0; root < n; root++ {
		bufs := make([]*HostBuffer, n)
		for r := range bufs {
			bufs[r] = NewHostBuffer(Float64, 3001)
			fill(bufs[r], OpSum, r)
		}
		noErrs(t, RunAll(comms, func(c *Communicator) error {
			return c.Broadcast(context.Background(), bufs[c.Rank()], root)
		}))
		for r := range bufs {
			for i := 0; i < 3001; i++ {
				if bufs[r].At(i) != value(Float64, OpSum, root, i) {
					t.Fatalf("broadcast root %d: rank %d element %d wrong", root, r, i)
				}
			}
		}
	}
	// Every rank sends to the next and receives from the previous at once.
	bufs := make([]*HostBuffer, n)
	got := make([]*HostBuffer, n)
	for r := range bufs {
		bufs[r] = NewHostBuffer(Int32, 9999)
		fill(bufs[r], OpSum, r)
		got[r] = NewHostBuffer(Int32, 9999)
	}
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		errc := make(chan error, 1)
		go func() { errc <- c.SendTagged(context.Background(), bufs[c.Rank()], (c.Rank()+1)%n, 7) }()
		rerr := c.RecvTagged(context.Background(), got[c.Rank()], (c.Rank()+n-1)%n, 7)
		return errors.Join(rerr, <-errc)
	}))
	for r := range got {
		from := (r + n - 1) % n
		for i := 0; i < 9999; i++ {
			if got[r].At(i) != value(Int32, OpSum, from, i) {
				t.Fatalf("recv rank %d element %d wrong", r, i)
			}
		}
	}
	noErrs(t, RunAll(comms, func(c *Communicator) error { return c.Barrier(context.Background()) }))
}

func TestMismatchFailsEveryRank(t *testing.T) {
	cases := []struct {
		name string
		call func(c *Communicator) error
		want string
	}{
		{"count", func(c *Communicator) error {
			count := 1000
			if c.Rank() == 0 {
				count = 999
			}
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, count), OpSum)
		}, "count=999"},
		{"dtype", func(c *Communicator) error {
			dt := Float32
			if c.Rank() == 2 {
				dt = Int32
			}
			return c.AllReduce(context.Background(), NewHostBuffer(dt, 100000), OpSum)
		}, "called AllReduce(int32, count=100000)"},
		{"op", func(c *Communicator) error {
			op := OpSum
			if c.Rank() == 1 {
				op = OpMax
			}
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, 10), op)
		}, "op=max"},
		{"collective", func(c *Communicator) error {
			if c.Rank() == 1 {
				return c.Broadcast(context.Background(), NewHostBuffer(Float32, 5000), 0)
			}
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, 5000), OpSum)
		}, "Broadcast(float32, count=5000"},
		{"empty vs not", func(c *Communicator) error {
			count := 0
			if c.Rank() == 1 {
				count = 4
			}
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, count), OpSum)
		}, "count=0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, comms, err := NewLocalGroup("job", 1, 3, testConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer CloseAll(comms)
			errs := RunAll(comms, tc.call)
			for r, err := range errs {
				if !errors.Is(err, ErrMismatch) {
					t.Fatalf("rank %d: error %v, want ErrMismatch", r, err)
				}
				if !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "but rank") {
					t.Fatalf("rank %d: error %q does not name the mismatch (%q)", r, err, tc.want)
				}
			}
			// The communicator stays aborted.
			if err := comms[0].Barrier(context.Background()); !errors.Is(err, ErrAborted) {
				t.Fatalf("after a failure: %v, want ErrAborted", err)
			}
		})
	}
}

func TestKilledPeerFailsSurvivors(t *testing.T) { killedPeerFailsSurvivors(t, testConfig()) }

// killedPeerFailsSurvivors: rank 2 of 4 never calls; it is killed while the
// others wait in the all-reduce, and every survivor fails with
// ErrPeerFailed (the ring's config, or the same-process path's).
func killedPeerFailsSurvivors(t *testing.T, cfg Config) {
	tr, comms, err := NewLocalGroup("job", 1, 4, cfg)
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

func TestHungPeerTimesOut(t *testing.T) {
	cfg := testConfig()
	cfg.Timeout = 300 * time.Millisecond
	tr, comms, err := NewLocalGroup("job", 1, 3, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	// Everything to and from rank 1 is lost (a partition): nobody gets an
	// RST, only the timeout can end it.
	tr.SetFault(func(job string, src, dst, ch int, h *Header) FaultAction {
		return FaultAction{Drop: src == 1 || dst == 1}
	})
	start := time.Now()
	errs := RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<15), OpSum)
	})
	for r, err := range errs {
		if !errors.Is(err, ErrTimeout) {
			t.Fatalf("rank %d: %v, want ErrTimeout", r, err)
		}
	}
	if el := time.Since(start); el > 10*cfg.Timeout+5*time.Second {
		t.Fatalf("took %v with a %v timeout", el, cfg.Timeout)
	}
}

func TestContextCancelAbortsGroup(t *testing.T) {
	_, comms, err := NewLocalGroup("job", 1, 2, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- comms[0].AllReduce(ctx, NewHostBuffer(Float32, 1<<16), OpSum) }()
	poll.Until(t, 10*time.Second, func() bool { return comms[0].active.Load() == 1 })
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("got %v, want context.Canceled", err)
	}
	// The peer learns of it.
	if err := comms[1].AllReduce(context.Background(), NewHostBuffer(Float32, 1<<16), OpSum); !errors.Is(err, ErrAborted) {
		t.Fatalf("peer got %v, want ErrAborted", err)
	}
}

func TestBadArguments(t *testing.T) {
	_, comms, err := NewLocalGroup("job", 1, 2, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	c := comms[0]
	ctx := context.Background()
	for name, err := range map[string]error{
		"nil buffer": c.AllReduce(ctx, nil, OpSum),
		"bad op":     c.AllReduce(ctx, NewHostBuffer(Float32, 1), Op(99)),
		"root":       c.Broadcast(ctx, NewHostBuffer(Float32, 1), 5),
		"self send":  c.Send(ctx, NewHostBuffer(Float32, 1), 0),
		"rs size":    c.ReduceScatter(ctx, NewHostBuffer(Float32, 3), NewHostBuffer(Float32, 10), OpSum),
		"ag size":    c.AllGather(ctx, NewHostBuffer(Float32, 10), NewHostBuffer(Float32, 4)),
	} {
		if !errors.Is(err, ErrBadArgument) && !errors.Is(err, ErrBadOp) {
			t.Errorf("%s: got %v, want a bad-argument error", name, err)
		}
	}
	if _, err := New(NewLocalTransport(), Group{Job: "j", Rank: 3, Addrs: []string{"a"}}, DefaultConfig()); !errors.Is(err, ErrBadArgument) {
		t.Errorf("bad rank: %v", err)
	}
	bad := DefaultConfig()
	bad.Channels = 0
	if err := bad.Validate(); err == nil || !strings.Contains(err.Error(), "channels must be 1..64, got 0") {
		t.Errorf("config: %v", err)
	}
}

// Delayed frames (a slow link) slow an operation down but never change its
// result or order.
func TestDelayedLinkStillCorrect(t *testing.T) {
	tr, comms, err := NewLocalGroup("job", 1, 3, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	var delayed atomicCount
	tr.SetFault(func(job string, src, dst, ch int, h *Header) FaultAction {
		if src == 1 && h.Offset%3 == 0 {
			delayed.add()
			return FaultAction{Delay: time.Millisecond}
		}
		return FaultAction{}
	})
	allReduceChecked(t, comms, Int32, OpSum, 30011, "delayed")
	if delayed.get() == 0 {
		t.Fatal("the fault hook delayed nothing")
	}
}

type atomicCount struct{ n atomic.Int64 }

func (a *atomicCount) add()       { a.n.Add(1) }
func (a *atomicCount) get() int64 { return a.n.Load() }

// Ranks configured with different channel counts get a clear error, not a
// hang or a panic.
func TestChannelConfigMismatch(t *testing.T) {
	tr := NewLocalTransport()
	addrs := []string{"a", "b"}
	comms := make([]*Communicator, 2)
	for r := range comms {
		cfg := testConfig()
		cfg.Timeout = 2 * time.Second
		cfg.Channels = 2 + 2*r
		var err error
		if comms[r], err = New(tr, Group{Job: "j", Rank: r, Addrs: addrs}, cfg); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	errs := RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, 100000), OpSum)
	})
	for r, err := range errs {
		if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "channels") {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
}
