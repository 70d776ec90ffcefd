package collective

import (
	"context"
	"fmt"
	"testing"
)

// BenchmarkGRPCAllReduce measures a 2-rank ring all-reduce over loopback
// gRPC; b.ReportAllocs shows what the steady state allocates per operation.
func BenchmarkGRPCAllReduce(b *testing.B) {
	for _, size := range []int{1 << 20, 64 << 20} {
		b.Run(fmt.Sprintf("%dMiB", size>>20), func(b *testing.B) {
			cfg := DefaultConfig()
			g, err := NewLoopbackGroup("bench", 1, 2, cfg, DefaultGRPCConfig())
			if err != nil {
				b.Fatal(err)
			}
			defer g.Close()
			bufs := []*HostBuffer{NewHostBuffer(Float32, size/4), NewHostBuffer(Float32, size/4)}
			run := func() {
				noErrsB(b, RunAll(g.Comms, func(c *Communicator) error {
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
