package pipeline

import (
	"context"
	"errors"
	"os"
	"testing"
	"time"
)

func TestBenchSmall(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := DefaultBenchConfig()
	cfg.Stages, cfg.MicroBatches, cfg.Steps = 3, 4, 2
	cfg.ForwardTime = time.Millisecond
	cfg.Rows, cfg.Width = 4, 64
	cfg.BandwidthBytes, cfg.MessageBytes = 8<<20, 1<<20
	res, err := Bench(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("%+v", res)
	if res.Bubble <= 0 || res.Bubble >= 1 || res.SamplesPerSec <= 0 || res.StageGBps <= 0 || res.RawTCPGBps <= 0 {
		t.Fatalf("implausible result %+v", res)
	}
	if res.TheoryBubble != 2.0/6 {
		t.Fatalf("theory %v", res.TheoryBubble)
	}
	cfg.Compute = ComputeMLP
	cfg.BandwidthBytes = 0
	if res, err = Bench(ctx, cfg); err != nil || res.SamplesPerSec <= 0 {
		t.Fatalf("mlp compute: %+v, %v", res, err)
	}
	cfg.Device = DeviceCUDA
	if _, err := Bench(ctx, cfg); openBenchDevices == nil && !errors.Is(err, ErrNoDevice) {
		t.Fatalf("cuda in a build without it: err = %v", err)
	}
	cfg.Compute = ComputeSleep
	if _, err := Bench(ctx, cfg); err == nil {
		t.Fatal("cuda with sleep compute accepted")
	}
}

// TestBenchP4M16 is the recorded configuration; it runs only when
// GPUMESH_PIPELINE_BENCH is set since it takes a few seconds and its
// numbers depend on the machine.
func TestBenchP4M16(t *testing.T) {
	if os.Getenv("GPUMESH_PIPELINE_BENCH") == "" {
		t.Skip("set GPUMESH_PIPELINE_BENCH=1 to run the p=4, m=16 benchmark")
	}
	for _, sched := range []string{Schedule1F1B, ScheduleGPipe} {
		cfg := DefaultBenchConfig()
		cfg.Schedule = sched
		res, err := Bench(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%s: bubble %.4f theory %.4f samples/s %.0f stage %.2f GB/s raw %.2f GB/s (%.1f%%) stage bubbles %v",
			sched, res.Bubble, res.TheoryBubble, res.SamplesPerSec, res.StageGBps, res.RawTCPGBps, res.StageToRawPercent, res.StageBubbles)
	}
}
