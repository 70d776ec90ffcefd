package collective

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/bytesize"
	"golang.org/x/sys/unix"
)

// BenchmarkSameProcessClientPattern separates what may make a PyTorch
// client's all-reduce through its agent slower than the built-in job's
// with the same ranks, though both run the same-process reduction: the
// memory (the ranks' memfd pages mapped into the agent, mem=memfd, against
// Go heap, mem=heap), the pause between operations while the ranks run
// their Python (gap: the agent's threads go idle, and the next
// operation's goroutines wake them), and how many goroutines reduce
// (workers: SameProcessWorkers, 0 = GOMAXPROCS). 2 ranks, float32 sum.
// Reports op_us, the median of the operations' own times (the pauses are
// not timed), and busbw_GB/s from it.
func BenchmarkSameProcessClientPattern(b *testing.B) {
	for _, size := range []int{16 << 20, 64 << 20} {
		for _, mem := range []string{"heap", "memfd"} {
			for _, gap := range []time.Duration{0, 200 * time.Microsecond} {
				for _, workers := range []int{0, 8, 4, 2} {
					name := fmt.Sprintf("%s/mem=%s/gap=%s/workers=%d", bytesize.Format(int64(size)), mem, gap, workers)
					b.Run(name, func(b *testing.B) {
						benchClientPattern(b, size, mem, gap, workers)
					})
				}
			}
		}
	}
}

func benchClientPattern(b *testing.B, size int, mem string, gap time.Duration, workers int) {
	const n = 2
	cfg := DefaultConfig()
	cfg.SameProcessWorkers = workers
	g, err := NewSharedGroup("bench", 1, n, cfg, DefaultNetConfig())
	if err != nil {
		b.Fatal(err)
	}
	defer g.Close()
	bufs := benchBufs(n, size)
	if mem == "memfd" {
		for r := range bufs {
			m := memfdMapping(b, size)
			copy(m, bufs[r].Bytes())
			hb, err := WrapHostBytes(Float32, m)
			if err != nil {
				b.Fatal(err)
			}
			bufs[r] = hb
		}
	}
	run := func() {
		noErrsB(b, RunAll(g.Comms, func(c *Communicator) error {
			return c.AllReduce(context.Background(), bufs[c.Rank()], OpSum)
		}))
	}
	run()
	if got := g.Comms[0].LastAllReduceAlgorithm(); got != AlgoNameSameProcess {
		b.Fatalf("ran %q, want %q", got, AlgoNameSameProcess)
	}
	ops := make([]time.Duration, 0, b.N)
	b.SetBytes(int64(size))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if gap > 0 {
			b.StopTimer()
			time.Sleep(gap)
			b.StartTimer()
		}
		t0 := time.Now()
		run()
		ops = append(ops, time.Since(t0))
	}
	b.StopTimer()
	slices.Sort(ops)
	med := ops[len(ops)/2]
	b.ReportMetric(float64(med.Nanoseconds())/1e3, "op_us")
	b.ReportMetric(float64(size)/1e9/med.Seconds()*2*float64(n-1)/float64(n), "busbw_GB/s")
}

// memfdMapping maps a memfd of size bytes shared, as the agent maps a
// rank's tensor memory (node/localapi); unmapped when the benchmark ends.
func memfdMapping(b *testing.B, size int) []byte {
	fd, err := unix.MemfdCreate("bench", unix.MFD_CLOEXEC)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Ftruncate(fd, int64(size)); err != nil {
		b.Fatal(err)
	}
	m, err := unix.Mmap(fd, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = unix.Munmap(m) })
	return m
}
