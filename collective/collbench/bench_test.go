package collbench

import (
	"context"
	"syscall"
	"testing"
	"time"
)

func cpuTime() time.Duration {
	var ru syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// BenchmarkRawTCP is the baseline of BenchmarkGRPCAllReduce in package
// collective: 2 ranks each send 64 MiB to the other over 4 flows; cpu_s/GB
// compares the CPU cost per byte sent.
func BenchmarkRawTCP(b *testing.B) {
	const per = 64 << 20
	b.SetBytes(per)
	c0 := cpuTime()
	for i := 0; i < b.N; i++ {
		if _, err := RawTCP(context.Background(), 2, 4, per, 1, 0); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric((cpuTime()-c0).Seconds()/(float64(2*per*b.N)/1e9), "cpu_s/GB")
}
