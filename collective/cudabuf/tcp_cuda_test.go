//go:build cuda

package cudabuf

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"runtime/pprof"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// TestTCPSeparateProcesses runs ranks as separate processes (this test
// binary again, one GPU each, round robin) connected by the collective's
// NetTransport over loopback TCP (lanes), with device buffers: correctness for
// every op on a few dtypes; with GPUMESH_CUDA_BENCH=1 also busbw.
func TestTCPSeparateProcesses(t *testing.T) {
	if os.Getenv("GPUMESH_PROC") != "" {
		tcpChild(t)
		return
	}
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	runProcs(t, "TestTCPSeparateProcesses", envInt("GPUMESH_TCP_RANKS", 2), "tcp ", time.Duration(envInt("GPUMESH_TCP_TIMEOUT_S", 120))*time.Second)
}

// TestSameHostSeparateProcesses is TestTCPSeparateProcesses with the
// Communicator's same-host ring on (CUDA IPC between the processes, agreed
// over the lanes): every all-reduce must take it (Stats.SameHostOps) and
// give the same results; with 2 and 3 processes (left and right neighbours
// differ), each as the backend runs it where the processes share a GPU (in
// rank 0's context) and as a ring of IPC hops. GPUMESH_SAME_HOST_PROCS
// ("2,3" by default) chooses the process counts.
func TestSameHostSeparateProcesses(t *testing.T) {
	if os.Getenv("GPUMESH_PROC") != "" {
		tcpChild(t)
		return
	}
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	t.Setenv("GPUMESH_SAME_HOST", "1")
	for _, ns := range strings.Split(envOr("GPUMESH_SAME_HOST_PROCS", "2,3"), ",") {
		n, err := strconv.Atoi(ns)
		if err != nil {
			t.Fatalf("bad GPUMESH_SAME_HOST_PROCS entry %q", ns)
		}
		for _, ring := range []string{"0", "1"} {
			t.Run(fmt.Sprintf("procs=%d/ring=%s", n, ring), func(t *testing.T) {
				t.Setenv("GPUMESH_SAME_HOST_RING", ring)
				runProcs(t, "TestSameHostSeparateProcesses", n, "tcp ", 120*time.Second)
			})
		}
		// the last rank cannot take part (as in a container without the
		// host's IPC): every rank must stay on the lanes, with the same results
		t.Run(fmt.Sprintf("procs=%d/refused", n), func(t *testing.T) {
			t.Setenv("GPUMESH_SAME_HOST_REFUSE", strconv.Itoa(n-1))
			runProcs(t, "TestSameHostSeparateProcesses", n, "tcp ", 120*time.Second)
		})
	}
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil {
		return v
	}
	return def
}

func tcpChild(t *testing.T) {
	rank, _ := strconv.Atoi(os.Getenv("GPUMESH_PROC"))
	n, _ := strconv.Atoi(os.Getenv("GPUMESH_PROCS"))
	srv, err := collective.Listen("127.0.0.1:0", collective.DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()
	fmt.Printf("ADDR %s\n", srv.Addr())
	line, err := bufio.NewReader(os.Stdin).ReadString('\n')
	if err != nil {
		t.Fatal(err)
	}
	addrs := strings.Split(strings.TrimSpace(line), ";")
	be := openBackendCfg(t, envInt("GPUMESH_SLOT_KIB", 4096)<<10, envInt("GPUMESH_SLOTS", 64))
	dev := rank % be.NumDevices()
	ctx := context.Background()
	cfg := collective.DefaultConfig()
	cfg.Channels = envInt("GPUMESH_TCP_CHANNELS", cfg.Channels)
	cfg.ChunkBytes = envInt("GPUMESH_TCP_CHUNK_KIB", cfg.ChunkBytes>>10) << 10
	cfg.Timeout = 20 * time.Second
	// the lanes unless GPUMESH_SAME_HOST=1 (TestSameHostSeparateProcesses)
	sameHost := os.Getenv("GPUMESH_SAME_HOST") == "1"
	cfg.NoSameHost = !sameHost
	if r, err := strconv.Atoi(os.Getenv("GPUMESH_SAME_HOST_REFUSE")); err == nil {
		if r == rank {
			be.opts.noSameHost = true // this rank's buffers refuse
		}
		sameHost = false // so every rank must end on the lanes
	}
	gen := uint64(1)
	newComm := func() *collective.Communicator {
		c, err := collective.New(srv.Transport(), collective.Group{Job: "cuda-tcp", Generation: gen, Rank: rank, Addrs: addrs}, cfg)
		if err != nil {
			t.Fatal(err)
		}
		gen++
		return c
	}
	comm := newComm()
	defer func() { comm.Close() }()
	// correctness
	const count = 300007
	for _, dt := range []collective.DType{collective.Float32, collective.BFloat16, collective.Int32} {
		buf, err := be.NewBuffer(dev, dt, count)
		if err != nil {
			t.Fatal(err)
		}
		for _, op := range collective.AllOps {
			ins := make([]*collective.HostBuffer, n)
			for k := range ins {
				ins[k] = smallInts(rand.New(rand.NewPCG(uint64(k), uint64(op))), dt, count, op)
			}
			ref, mine := hostRef(op, ins), ins[rank]
			if err := buf.Upload(mine.Bytes()); err != nil {
				t.Fatal(err)
			}
			before := buf.Stats().SameHostOps
			if err := comm.AllReduce(ctx, buf, op); err != nil {
				t.Fatalf("%v %v: %v", dt, op, err)
			}
			if ipc := buf.Stats().SameHostOps - before; (ipc == 1) != sameHost {
				t.Fatalf("%v %v: %d all-reduces on the same-host ring, same-host on: %v (algorithm %s)", dt, op, ipc, sameHost, comm.LastAllReduceAlgorithm())
			}
			got := make([]byte, count*dt.Size())
			if err := buf.Download(got); err != nil {
				t.Fatal(err)
			}
			if string(got) != string(ref.Bytes()) {
				t.Errorf("rank %d %v %v (algorithm %s): result differs from the host reference", rank, dt, op, comm.LastAllReduceAlgorithm())
			}
			compareBytes(t, dt, got, ref.Bytes())
		}
		if err := comm.ForgetBuffer(buf); err != nil {
			t.Fatal(err)
		}
		buf.Free()
	}
	if rank == 0 {
		fmt.Printf("tcp n=%d correctness ok (float32, bfloat16, int32 x sum avg max min prod), path %s\n", n, comm.LastAllReduceAlgorithm())
	}
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		return
	}
	iters := envInt("GPUMESH_TCP_ITERS", 10)
	sizes := []int{64, 256}
	if v := os.Getenv("GPUMESH_TCP_SIZES"); v != "" {
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			mib, err := strconv.Atoi(f)
			if err != nil {
				t.Fatalf("bad GPUMESH_TCP_SIZES entry %q (want MiB)", f)
			}
			sizes = append(sizes, mib)
		}
	}
	// GPUMESH_TRACE=DIR: the staging steps of each size's last operation
	// (rank files); GPUMESH_CPUPROFILE=DIR: a CPU profile of the bench.
	traceDir := os.Getenv("GPUMESH_TRACE")
	if dir := os.Getenv("GPUMESH_CPUPROFILE"); dir != "" {
		f, err := os.Create(fmt.Sprintf("%s/cpu.%d.prof", dir, rank))
		if err != nil {
			t.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			t.Fatal(err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	for ci, conf := range strings.Split(envOr("GPUMESH_TCP_CONFIGS", "4x1024,8x1024,8x4096,16x1024,16x4096"), ",") {
		var ch, kib int
		if _, err := fmt.Sscanf(conf, "%dx%d", &ch, &kib); err != nil {
			t.Fatalf("bad GPUMESH_TCP_CONFIGS entry %q (want CHANNELSxCHUNK_KIB)", conf)
		}
		cfg.Channels, cfg.ChunkBytes = ch, kib<<10
		comm.Close()
		comm = newComm()
		szs := sizes
		if ci == 0 && os.Getenv("GPUMESH_TCP_SIZES") == "" {
			szs = []int{1, 16, 64, 256}
		}
		for _, device := range strings.Split(envOr("GPUMESH_TCP_DEVICES", "cuda,cpu"), ",") {
			for _, mib := range szs {
				count := mib << 20 / 4
				var buf collective.Buffer
				var free func()
				if device == "cuda" {
					b, err := be.NewBuffer(dev, collective.Float32, count)
					if err != nil {
						t.Fatal(err)
					}
					b.wr.Fill(cuda.Float32, b.mem.Ptr(), int64(count), uint64(rank), false)
					buf, free = b, func() { b.Free() }
				} else {
					buf, free = collective.NewHostBuffer(collective.Float32, count), func() {}
				}
				for i := 0; i < envInt("GPUMESH_WARMUP", 4); i++ {
					if err := comm.AllReduce(ctx, buf, collective.OpSum); err != nil {
						t.Fatal(err)
					}
				}
				var st0 Stats
				if b, ok := buf.(*Buffer); ok {
					st0 = b.Stats()
				}
				var ts []time.Duration
				for i := 0; i < iters; i++ {
					if err := comm.Barrier(ctx); err != nil {
						t.Fatal(err)
					}
					var tr *traceOp
					if traceDir != "" && device == "cuda" && i == iters-1 {
						tr = startTrace()
					}
					t0 := time.Now()
					if err := comm.AllReduce(ctx, buf, collective.OpSum); err != nil {
						t.Fatal(err)
					}
					ts = append(ts, time.Since(t0))
					if tr != nil {
						name := fmt.Sprintf("%s/trace.%dx%d.%dMiB.rank%d", traceDir, cfg.Channels, cfg.ChunkBytes>>10, mib, rank)
						if err := tr.stop(name, fmt.Sprintf("rank %d %dx%dKiB %dMiB op=%s", rank, cfg.Channels, cfg.ChunkBytes>>10, mib, ts[len(ts)-1])); err != nil {
							t.Fatal(err)
						}
					}
				}
				var prof string
				if b, ok := buf.(*Buffer); ok {
					st := b.Stats()
					per := func(d, d0 time.Duration) float64 { return float64((d-d0)/time.Duration(iters)) / 1e3 }
					prof = fmt.Sprintf(" per-op(us, summed over channels): read=%.0f readwait=%.0f stage=%.0f slotwait=%.0f prefetched=%d/%d direct=%d hostcopies=%d",
						per(st.ReadTime, st0.ReadTime), per(st.ReadWait, st0.ReadWait), per(st.StageTime, st0.StageTime), per(st.SlotWait, st0.SlotWait), st.Prefetched-st0.Prefetched, st.StagedReads-st0.StagedReads,
						st.DirectRecvs-st0.DirectRecvs, st.HostCopies-st0.HostCopies)
				}
				free()
				med := median(ts)
				alg := float64(mib<<20) / med.Seconds() / 1e9
				if rank == 0 {
					wait := "spin"
					if os.Getenv("GPUMESH_SPIN") == "0" {
						wait = "sleep"
					}
					if os.Getenv("GPUMESH_RANGE_DEPS") == "1" {
						wait += ",rangedeps"
					}
					if os.Getenv("GPUMESH_PREFETCH") == "0" {
						wait += ",noprefetch"
					}
					if os.Getenv("GPUMESH_LOCKED") == "1" {
						wait += ",locked"
					}
					wait += issuerLabel()
					if k := envInt("GPUMESH_ZEROCOPY_KIB", DefaultZeroCopyBytes>>10); k > 0 {
						wait += fmt.Sprintf(",zerocopy<=%dKiB", k)
					}
					switch os.Getenv("GPUMESH_POLL") {
					case "1":
						wait = "poll" + strings.TrimPrefix(wait, "spin")
					case "shared":
						wait = "poller" + strings.TrimPrefix(wait, "spin")
					}
					if device == "cpu" {
						wait = "-"
					}
					if sameHost && device == "cuda" {
						wait = "same-host:" + comm.LastAllReduceAlgorithm()
						if os.Getenv("GPUMESH_SAME_HOST_RING") == "1" {
							wait += ",ring-on-one-device"
						}
					}
					_, slots := be.StagingSlots()
					fmt.Printf("tcp n=%d device=%s channels=%d chunk=%dKiB wait=%s size=%dMiB time=%.1fus algbw=%.2fGB/s busbw=%.2fGB/s slots=%d%s\n",
						n, device, cfg.Channels, cfg.ChunkBytes>>10, wait, mib, float64(med.Microseconds()), alg, alg*2*float64(n-1)/float64(n), slots, prof)
				}
			}
		}
	}
}

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}
