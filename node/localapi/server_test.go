//go:build linux

package localapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// fakeAuth accepts hellos of job "j" generation 1 with secret "ok-<rank>".
type fakeAuth struct{ ranks int }

func (a fakeAuth) Authorize(_ context.Context, h *Hello) ([]string, error) {
	if h.Job != "j" || h.Generation != 1 || h.Secret != fmt.Sprintf("ok-%d", h.Rank) || h.Rank >= a.ranks {
		return nil, fmt.Errorf("%w: bad secret or rank", ErrDenied)
	}
	addrs := make([]string, a.ranks)
	for i := range addrs {
		addrs[i] = "local"
	}
	return addrs, nil
}

func startServer(t testing.TB, ranks int) *Server {
	t.Helper()
	cc := collective.DefaultConfig()
	cc.Timeout = 5 * time.Second
	return startServerWith(t, ranks, collective.NewLocalTransport(), cc)
}

// startServerWith is startServer on transport tr with collective config cc.
func startServerWith(t testing.TB, ranks int, tr collective.Transport, cc collective.Config) *Server {
	t.Helper()
	s, err := Listen(Config{
		SocketPath: filepath.Join(t.TempDir(), "local.sock"),
		Transport:  tr,
		Collective: cc,
		Authorizer: fakeAuth{ranks: ranks},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

// connectRanks dials s as ranks 0..ranks-1 of the job, says hello with each
// rank's secret and, with regBytes > 0, registers region 1 of regBytes for
// each; it returns the clients and the regions' memory.
func connectRanks(t testing.TB, s *Server, ranks, regBytes int) ([]*client, [][]byte) {
	t.Helper()
	cls := make([]*client, ranks)
	mems := make([][]byte, ranks)
	for r := range cls {
		cls[r] = dial(t, s)
		if rep := cls[r].hello(r, ranks, fmt.Sprintf("ok-%d", r)); rep.Type != MsgWelcome {
			t.Fatalf("rank %d hello: %+v", r, rep)
		}
		if regBytes > 0 {
			mems[r] = cls[r].register(1, regBytes)
		}
	}
	return cls, mems
}

// client is a Go client of the protocol (the Python package's twin).
type client struct {
	t    testing.TB
	c    *net.UnixConn
	mems map[uint64][]byte
}

func dial(t testing.TB, s *Server) *client {
	t.Helper()
	c, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: s.SocketPath(), Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	cl := &client{t: t, c: c, mems: map[uint64][]byte{}}
	t.Cleanup(cl.close)
	return cl
}

func (cl *client) close() {
	_ = cl.c.Close()
	for id, m := range cl.mems {
		_ = unix.Munmap(m)
		delete(cl.mems, id)
	}
}

func (cl *client) send(b []byte, fds ...int) {
	cl.t.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := cl.c.WriteMsgUnix(b, oob, nil); err != nil {
		cl.t.Fatal(err)
	}
}

func (cl *client) recv() Reply {
	cl.t.Helper()
	buf := make([]byte, MaxMessage)
	_ = cl.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	n, err := cl.c.Read(buf)
	if err != nil {
		cl.t.Fatalf("reading a reply: %v", err)
	}
	r, err := DecodeReply(buf[:n])
	if err != nil {
		cl.t.Fatal(err)
	}
	return r
}

// recvDone returns the next reply that is not an unasked FAILED (which may
// come before or after the DONE of the operation that failed).
func (cl *client) recvDone() Reply {
	cl.t.Helper()
	for {
		if r := cl.recv(); r.Type != MsgFailed {
			return r
		}
	}
}

// closed reports whether the agent closed the connection.
func (cl *client) closed() bool {
	buf := make([]byte, MaxMessage)
	_ = cl.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	n, err := cl.c.Read(buf)
	return n == 0 || err != nil
}

func (cl *client) hello(rank, n int, secret string) Reply {
	ranks := make([]int, n)
	for i := range ranks {
		ranks[i] = i
	}
	cl.send(EncodeHello(&Hello{Version: Version, Rank: rank, GroupRank: rank, GroupSize: n, Generation: 1, Job: "j", GroupID: "0", Secret: secret, Ranks: ranks}))
	return cl.recv()
}

// memfd creates a sealed memfd of size bytes and maps it.
func memfd(t testing.TB, size int, seal bool) (int, []byte) {
	t.Helper()
	fd, err := unix.MemfdCreate("gpumesh-test", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		t.Fatal(err)
	}
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		t.Fatal(err)
	}
	if seal {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW); err != nil {
			t.Fatal(err)
		}
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	return fd, m
}

func (cl *client) register(id uint64, size int) []byte {
	cl.t.Helper()
	fd, m := memfd(cl.t, size, true)
	cl.send(EncodeRegister(Register{ID: id, Size: uint64(size)}), fd)
	_ = unix.Close(fd)
	if r := cl.recv(); r.Type != MsgRegistered || r.Status != StatusOK || r.ID != id {
		cl.t.Fatalf("register: %+v", r)
	}
	cl.mems[id] = m
	return m
}

func f32(b []byte) []float32 { return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4) }

// Two ranks run every operation through their agent's server; results
// match a reference computed here.
func TestServerRunsEveryOperation(t *testing.T) {
	s := startServer(t, 2)
	const n = 100000 // float32 elements
	cls, mems := connectRanks(t, s, 2, 3*n*4)
	do := func(op func(r int) *Op, check func(r int, v []float32) error) {
		t.Helper()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for r := range cls {
			wg.Add(1)
			go func() {
				defer wg.Done()
				cls[r].send(EncodeOp(op(r)))
			}()
		}
		wg.Wait()
		for r := range cls {
			rep := cls[r].recv()
			if rep.Type != MsgDone || rep.Status != StatusOK {
				t.Fatalf("rank %d: %+v", r, rep)
			}
			errs[r] = check(r, f32(mems[r]))
		}
		if err := errors.Join(errs...); err != nil {
			t.Fatal(err)
		}
	}
	for r := range cls {
		v := f32(mems[r])
		for i := 0; i < n; i++ {
			v[i] = float32(r*1000 + i%1000)
		}
	}
	do(func(r int) *Op {
		return &Op{Kind: OpAllReduce, DType: uint8(collective.Float32), Reduce: uint8(collective.OpSum), ID: 1, A: BufRef{Region: 1, Count: n}}
	}, func(r int, v []float32) error {
		for i := 0; i < n; i++ {
			if want := float32(1000 + 2*(i%1000)); v[i] != want {
				return fmt.Errorf("rank %d all_reduce [%d] = %v, want %v", r, i, v[i], want)
			}
		}
		return nil
	})
	// all_gather: input at element n (n/2 elements), output at element 0.
	for r := range cls {
		v := f32(mems[r])
		for i := 0; i < n/2; i++ {
			v[n+i] = float32(r + 1)
		}
	}
	do(func(r int) *Op {
		return &Op{Kind: OpAllGather, DType: uint8(collective.Float32), ID: 2, A: BufRef{Region: 1, Count: n}, B: BufRef{Region: 1, Offset: 4 * n, Count: n / 2}}
	}, func(r int, v []float32) error {
		if v[0] != 1 || v[n/2-1] != 1 || v[n/2] != 2 || v[n-1] != 2 {
			return fmt.Errorf("rank %d all_gather: %v %v %v %v", r, v[0], v[n/2-1], v[n/2], v[n-1])
		}
		return nil
	})
	// reduce_scatter: input elements [0,n) (the gathered 1s and 2s), output at 2n.
	do(func(r int) *Op {
		return &Op{Kind: OpReduceScatter, DType: uint8(collective.Float32), Reduce: uint8(collective.OpMax), ID: 3, A: BufRef{Region: 1, Offset: 8 * n, Count: n / 2}, B: BufRef{Region: 1, Count: n}}
	}, func(r int, v []float32) error {
		if want := float32(r + 1); v[2*n] != want || v[2*n+n/2-1] != want {
			return fmt.Errorf("rank %d reduce_scatter: %v, want %v", r, v[2*n], want)
		}
		return nil
	})
	f32(mems[1])[5] = 42
	do(func(r int) *Op {
		return &Op{Kind: OpBroadcast, DType: uint8(collective.Float32), Peer: 1, ID: 4, A: BufRef{Region: 1, Count: n}}
	}, func(r int, v []float32) error {
		if v[5] != 42 {
			return fmt.Errorf("rank %d broadcast: %v", r, v[5])
		}
		return nil
	})
	f32(mems[0])[7] = -3
	do(func(r int) *Op {
		k := uint8(OpSend)
		if r == 1 {
			k = OpRecv
		}
		return &Op{Kind: k, DType: uint8(collective.Float32), Peer: int32(1 - r), Tag: 5, ID: 5, A: BufRef{Region: 1, Count: 10}}
	}, func(r int, v []float32) error {
		if v[7] != -3 {
			return fmt.Errorf("rank %d send/recv: %v", r, v[7])
		}
		return nil
	})
	do(func(r int) *Op { return &Op{Kind: OpBarrier, ID: 6} }, func(int, []float32) error { return nil })
	st := s.Snapshot()
	if len(st) != 2 || st[0].Ops["all_reduce"] != 1 || st[0].Bytes["all_reduce"] != 4*n || st[0].LatencySeconds["all_reduce"] <= 0 {
		t.Fatalf("stats: %+v", st)
	}
	for _, c := range cls {
		c.close()
	}
	waitIdle(t, s)
}

// waitIdle waits until the server holds no connection, goroutine or
// mapping.
func waitIdle(t *testing.T, s *Server) {
	t.Helper()
	poll.Until(t, 10*time.Second, func() error {
		if l := s.Live(); l != (Live{}) {
			return fmt.Errorf("server still holds %+v", l)
		}
		return nil
	})
}

// A hostile client gets an error and cannot wedge or crash the agent:
// garbage, a wrong secret, a second hello, descriptors it does not own
// properly (none, unsealed), buffers outside its region, unknown kinds.
func TestServerSurvivesHostileClients(t *testing.T) {
	s := startServer(t, 2)
	expectError := func(cl *client, status uint8, what string) {
		t.Helper()
		r := cl.recv()
		if r.Type != MsgError || r.Status != status || r.Message == "" {
			t.Fatalf("%s: got %+v, want an error with status %d", what, r, status)
		}
		if !cl.closed() {
			t.Fatalf("%s: the connection stayed open", what)
		}
	}
	g := dial(t, s)
	g.send([]byte("GET / HTTP/1.1\r\n\r\n"))
	expectError(g, StatusBadRequest, "garbage")

	w := dial(t, s)
	if r := w.hello(0, 2, "guess"); r.Type != MsgError || r.Status != StatusDenied || !strings.Contains(r.Message, "denied") {
		t.Fatalf("wrong secret: %+v", r)
	}

	op := dial(t, s)
	op.send(EncodeOp(&Op{Kind: OpAllReduce}))
	expectError(op, StatusBadRequest, "op before hello")

	c := dial(t, s)
	if r := c.hello(0, 2, "ok-0"); r.Type != MsgWelcome {
		t.Fatalf("hello: %+v", r)
	}
	// The same rank of the same group cannot attach twice.
	c2 := dial(t, s)
	if r := c2.hello(0, 2, "ok-0"); r.Type != MsgError || r.Status != StatusDenied {
		t.Fatalf("second attach: %+v", r)
	}
	c.send(EncodeRegister(Register{ID: 1, Size: 4096}))
	if r := c.recv(); r.Type != MsgRegistered || r.Status != StatusBadRequest {
		t.Fatalf("register without a descriptor: %+v", r)
	}
	fd, m := memfd(t, 4096, false)
	defer unix.Munmap(m)
	c.send(EncodeRegister(Register{ID: 1, Size: 4096}), fd)
	if r := c.recv(); r.Type != MsgRegistered || r.Status != StatusBadRequest || !strings.Contains(r.Message, "sealed") {
		t.Fatalf("unsealed memfd: %+v", r)
	}
	c.send(EncodeRegister(Register{ID: 1, Size: 1 << 20}), fd)
	if r := c.recv(); r.Type != MsgRegistered || r.Status != StatusBadRequest {
		t.Fatalf("region larger than its file: %+v", r)
	}
	unix.Close(fd)
	pipe := make([]int, 2)
	if err := unix.Pipe(pipe); err != nil {
		t.Fatal(err)
	}
	c.send(EncodeRegister(Register{ID: 2, Size: 4096}), pipe[0])
	unix.Close(pipe[0])
	unix.Close(pipe[1])
	if r := c.recv(); r.Type != MsgRegistered || r.Status != StatusBadRequest || !strings.Contains(r.Message, "memfd") {
		t.Fatalf("a pipe as a region: %+v", r)
	}
	c.register(3, 4096)
	for i, bad := range []*Op{
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 10, A: BufRef{Region: 3, Count: 2048}},               // past the end
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 11, A: BufRef{Region: 3, Offset: 2, Count: 4}},       // misaligned
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 12, A: BufRef{Region: 3, Count: 1 << 62}},            // overflow
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 13, A: BufRef{Region: 3, Offset: 1 << 63, Count: 1}}, // overflow
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 14, A: BufRef{Region: 9, Count: 1}},                  // unknown region
		{Kind: OpAllReduce, DType: 99, Reduce: 1, ID: 15, A: BufRef{Region: 3, Count: 1}},                 // dtype
		{Kind: OpAllReduce, DType: 1, Reduce: 99, ID: 16, A: BufRef{Region: 3, Count: 1}},                 // reduce op
		{Kind: 42, DType: 1, ID: 17, A: BufRef{Region: 3, Count: 1}},                                      // kind
		{Kind: OpSend, DType: 1, Peer: 0, ID: 18, A: BufRef{Region: 3, Count: 1}},                         // to itself
		{Kind: OpAllGather, DType: 1, ID: 19, A: BufRef{Region: 3, Count: 3}, B: BufRef{Region: 3, Count: 2}},
		// Table operations: without a table, a table for another kind, a
		// table for 3 ranks of a group of 2, a block past the region's end,
		// a root outside the group.
		{Kind: OpAllToAll, DType: 1, ID: 21},
		{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 22, Table: make([]BufRef, 4)},
		{Kind: OpAllToAll, DType: 1, ID: 23, Table: make([]BufRef, 6)},
		{Kind: OpAllToAll, DType: 1, ID: 24, Table: []BufRef{{}, {}, {Region: 3, Count: 2048}, {Region: 3, Count: 1}}},
		{Kind: OpGather, DType: 1, Peer: 2, ID: 25, Table: make([]BufRef, 4)},
	} {
		c.send(EncodeOp(bad))
		if r := c.recv(); r.Type != MsgDone || r.ID != bad.ID || r.Status != StatusBadRequest {
			t.Fatalf("bad op %d: %+v", i, r)
		}
	}
	// The connection still works after bad operations: a barrier with rank
	// 1 completes.
	p := dial(t, s)
	if r := p.hello(1, 2, "ok-1"); r.Type != MsgWelcome {
		t.Fatalf("rank 1 hello: %+v", r)
	}
	c.send(EncodeOp(&Op{Kind: OpBarrier, ID: 20}))
	p.send(EncodeOp(&Op{Kind: OpBarrier, ID: 1}))
	if r := c.recv(); r.Status != StatusOK || r.ID != 20 {
		t.Fatalf("barrier after bad ops: %+v", r)
	}
	if r := p.recv(); r.Status != StatusOK {
		t.Fatalf("rank 1 barrier: %+v", r)
	}
	c.send(EncodeHello(&Hello{Version: Version, GroupSize: 1, Job: "j", GroupID: "0", Ranks: []int{0}}))
	expectError(c, StatusBadRequest, "second hello")
	for _, cl := range []*client{g, w, op, c, c2, p} {
		cl.close()
	}
	waitIdle(t, s)
}

// A client that dies in the middle of an operation: its operation is
// aborted, its peer's fails (instead of hanging), and the agent releases
// everything of both.
func TestServerClientDiesMidOperation(t *testing.T) {
	s := startServer(t, 2)
	a, b := dial(t, s), dial(t, s)
	if r := a.hello(0, 2, "ok-0"); r.Type != MsgWelcome {
		t.Fatal(r)
	}
	if r := b.hello(1, 2, "ok-1"); r.Type != MsgWelcome {
		t.Fatal(r)
	}
	a.register(1, 1<<20)
	b.register(1, 1<<20)
	// Both ranks wait to receive from each other; rank 0 dies.
	b.send(EncodeOp(&Op{Kind: OpRecv, DType: 1, Peer: 0, ID: 1, A: BufRef{Region: 1, Count: 1 << 18}}))
	a.send(EncodeOp(&Op{Kind: OpRecv, DType: 1, Peer: 1, ID: 1, A: BufRef{Region: 1, Count: 1 << 18}}))
	poll.Until(t, 5*time.Second, func() error {
		if s.Live().Goroutines < 4 {
			return fmt.Errorf("rank 1's operation has not started: %+v", s.Live())
		}
		return nil
	})
	a.close()
	r := b.recvDone()
	if r.Type != MsgDone || r.Status != StatusFailed || r.Message == "" || strings.Contains(r.Message, "timed out") {
		t.Fatalf("rank 1's operation after its peer died: %+v (want a failure at once, not a timeout)", r)
	}
	t.Logf("rank 1 got: %s", r.Message)
	// The group is unusable afterwards: the next operation fails at once.
	b.send(EncodeOp(&Op{Kind: OpBarrier, ID: 2}))
	if r := b.recvDone(); r.Status != StatusFailed {
		t.Fatalf("operation after the failure: %+v", r)
	}
	b.close()
	waitIdle(t, s)
}

// A rank's process dies while its group is idle: the agent tells the other
// rank at once, unasked (FAILED), instead of letting its next operation
// wait for the collective timeout; that operation then fails at once.
func TestServerPeerDiesWhileIdle(t *testing.T) {
	s := startServer(t, 2)
	a, b := dial(t, s), dial(t, s)
	if r := a.hello(0, 2, "ok-0"); r.Type != MsgWelcome {
		t.Fatal(r)
	}
	if r := b.hello(1, 2, "ok-1"); r.Type != MsgWelcome {
		t.Fatal(r)
	}
	a.register(1, 1<<20)
	b.register(1, 1<<20)
	for _, cl := range []*client{a, b} {
		cl.send(EncodeOp(&Op{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 7, A: BufRef{Region: 1, Count: 1 << 18}}))
	}
	for _, cl := range []*client{a, b} {
		if r := cl.recv(); r.Type != MsgDone || r.Status != StatusOK {
			t.Fatalf("all_reduce: %+v", r)
		}
	}
	a.close() // no BYE: the process died
	r := b.recv()
	if r.Type != MsgFailed || r.Status != StatusFailed || !strings.Contains(r.Message, "ended without destroying") {
		t.Fatalf("rank 1 got %+v; want an unasked FAILED saying that rank 0's process ended", r)
	}
	t.Logf("rank 1 was told: %s", r.Message)
	b.send(EncodeOp(&Op{Kind: OpBarrier, ID: 8}))
	if r := b.recv(); r.Type != MsgDone || r.Status != StatusFailed {
		t.Fatalf("operation after the failure: %+v", r)
	}
	b.close()
	waitIdle(t, s)
}

// Ranks of one agent all-reduce every dtype with every op at odd sizes and
// element offsets in their shared memory (the agent reduces every rank's
// mapping in place); every rank's result equals the exact reference.
func TestServerAllReduceEveryOpDTypeOneAgent(t *testing.T) {
	const ranks = 3
	s := startServer(t, ranks)
	counts := []int{1, 7, 5003, 70001}
	const maxBytes = (70001 + 3) * 8
	cls, mems := connectRanks(t, s, ranks, maxBytes)
	// Small integers, multiples of the rank count for the sums, so that
	// every dtype and op (avg included) is exact.
	value := func(op collective.Op, r, i int) float64 {
		if op == collective.OpProd {
			return float64((r+i)%2 + 1)
		}
		return float64(ranks * ((r*7 + i*3) % 5))
	}
	id := uint64(0)
	for _, dt := range collective.AllDTypes {
		for _, op := range collective.AllOps {
			for _, count := range counts {
				es := dt.Size()
				off := 3 * es // not page-aligned
				bufs := make([]*collective.HostBuffer, ranks)
				for r := range bufs {
					b, err := collective.WrapHostBytes(dt, mems[r][off:off+count*es])
					if err != nil {
						t.Fatal(err)
					}
					for i := 0; i < count; i++ {
						b.Set(i, value(op, r, i))
					}
					bufs[r] = b
				}
				id++
				var wg sync.WaitGroup
				for r := range cls {
					wg.Add(1)
					go func() {
						defer wg.Done()
						cls[r].send(EncodeOp(&Op{Kind: OpAllReduce, DType: uint8(dt), Reduce: uint8(op), ID: id, A: BufRef{Region: 1, Offset: uint64(off), Count: uint64(count)}}))
					}()
				}
				wg.Wait()
				for r := range cls {
					if rep := cls[r].recv(); rep.Type != MsgDone || rep.Status != StatusOK || rep.ID != id {
						t.Fatalf("%v %v count %d rank %d: %+v", dt, op, count, r, rep)
					}
				}
				for i := 0; i < count; i++ {
					want := value(op, 0, i)
					for r := 1; r < ranks; r++ {
						v := value(op, r, i)
						switch op {
						case collective.OpSum, collective.OpAvg:
							want += v
						case collective.OpProd:
							want *= v
						case collective.OpMax:
							want = max(want, v)
						case collective.OpMin:
							want = min(want, v)
						}
					}
					if op == collective.OpAvg {
						want /= ranks
					}
					for r, b := range bufs {
						if got := b.At(i); got != want {
							t.Fatalf("%v %v count %d: rank %d element %d = %v, want %v", dt, op, count, r, i, got, want)
						}
					}
				}
			}
		}
	}
	for _, c := range cls {
		c.close()
	}
	waitIdle(t, s)
}
