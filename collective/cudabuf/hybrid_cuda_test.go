//go:build cuda

package cudabuf

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// runProcs starts procs copies of this test binary running test (each sees
// env GPUMESH_PROC=index and GPUMESH_PROCS=procs). Each child prints one
// "ADDR ..." line first; every child then reads all children's ADDR lines
// (in order, joined by ";") on stdin. Lines a child prints with prefix are
// echoed. It fails the test when a child fails.
func runProcs(t *testing.T, test string, procs int, prefix string, timeout time.Duration) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	type child struct {
		cmd   *exec.Cmd
		stdin io.WriteCloser
		out   *bufio.Reader
		log   strings.Builder
		done  chan struct{}
	}
	var kids []*child
	defer func() {
		for _, k := range kids {
			k.stdin.Close()
		}
	}()
	var addrs []string
	for p := 0; p < procs; p++ {
		k := &child{done: make(chan struct{})}
		k.cmd = exec.CommandContext(ctx, os.Args[0], "-test.run=^"+test+"$", "-test.v")
		k.cmd.Env = append(os.Environ(), "GPUMESH_PROC="+strconv.Itoa(p), "GPUMESH_PROCS="+strconv.Itoa(procs))
		k.cmd.Stderr = os.Stderr
		var err error
		if k.stdin, err = k.cmd.StdinPipe(); err != nil {
			t.Fatal(err)
		}
		pipe, err := k.cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		k.out = bufio.NewReader(pipe)
		if err := k.cmd.Start(); err != nil {
			t.Fatal(err)
		}
		kids = append(kids, k)
		for {
			line, err := k.out.ReadString('\n')
			if err != nil {
				t.Fatalf("process %d exited before listening: %v", p, err)
			}
			if a, ok := strings.CutPrefix(strings.TrimSpace(line), "ADDR "); ok {
				addrs = append(addrs, a)
				break
			}
		}
	}
	for _, k := range kids {
		fmt.Fprintln(k.stdin, strings.Join(addrs, ";"))
		go func(k *child) {
			defer close(k.done)
			for {
				line, err := k.out.ReadString('\n')
				if strings.HasPrefix(line, prefix) {
					fmt.Print(line)
				}
				k.log.WriteString(line)
				if err != nil {
					return
				}
			}
		}(k)
	}
	for p, k := range kids {
		<-k.done
		if err := k.cmd.Wait(); err != nil {
			t.Errorf("process %d: %v\n%s", p, err, k.log.String())
		}
	}
}

// TestHybridRingSeparateProcesses: 2 processes x 2 ranks, ranks 0,1 in
// process A (GPU 0, GPU 1), ranks 2,3 in process B (GPU 0, GPU 1), one ring
// over the collective's NetTransport. The hops 0->1 and 2->3 must move
// device to device (by reference, peer kernels and copies), 1->2 and 3->0
// over loopback TCP. Every op and dtype, checked exactly against the host
// reference; the buffers' counters prove which path each hop took. With
// GPUMESH_CUDA_BENCH=1 it also measures busbw against the same ring with
// every hop over TCP (the in-memory shortcut off).
func TestHybridRingSeparateProcesses(t *testing.T) {
	if os.Getenv("GPUMESH_PROC") != "" {
		hybridChild(t)
		return
	}
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	runProcs(t, "TestHybridRingSeparateProcesses", 2, "hybrid ", time.Duration(envInt("GPUMESH_HYBRID_TIMEOUT_S", 200))*time.Second)
}

func hybridChild(t *testing.T) {
	proc, _ := strconv.Atoi(os.Getenv("GPUMESH_PROC"))
	procs, _ := strconv.Atoi(os.Getenv("GPUMESH_PROCS"))
	const per = 2 // ranks per process
	// Two servers: the normal one (ranks of this process talk in memory)
	// and one with the in-memory shortcut off (every hop over TCP), for the
	// comparison.
	srv, err := collective.Listen("127.0.0.1:0", collective.DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	gcfg := collective.DefaultNetConfig()
	gcfg.NoLocalShortcut = true
	srvTCP, err := collective.Listen("127.0.0.1:0", gcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer srvTCP.Close()
	fmt.Printf("ADDR %s,%s\n", srv.Addr(), srvTCP.Addr())
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	var addrs, addrsTCP []string
	for _, pa := range strings.Split(strings.TrimSpace(line), ";") {
		a, b, _ := strings.Cut(pa, ",")
		for i := 0; i < per; i++ {
			addrs, addrsTCP = append(addrs, a), append(addrsTCP, b)
		}
	}
	n := per * procs
	be := openBackendCfg(t, 4<<20, 64)
	cfg := collective.DefaultConfig()
	cfg.Channels = envInt("GPUMESH_HYBRID_CHANNELS", cfg.Channels)
	cfg.Timeout = 30 * time.Second
	gen := uint64(0)
	open := func(tr collective.Transport, addrs []string) []*collective.Communicator {
		gen++
		comms := make([]*collective.Communicator, per)
		for i := range comms {
			c, err := collective.New(tr, collective.Group{Job: "cuda-hybrid", Generation: gen, Rank: proc*per + i, Addrs: addrs}, cfg)
			if err != nil {
				t.Fatal(err)
			}
			comms[i] = c
		}
		return comms
	}
	ctx := context.Background()
	run := func(comms []*collective.Communicator, f func(i int, c *collective.Communicator) error) {
		var wg sync.WaitGroup
		errs := make([]error, len(comms))
		for i, c := range comms {
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[i] = f(i, c)
			}()
		}
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("rank %d: %v", proc*per+i, err)
			}
		}
	}
	comms := open(srv.Transport(), addrs)
	const count = 300007 // a ring for every dtype
	for _, dt := range collective.AllDTypes {
		bufs := make([]*Buffer, per)
		for i := range bufs {
			if bufs[i], err = be.NewBuffer(i%be.NumDevices(), dt, count); err != nil {
				t.Fatal(err)
			}
		}
		for _, op := range collective.AllOps {
			ins := make([]*collective.HostBuffer, n)
			for r := range ins {
				ins[r] = smallInts(rand.New(rand.NewPCG(uint64(r), uint64(op)*16+uint64(dt))), dt, count, op)
			}
			ref, mine := hostRef(op, ins), ins[proc*per:(proc+1)*per]
			for i, b := range bufs {
				if err := b.Upload(mine[i].Bytes()); err != nil {
					t.Fatal(err)
				}
			}
			run(comms, func(i int, c *collective.Communicator) error { return c.AllReduce(ctx, bufs[i], op) })
			for i, b := range bufs {
				got := make([]byte, count*dt.Size())
				if err := b.Download(got); err != nil {
					t.Fatal(err)
				}
				t.Logf("rank %d %v %v", proc*per+i, dt, op)
				compareBytes(t, dt, got, ref.Bytes())
			}
		}
		for i, b := range bufs {
			// rank 2p sends to 2p+1 in memory and receives from the
			// other process; rank 2p+1 receives in memory and sends to
			// the other process.
			st, r := b.Stats(), proc*per+i
			if i == 0 && (st.StagedReads != 0 || st.PeerChunks != 0 || st.DirectRecvs == 0 || st.StagedWrites != 0 || st.HostCopies != 0) {
				t.Errorf("rank %d %v: %+v: want no reads (in-memory sends) and only direct receives into pinned slots (TCP lanes)", r, dt, st)
			}
			if i == 1 && (st.StagedReads == 0 || st.PeerChunks == 0 || st.StagedWrites != 0 || st.DirectRecvs != 0) {
				t.Errorf("rank %d %v: %+v: want peer chunks (in-memory receives) and staged reads (TCP sends)", r, dt, st)
			}
			if proc == 0 {
				fmt.Printf("hybrid rank %d %v stats %+v\n", r, dt, st)
			}
			b.Free()
		}
	}
	collective.CloseAll(comms)
	if t.Failed() {
		return
	}
	if proc == 0 {
		fmt.Printf("hybrid n=%d procs=%d correctness ok (every dtype x sum avg max min prod; hops in a process device to device)\n", n, procs)
	}
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		return
	}
	iters := envInt("GPUMESH_TCP_ITERS", 10)
	warm := envInt("GPUMESH_WARMUP", 4)
	for _, mode := range []string{"peer", "alltcp"} {
		tr, as := srv.Transport(), addrs
		if mode == "alltcp" {
			tr, as = srvTCP.Transport(), addrsTCP
		}
		for _, conf := range strings.Split(envOr("GPUMESH_HYBRID_CONFIGS", "4x1024,16x1024"), ",") {
			var ch, kib int
			if _, err := fmt.Sscanf(conf, "%dx%d", &ch, &kib); err != nil {
				t.Fatalf("bad GPUMESH_HYBRID_CONFIGS entry %q (want CHANNELSxCHUNK_KIB)", conf)
			}
			cfg.Channels, cfg.ChunkBytes = ch, kib<<10
			comms := open(tr, as)
			for _, mib := range []int{64, 256} {
				count := mib << 20 / 4
				bufs := make([]*Buffer, per)
				for i := range bufs {
					if bufs[i], err = be.NewBuffer(i%be.NumDevices(), collective.Float32, count); err != nil {
						t.Fatal(err)
					}
					bufs[i].wr.Fill(cuda.Float32, bufs[i].mem.Ptr(), int64(count), uint64(proc*per+i), false)
				}
				var ts []time.Duration
				for it := 0; it < iters+warm; it++ {
					var t0 time.Time
					run(comms, func(i int, c *collective.Communicator) error {
						if err := c.Barrier(ctx); err != nil {
							return err
						}
						if i == 0 {
							t0 = time.Now()
						}
						return c.AllReduce(ctx, bufs[i], collective.OpSum)
					})
					if it >= warm {
						ts = append(ts, time.Since(t0))
					}
				}
				for _, b := range bufs {
					b.Free()
				}
				med := median(ts)
				alg := float64(mib<<20) / med.Seconds() / 1e9
				if proc == 0 {
					_, slots := be.StagingSlots()
					fmt.Printf("hybrid n=%d procs=%d hops=%s %s channels=%d chunk=%dKiB size=%dMiB time=%.1fus algbw=%.2fGB/s busbw=%.2fGB/s slots=%d\n",
						n, procs, mode, variant(), ch, kib, mib, float64(med.Microseconds()), alg, alg*2*float64(n-1)/float64(n), slots)
				}
			}
			collective.CloseAll(comms)
		}
	}
}

// TestCommunicatorPeerBandwidth measures the collective's own ring with
// every rank in this process (two GPUs, or four ranks on two GPUs): over the
// LocalTransport and over one data-plane server (its in-memory shortcut),
// both by reference, device to device. Only with GPUMESH_CUDA_BENCH=1.
func TestCommunicatorPeerBandwidth(t *testing.T) {
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		t.Skip("set GPUMESH_CUDA_BENCH=1 to measure")
	}
	be := openBackend(t)
	if be.NumDevices() < 2 {
		t.Skip("needs two GPUs")
	}
	srv, err := collective.Listen("127.0.0.1:0", collective.DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	ctx := context.Background()
	iters := envInt("GPUMESH_CUDA_BENCH_ITERS", 20)
	gen := uint64(0)
	for _, nr := range []int{2, 4} {
		for _, tname := range []string{"local", "grpc-shortcut"} {
			for _, conf := range strings.Split(envOr("GPUMESH_PEER_CONFIGS", "4x1024,4x8192,2x65536"), ",") {
				var ch, kib int
				if _, err := fmt.Sscanf(conf, "%dx%d", &ch, &kib); err != nil {
					t.Fatalf("bad GPUMESH_PEER_CONFIGS entry %q", conf)
				}
				cfg := collective.DefaultConfig()
				cfg.Channels, cfg.ChunkBytes = ch, kib<<10
				var tr collective.Transport = collective.NewLocalTransport()
				if tname != "local" {
					tr = srv.Transport()
				}
				gen++
				addrs := make([]string, nr)
				for i := range addrs {
					addrs[i] = srv.Addr()
				}
				comms := make([]*collective.Communicator, nr)
				for r := range comms {
					if comms[r], err = collective.New(tr, collective.Group{Job: "peer-bench", Generation: gen, Rank: r, Addrs: addrs}, cfg); err != nil {
						t.Fatal(err)
					}
				}
				for _, mib := range []int{64, 256} {
					count := mib << 20 / 4
					bufs := make([]*Buffer, nr)
					for r := range bufs {
						if bufs[r], err = be.NewBuffer(r%2, collective.Float32, count); err != nil {
							t.Fatal(err)
						}
						bufs[r].wr.Fill(cuda.Float32, bufs[r].mem.Ptr(), int64(count), uint64(r), false)
					}
					var ts []time.Duration
					for it := 0; it < iters+2; it++ {
						var t0 time.Time
						errs := collective.RunAll(comms, func(c *collective.Communicator) error {
							if err := c.Barrier(ctx); err != nil {
								return err
							}
							if c.Rank() == 0 {
								t0 = time.Now()
							}
							return c.AllReduce(ctx, bufs[c.Rank()], collective.OpSum)
						})
						for _, err := range errs {
							if err != nil {
								t.Fatal(err)
							}
						}
						if it >= 2 {
							ts = append(ts, time.Since(t0))
						}
					}
					st := bufs[0].Stats()
					for _, b := range bufs {
						b.Free()
					}
					med := median(ts)
					alg := float64(mib<<20) / med.Seconds() / 1e9
					fmt.Printf("peer n=%d transport=%s %s channels=%d chunk=%dKiB size=%dMiB time=%.1fus algbw=%.2fGB/s busbw=%.2fGB/s (rank 0: %d peer chunks, %d staged reads)\n",
						nr, tname, variant(), ch, kib, mib, float64(med.Microseconds()), alg, alg*2*float64(nr-1)/float64(nr), st.PeerChunks, st.StagedReads)
				}
				collective.CloseAll(comms)
			}
		}
	}
}
