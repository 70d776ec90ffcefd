package pipeline

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"
)

// A buffer whose upload is still running is not handed out again until the
// upload is done; buffers of other sizes or not the pool's are kept apart.
func TestRecvPoolWaitsForUploadBeforeReuse(t *testing.T) {
	made := 0
	p := newRecvPool(func(n int) ([]float32, error) { made++; return make([]float32, n), nil })
	b := p.get(8)
	if !p.owns(b) || p.owns(b[:4]) || p.owns(make([]float32, 8)) {
		t.Fatal("owns: the pool's whole buffer only")
	}
	called, finish := make(chan struct{}), make(chan struct{})
	p.markUploaded(b, func() error { close(called); <-finish; return nil })
	p.put(b)
	p.put(make([]float32, 8)) // not the pool's: dropped
	got := make(chan []float32, 1)
	go func() { got <- p.get(8) }()
	select {
	case <-called:
	case <-time.After(10 * time.Second):
		t.Fatal("get handed the buffer out without waiting for its upload")
	}
	select {
	case <-got:
		t.Fatal("get returned before the upload it waits for was done")
	default:
	}
	close(finish)
	var again []float32
	select {
	case again = <-got:
	case <-time.After(10 * time.Second):
		t.Fatal("get still waits after the upload finished")
	}
	if &again[0] != &b[0] || made != 1 {
		t.Fatalf("get after the upload: reused %v, %d buffers made; want the same buffer, 1 made", &again[0] == &b[0], made)
	}
	// a second get of that size makes a new one; another size too
	if c := p.get(8); &c[0] == &b[0] || made != 2 {
		t.Fatalf("a buffer in use was handed out twice (made %d)", made)
	}
	if c := p.get(4); len(c) != 4 || made != 3 {
		t.Fatalf("get(4) = %d values, %d made", len(c), made)
	}
	if z := p.get(0); len(z) != 0 || made != 3 {
		t.Fatalf("get(0) = %d values, %d made", len(z), made)
	}
	// close runs what is still pending and returns every buffer made
	ran := false
	p.markUploaded(again, func() error { ran = true; return nil })
	bufs, err := p.close()
	if err != nil || len(bufs) != 3 || !ran {
		t.Fatalf("close: %d buffers, err %v, pending upload waited %v; want 3, nil, true", len(bufs), err, ran)
	}
	if p.owns(again) {
		t.Fatal("the pool owns a buffer after close")
	}
}

// Memory the device cannot give (allocation failed, or the device failed
// while the pool waited) is replaced by ordinary memory, which the device
// does not count as its own (its uploads then copy synchronously).
func TestRecvPoolFallsBackToOrdinaryMemory(t *testing.T) {
	fail := true
	p := newRecvPool(func(n int) ([]float32, error) {
		if fail {
			return nil, errors.New("out of pinned memory")
		}
		return make([]float32, n), nil
	})
	if b := p.get(4); len(b) != 4 || p.owns(b) {
		t.Fatalf("after a failed allocation: %d values, owned %v", len(b), p.owns(b))
	}
	fail = false
	b := p.get(4)
	p.markUploaded(b, func() error { return errors.New("device lost") })
	p.put(b)
	if c := p.get(4); len(c) != 4 || &c[0] == &b[0] {
		t.Fatal("a buffer whose upload failed was handed out again")
	}
}

// Over TCP links a stage on a device that lends receive memory receives
// every message into it and uploads from it without waiting (and its
// inputs or targets through it); no buffer is written again before its
// upload is done, and the result is bit for bit that of the pageable path.
func TestPinnedRecvMatchesPageable(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := baseSpec()
	spec.Schedule = Schedule1F1B
	const p = 3
	results := map[bool]string{}
	for _, pinned := range []bool{false, true} {
		pageable := !pinned
		links := tcpPipeline(t, ctx, "pinned", 1, p)
		devs := make([]*asyncCPU, p)
		reps, errs := runStages(ctx, spec, p, func(s int) RunConfig {
			devs[s] = &asyncCPU{}
			return RunConfig{JobID: "pinned", Generation: 1, Stage: s, Stages: p, Links: links[s], Device: devs[s], PinnedRecv: pinned, RecvTimeout: 20 * time.Second}
		})
		if err := errors.Join(errs...); err != nil {
			t.Fatalf("pageable=%v: %v", pageable, err)
		}
		for s, d := range devs {
			d.uploads.Wait()
			if reps[s].PinnedRecv == pageable {
				t.Fatalf("pageable=%v: stage %d reports pinned receives %v", pageable, s, reps[s].PinnedRecv)
			}
			if pageable {
				if d.pinnedUploads != 0 {
					t.Fatalf("stage %d uploaded %d messages from device memory without PinnedRecv", s, d.pinnedUploads)
				}
				continue
			}
			// stage 0 receives gradients and uploads its inputs, stage p-1
			// receives activations and uploads its targets, the others
			// receive both: two uploads from device memory per micro-batch
			want := 2 * spec.Steps * spec.MicroBatches
			if d.pinnedUploads != want {
				t.Errorf("stage %d: %d uploads from receive memory, want %d", s, d.pinnedUploads, want)
			}
			if d.overwritten != 0 {
				t.Errorf("stage %d: %d receive buffers written again before their upload was done", s, d.overwritten)
			}
			if d.recvMade == 0 || d.recvMade > 4*spec.MicroBatches {
				t.Errorf("stage %d: %d receive buffers made", s, d.recvMade)
			}
		}
		results[pageable] = reps[0].ParamHash + reps[1].ParamHash + reps[2].ParamHash + fmt.Sprint(reps[p-1].Losses)
	}
	if results[true] != results[false] {
		t.Fatalf("pinned receives changed the result:\n%s\n%s", results[false], results[true])
	}
}
