package collective

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// cpuTime is this process's user+system CPU time.
func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkGRPCAllReduce measures a 2-rank ring all-reduce over the
// loopback data plane at 4 KiB (per-operation costs), 1 and 64 MiB, with
// TCP lanes (tcp), same-host Unix lanes (unix) and with frames on the gRPC
// streams (grpc), named PLANE/SIZE (tcp/4KiB, tcp/64MiB); b.ReportAllocs
// shows what the steady state allocates per operation.
func BenchmarkGRPCAllReduce(b *testing.B) {
	for _, bc := range []struct {
		plane string
		size  int
	}{{DataPlaneTCP, 4 << 10}, {DataPlaneTCP, 1 << 20}, {DataPlaneTCP, 64 << 20}, {"unix", 4 << 10}, {"unix", 1 << 20}, {"unix", 64 << 20}, {DataPlaneGRPC, 1 << 20}, {DataPlaneGRPC, 64 << 20}} {
		size := bc.size
		b.Run(bc.plane+"/"+bytesize.Format(int64(size)), func(b *testing.B) {
			cfg := DefaultConfig()
			gcfg := DefaultNetConfig()
			gcfg.DataPlane = bc.plane
			gcfg.UnixLanes = bc.plane == "unix"
			if bc.plane == "unix" {
				gcfg.DataPlane = DataPlaneTCP
			}
			g, err := NewLoopbackGroup("bench", 1, 2, cfg, gcfg)
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			bufs := benchBufs(2, size)
			run := func() {
				noErrsB(b, RunAll(g.Comms, func(c *Communicator) error {
					return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
				}))
			}
			run()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			c0 := cpuTime()
			for i := 0; i < b.N; i++ {
				run()
			}
			// Both ranks send `size` bytes per operation (n=2).
			cpu := cpuTime() - c0
			b.ReportMetric(cpu.Seconds()/(float64(2*size*b.N)/1e9), "cpu_s/GB")
			b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu_us/op")
			b.ReportMetric(float64(size)/1e9/(b.Elapsed().Seconds()/float64(b.N)), "busbw_GB/s")
		})
	}
}

func noErrsB(b *testing.B, errs []error) {
	b.Helper()
	for r, err := range errs {
		if err != nil {
			b.Fatalf("rank %d: %v", r, err)
		}
	}
}

// BenchmarkLocalAllReduceAllocs shows that the algorithm allocates per
// operation, not per chunk: allocs/op is the same for 64 and 1024 chunks.
func BenchmarkLocalAllReduceAllocs(b *testing.B) {
	for _, size := range []int{4 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("%dMiB-chunks%d", size>>20, size>>20), func(b *testing.B) {
			cfg := DefaultConfig()
			cfg.Channels = 1
			cfg.ChunkBytes = 1 << 20
			_, comms, err := NewLocalGroup("bench", 1, 2, cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer CloseAll(comms)
			bufs := benchBufs(2, size)
			run := func() {
				noErrsB(b, RunAll(comms, func(c *Communicator) error {
					return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
				}))
			}
			run()
			b.SetBytes(int64(size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				run()
			}
		})
	}
}

// BenchmarkSameProcessAllReduce measures an all-reduce among ranks of one
// process as one node's agent runs its ranks' (PyTorch clients') host
// tensors: n ranks on one NetTransport server, float32 sum, 16/64/256 MiB,
// with the same-process path (direct: each rank reduces its block of every
// rank's buffer, SameProcessWorkers goroutines in all) and with the ring
// whose chunks go by reference (ring, NoSameProcess). Named
// ALGO/nRANKS/SIZE; busbw_GB/s is nccl-tests' bus bandwidth (algbw ×
// 2(n-1)/n), cpu_us/op the process's CPU per operation (all ranks).
// GOMAXPROCS (-cpu) bounds the goroutines.
func BenchmarkSameProcessAllReduce(b *testing.B) {
	for _, algo := range []string{"direct", "ring"} {
		for _, n := range []int{2, 4} {
			for _, size := range []int{16 << 20, 64 << 20, 256 << 20} {
				b.Run(fmt.Sprintf("%s/n%d/%s", algo, n, bytesize.Format(int64(size))), func(b *testing.B) {
					cfg := DefaultConfig()
					cfg.NoSameProcess = algo == "ring"
					g, err := NewSharedGroup("bench", 1, n, cfg, DefaultNetConfig())
					if err != nil {
						b.Fatal(err)
					}
					defer g.Close()
					bufs := benchBufs(n, size)
					run := func() {
						noErrsB(b, RunAll(g.Comms, func(c *Communicator) error {
							return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
						}))
					}
					run()
					if got, want := g.Comms[0].LastAllReduceAlgorithm(), map[string]string{"direct": AlgoNameSameProcess, "ring": AlgoNameRing}[algo]; got != want {
						b.Fatalf("ran %q, want %q", got, want)
					}
					b.SetBytes(int64(size))
					b.ResetTimer()
					c0 := cpuTime()
					for i := 0; i < b.N; i++ {
						run()
					}
					cpu := cpuTime() - c0
					per := b.Elapsed().Seconds() / float64(b.N)
					b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu_us/op")
					b.ReportMetric(float64(size)/1e9/per*2*float64(n-1)/float64(n), "busbw_GB/s")
				})
			}
		}
	}
}

// benchBufs returns n float32 host buffers of size bytes filled with real
// values: all-zero pages would stay shared zero pages until written and add
// copy-on-write faults to the first operations.
func benchBufs(n, size int) []*HostBuffer {
	bufs := make([]*HostBuffer, n)
	for r := range bufs {
		bufs[r] = NewHostBuffer(Float32, size/4)
		f := bufs[r].AsFloat32()
		for i := range f {
			f[i] = float32(r + i%7)
		}
	}
	return bufs
}
