package pipeline

import (
	"context"
	"errors"
	"net"
	"runtime"
	"sync"
	"testing"
	"time"
)

// tcpPipeline connects p stages over loopback TCP.
func tcpPipeline(t *testing.T, ctx context.Context, job string, gen uint64, p int) []StageLinks {
	t.Helper()
	return tcpPipelineRing(t, ctx, job, gen, p, false)
}

func tcpPipelineRing(t *testing.T, ctx context.Context, job string, gen uint64, p int, ring bool) []StageLinks {
	t.Helper()
	lns := make([]net.Listener, p)
	addrs := make([]string, p)
	for s := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		lns[s], addrs[s] = ln, ln.Addr().String()
	}
	links := make([]StageLinks, p)
	errs := make([]error, p)
	var wg sync.WaitGroup
	for s := 0; s < p; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			links[s], errs[s] = ConnectTCP(ctx, TCPConfig{JobID: job, Generation: gen, Stage: s, Stages: p, Addrs: addrs, Listener: lns[s], ConnectTimeout: 10 * time.Second, Ring: ring})
		}(s)
	}
	wg.Wait()
	for s, err := range errs {
		if err != nil {
			t.Fatalf("stage %d: %v", s, err)
		}
	}
	return links
}

func TestTCPPipelineMatchesSingleProcess(t *testing.T) {
	base := runtime.NumGoroutine()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := baseSpec()
	ref, err := RunReference(spec, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, sched := range []string{ScheduleGPipe, Schedule1F1B} {
		s := spec
		s.Schedule = sched
		reps, errs := runPipeline(t, ctx, s, tcpPipeline(t, ctx, "job-1", 3, 4), nil)
		for i, err := range errs {
			if err != nil {
				t.Fatalf("%s stage %d: %v", sched, i, err)
			}
		}
		for i, l := range reps[3].Losses {
			if !relClose(l, ref.Losses[i], 1e-5) {
				t.Fatalf("%s: step %d loss %v, single process %v", sched, i, l, ref.Losses[i])
			}
		}
		if reps[0].BytesSent == 0 || reps[3].BytesReceived == 0 {
			t.Fatalf("%s: no bytes counted: %+v", sched, reps[0].StageStats)
		}
	}
	waitGoroutines(t, base)
}

func TestTCPHandshakeRefusesStaleGeneration(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	addrs := []string{"127.0.0.1:1", ln.Addr().String()}
	done := make(chan error, 1)
	go func() {
		l, err := ConnectTCP(ctx, TCPConfig{JobID: "j", Generation: 5, Stage: 1, Stages: 2, Addrs: addrs, Listener: ln, ConnectTimeout: 10 * time.Second})
		if err == nil {
			l.Close()
		}
		done <- err
	}()
	// A dialer of generation 4 is refused with a clear reason...
	_, err = ConnectTCP(ctx, TCPConfig{JobID: "j", Generation: 4, Stage: 0, Stages: 2, Addrs: addrs, ConnectTimeout: 10 * time.Second})
	if !errors.Is(err, ErrProtocol) {
		t.Fatalf("stale dialer: err = %v, want ErrProtocol", err)
	}
	t.Log(err)
	// ...and so is another job; the right one still gets in.
	if _, err := ConnectTCP(ctx, TCPConfig{JobID: "other", Generation: 5, Stage: 0, Stages: 2, Addrs: addrs}); !errors.Is(err, ErrProtocol) {
		t.Fatalf("foreign dialer: err = %v, want ErrProtocol", err)
	}
	l, err := ConnectTCP(ctx, TCPConfig{JobID: "j", Generation: 5, Stage: 0, Stages: 2, Addrs: addrs})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if err := <-done; err != nil {
		t.Fatalf("acceptor: %v", err)
	}
}

func TestTCPPeerDeathFailsStages(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links := tcpPipeline(t, ctx, "job-1", 3, 3)
	spec := baseSpec()
	spec.Steps = 1 << 20
	// Stage 2 "dies": its connection is closed as soon as the others run.
	runUntilLinkDies(t, ctx, spec, links, 2, func() { links[2].Prev.Close() })
}

func TestConnectTCPTimesOut(t *testing.T) {
	ctx := context.Background()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nobody listens there
	start := time.Now()
	_, err = ConnectTCP(ctx, TCPConfig{JobID: "j", Stage: 0, Stages: 2, Addrs: []string{"127.0.0.1:1", addr}, ConnectTimeout: 200 * time.Millisecond})
	if err == nil || !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want a deadline error", err)
	}
	if time.Since(start) > 10*time.Second {
		t.Fatal("connect did not stop at its timeout")
	}
	if _, err := ConnectTCP(ctx, TCPConfig{JobID: "j", Stage: 0, Stages: 2, Addrs: []string{"x"}}); !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("bad config err = %v", err)
	}
}

func TestInterleavedOverTCPAndGRPC(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	layers := []int{6, 8, 7, 9, 6, 8, 5, 7, 4}
	spec := JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: 6, Steps: 3, Seed: 8, LearningRate: 0.1, Schedule: ScheduleInterleaved, Chunks: 2}
	ref, err := RunReference(JobSpec{Layers: layers, MicroBatchSize: 2, MicroBatches: 6, Steps: 3, Seed: 8, LearningRate: 0.1}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, kind := range []string{"tcp", "grpc"} {
		var links []StageLinks
		if kind == "tcp" {
			links = tcpPipelineRing(t, ctx, "job-1", 3, 3, true)
		} else {
			links = grpcPipeline(t, "job-1", 3, 3, CollectiveConfig{Channels: 2, ChunkBytes: 4096, Ring: true})
		}
		if links[0].Ring == nil || links[2].Ring == nil || links[1].Ring != nil {
			t.Fatalf("%s: ring links on the wrong stages", kind)
		}
		reps, errs := runPipeline(t, ctx, spec, links, nil)
		for s, err := range errs {
			if err != nil {
				t.Fatalf("%s: stage %d: %v", kind, s, err)
			}
		}
		for i, l := range reps[2].Losses {
			if !relClose(l, ref.Losses[i], 1e-5) {
				t.Fatalf("%s: step %d loss %v, single process %v", kind, i, l, ref.Losses[i])
			}
		}
	}
}
