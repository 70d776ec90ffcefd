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
// compares the CPU cost per byte sent in the steady state (the connection
// setup and one round are measured separately and subtracted). "cached"
// reuses one 4 MiB buffer per flow end (what the bench's raw TCP figure
// does); "tensor" streams each rank's 64 MiB from one 64 MiB tensor into
// another (16 MiB per flow end), as a transfer of whole tensors does.
func BenchmarkRawTCP(b *testing.B) {
	const per = 64 << 20
	for _, bc := range []struct {
		name string
		span int64
	}{{"cached", 0}, {"tensor", per / 4}} {
		b.Run(bc.name, func(b *testing.B) {
			b.SetBytes(per)
			c0 := cpuTime()
			if _, err := rawTCP(context.Background(), 2, 4, per, 1, 0, bc.span); err != nil {
				b.Fatal(err)
			}
			c1 := cpuTime()
			med, err := rawTCP(context.Background(), 2, 4, per, b.N+1, 0, bc.span)
			if err != nil {
				b.Fatal(err)
			}
			cpu := (cpuTime() - c1) - (c1 - c0) // b.N rounds, without setup
			b.ReportMetric(cpu.Seconds()/(float64(2*per*b.N)/1e9), "cpu_s/GB")
			b.ReportMetric(float64(per)/1e9/med.Seconds(), "busbw_GB/s")
		})
	}
}
