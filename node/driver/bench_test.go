//go:build linux

package driver

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

func benchDriver(b *testing.B) *Driver {
	d, err := New(Config{DataDir: b.TempDir(), PollInterval: 20 * time.Millisecond, Logger: hclog.NewNullLogger()})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = d.Shutdown() })
	return d
}

// BenchmarkStart measures Start: spec written, supervisor started, task
// started and recorded, handle returned; "fsync-all" also fsyncs the spec,
// state and log settings files (what the driver chose not to do).
func BenchmarkStart(b *testing.B) {
	b.Run("default", benchStart)
	b.Run("fsync-all", func(b *testing.B) {
		syncAll = true
		defer func() { syncAll = false }()
		benchStart(b)
	})
}

func benchStart(b *testing.B) {
	d := benchDriver(b)
	ctx := context.Background()
	var hs []*Handle
	var lat []time.Duration
	for i := 0; b.Loop(); i++ {
		t0 := time.Now()
		h, err := d.Start(ctx, TaskSpec{ID: TaskID{JobID: "bench", Generation: 1, Rank: i}, Command: []string{"sleep", "600"}, Env: []string{"PATH=/usr/bin:/bin"}})
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		lat = append(lat, time.Since(t0))
		hs = append(hs, h)
		if len(hs) == 16 {
			stopAll(b, hs)
			hs = hs[:0]
		}
		b.StartTimer()
	}
	b.StopTimer()
	stopAll(b, hs)
	reportPercentiles(b, lat)
}

// reportPercentiles adds p50 and p99 latencies (ms) to the benchmark line.
func reportPercentiles(b *testing.B, lat []time.Duration) {
	if len(lat) == 0 {
		return
	}
	slices.Sort(lat)
	pct := func(p float64) float64 {
		return float64(lat[min(len(lat)-1, int(p*float64(len(lat))))].Microseconds()) / 1000
	}
	b.ReportMetric(pct(0.50), "p50-ms")
	b.ReportMetric(pct(0.99), "p99-ms")
}

func stopAll(b *testing.B, hs []*Handle) {
	for _, h := range hs {
		if _, err := h.Stop(context.Background(), StopOptions{Force: true}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStop measures a graceful stop of a task that exits on SIGTERM:
// request written, supervisor signalled, group signalled, exit recorded and
// seen by the driver.
func BenchmarkStop(b *testing.B) {
	d := benchDriver(b)
	ctx := context.Background()
	var lat []time.Duration
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		h, err := d.Start(ctx, TaskSpec{ID: TaskID{JobID: "bench", Generation: 1, Rank: i}, Command: []string{"sleep", "600"}, Env: []string{"PATH=/usr/bin:/bin"}})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		t0 := time.Now()
		res, err := h.Stop(ctx, StopOptions{Timeout: time.Minute})
		if err != nil || res.Killed {
			b.Fatalf("%+v %v", res, err)
		}
		lat = append(lat, time.Since(t0))
	}
	reportPercentiles(b, lat)
}

// BenchmarkLogThroughput pushes output through the supervisor into rotated
// files (64 MiB files, 4 kept): start to exit recorded.
func BenchmarkLogThroughput(b *testing.B) {
	const size = 512 << 20
	d := benchDriver(b)
	ctx := context.Background()
	b.SetBytes(size)
	for i := 0; b.Loop(); i++ {
		h, err := d.Start(ctx, TaskSpec{
			ID:      TaskID{JobID: "bench", Generation: 1, Rank: i},
			Command: []string{"head", "-c", strconv.Itoa(size), "/dev/zero"},
			Env:     []string{"PATH=/usr/bin:/bin"},
			Logs:    LogConfig{MaxFileBytes: 64 << 20, MaxFiles: 4},
		})
		if err != nil {
			b.Fatal(err)
		}
		if res, err := h.Wait(ctx); err != nil || !res.Success() {
			b.Fatalf("%+v %v", res, err)
		}
		b.StopTimer()
		_ = d.Remove(h.ID())
		b.StartTimer()
	}
}
