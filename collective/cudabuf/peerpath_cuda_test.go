//go:build cuda

package cudabuf

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// PrefetchChunk: a later ReadChunk of the range returns the prefetched copy
// (counted), a write issued in between wins over the prefetch, Sync drops
// unread prefetches and gives their slots back.
func TestPrefetchChunk(t *testing.T) {
	be := openBackend(t)
	const n = 50000 // float32: 200 000 bytes, within one 256 KiB slot
	r := rand.New(rand.NewPCG(3, 4))
	buf, err := be.NewBuffer(0, collective.Float32, n)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	a := randomHost(r, collective.Float32, n)
	b := randomHost(r, collective.Float32, n)
	if err := buf.Upload(a.Bytes()); err != nil {
		t.Fatal(err)
	}
	freeBefore, _ := be.StagingSlots()

	// prefetch, then read: the prefetched copy, equal to the buffer
	if err := buf.PrefetchChunk(100, 2000); err != nil {
		t.Fatal(err)
	}
	got, err := buf.ReadChunk(100, 2000)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, a.Bytes()[400:400+8000]) {
		t.Fatal("prefetched read differs from the buffer")
	}
	buf.ReleaseChunk(100, 2000, got)
	if st := buf.Stats(); st.Prefetched != 1 || st.StagedReads != 1 {
		t.Fatalf("stats %+v: want 1 prefetched of 1 read", st)
	}

	// prefetch, overlapping write, read: the write wins
	if err := buf.PrefetchChunk(0, 1000); err != nil {
		t.Fatal(err)
	}
	if err := buf.WriteChunk(500, split3(b.Bytes()[2000:2000+4000])); err != nil {
		t.Fatal(err)
	}
	got, err = buf.ReadChunk(0, 1000)
	if err != nil {
		t.Fatal(err)
	}
	want := append(append([]byte(nil), a.Bytes()[:2000]...), b.Bytes()[2000:4000]...)
	if !bytes.Equal(got, want) {
		t.Fatal("a read after prefetch and an overlapping write does not see the write")
	}
	buf.ReleaseChunk(0, 1000, got)
	if st := buf.Stats(); st.Prefetched != 1 {
		t.Fatalf("stats %+v: the dropped prefetch must not serve the read", st)
	}

	// prefetch, reduce into the range (a kernel), read: sees the reduce
	if err := buf.PrefetchChunk(2000, 500); err != nil {
		t.Fatal(err)
	}
	if err := buf.ReduceChunk(2000, collective.Segments{b.Bytes()[8000:10000]}, collective.OpMax); err != nil {
		t.Fatal(err)
	}
	got, err = buf.ReadChunk(2000, 500)
	if err != nil {
		t.Fatal(err)
	}
	ref := collective.NewHostBuffer(collective.Float32, 500)
	copy(ref.Bytes(), a.Bytes()[8000:10000])
	ref.ReduceChunk(0, collective.Segments{b.Bytes()[8000:10000]}, collective.OpMax)
	if !bytes.Equal(got, ref.Bytes()) {
		t.Fatal("a read after prefetch and an overlapping reduce does not see the reduce")
	}
	buf.ReleaseChunk(2000, 500, got)

	// unread prefetches: Sync gives the slots back
	for i := 0; i < 3; i++ {
		if err := buf.PrefetchChunk(10000+i*1000, 1000); err != nil {
			t.Fatal(err)
		}
	}
	if err := buf.Sync(); err != nil {
		t.Fatal(err)
	}
	if free, _ := be.StagingSlots(); free < freeBefore {
		t.Fatalf("%d free staging slots after Sync, %d before the prefetches", free, freeBefore)
	}
	// a whole-buffer prefetch and read
	if err := buf.PrefetchChunk(0, n); err != nil {
		t.Fatal(err)
	}
	if got, err = buf.ReadChunk(0, n); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got[12000:], a.Bytes()[12000:]) {
		t.Fatal("a whole-buffer read differs")
	}
	buf.ReleaseChunk(0, n, got)
}

// The shared poller: many goroutines read chunks (each waits for its copy
// through the poller) and get the right bytes; Close stops the poller.
func TestSharedPollerWaits(t *testing.T) {
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	cfg := cuda.DefaultConfig()
	cfg.PinnedSlotBytes, cfg.PinnedSlots = 256<<10, 16
	be, err := Open(cfg, WithSharedPoller(true))
	if err != nil {
		t.Fatal(err)
	}
	const n, parts = 1 << 20, 16
	h := randomHost(rand.New(rand.NewPCG(5, 6)), collective.Float32, n)
	buf, err := be.NewBuffer(0, collective.Float32, n)
	if err != nil {
		t.Fatal(err)
	}
	if err := buf.Upload(h.Bytes()); err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	errs := make(chan error, parts)
	for p := 0; p < parts; p++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			off, l := collective.Part(n, parts, p)
			for it := 0; it < 20; it++ {
				for k := 0; k < l; k += 16 << 10 {
					c := min(16<<10, l-k)
					got, err := buf.ReadChunk(off+k, c)
					if err != nil {
						errs <- err
						return
					}
					if !bytes.Equal(got, h.Bytes()[(off+k)*4:(off+k+c)*4]) {
						errs <- fmt.Errorf("part %d: chunk at %d differs", p, off+k)
					}
					buf.ReleaseChunk(off+k, c, got)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := buf.Free(); err != nil {
		t.Fatal(err)
	}
	if err := be.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-be.poller.done:
	default:
		t.Fatal("the poller goroutine is still running after Close")
	}
}
