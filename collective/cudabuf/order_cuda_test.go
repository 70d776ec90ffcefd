//go:build cuda

package cudabuf

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// Ordering of the staging steps against each other and against uploads,
// made visible in one process: copy engines kept busy by another stream,
// and the buffers' own streams delayed step by step (setStepDelay), as a
// GPU time-sliced with other processes runs queued work late.

// busyCopies keeps the copy engines of device dev busy (64 MiB each way on
// a stream of its own, again and again) until the returned stop is called.
func busyCopies(t *testing.T, be *Backend, dev int) (stop func()) {
	t.Helper()
	d := be.Device(dev)
	const bytes = 64 << 20
	host, err := d.PinnedAlloc(bytes)
	if err != nil {
		t.Fatal(err)
	}
	mem, err := d.Alloc(bytes)
	if err != nil {
		d.PinnedFree(host)
		t.Fatal(err)
	}
	s, err := d.NewStream()
	if err != nil {
		mem.Free()
		d.PinnedFree(host)
		t.Fatal(err)
	}
	quit, done := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-quit:
				return
			default:
			}
			if s.CopyHtoD(mem.Ptr(), host) != nil || s.CopyDtoH(host, mem.Ptr()) != nil || s.Synchronize() != nil {
				return
			}
		}
	}()
	return func() {
		close(quit)
		<-done
		s.Close()
		mem.Free()
		d.PinnedFree(host)
	}
}

// A read right after Upload sees the uploaded bytes, also while other
// copies keep the copy engines busy: Upload's copy runs on the legacy
// default stream, which the buffer's non-blocking streams do not wait for,
// so Upload must return only once the copy landed (before the fix a rank
// of the tests sent its buffer's previous contents, the last operation's
// result, whenever the GPU was shared).
func TestUploadThenReadWhileCopiesBusy(t *testing.T) {
	be := openBackend(t)
	stop := busyCopies(t, be, 0)
	defer stop()
	const n = 1 << 20
	buf, err := be.NewBuffer(0, collective.Int32, n)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	src := collective.NewHostBuffer(collective.Int32, n)
	for round := 0; round < 30; round++ {
		for i := 0; i < n; i++ {
			src.Set(i, float64(round*7+i%5))
		}
		if err := buf.Upload(src.Bytes()); err != nil {
			t.Fatal(err)
		}
		for _, r := range [][2]int{{n - 4096, 4096}, {0, 3}, {n / 2, 1000}} {
			got, err := buf.ReadChunk(r[0], r[1])
			if err != nil {
				t.Fatal(err)
			}
			want := src.Bytes()[4*r[0] : 4*(r[0]+r[1])]
			if string(got) != string(want) {
				buf.ReleaseChunk(r[0], r[1], got)
				t.Fatalf("round %d: read of [%d,+%d) after Upload differs from the upload", round, r[0], r[1])
			}
			buf.ReleaseChunk(r[0], r[1], got)
		}
	}
}

// All-reduces with every staging step's device work delayed (up to 150 µs,
// unevenly, see delayStream) and the copy engines busy: two ranks over TCP
// lanes (receives straight into pinned slots, zero-copy reduces, prefetched
// reads) and two ranks of one process through the peer path and the staged
// host path; results equal to the host reference.
func TestAllReduceUnderStreamDelays(t *testing.T) {
	be := openBackendCfg(t, 64<<10, 8)
	setStepDelay(t, 100*time.Microsecond)
	stop := busyCopies(t, be, 0)
	defer stop()
	ndev := be.NumDevices()
	ctx := context.Background()
	cfg := collective.DefaultConfig()
	cfg.Channels, cfg.ChunkBytes, cfg.Timeout = 4, 16<<10, 60*time.Second
	g, err := collective.NewLoopbackGroup("delays", 1, 2, cfg, collective.DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, dt := range []collective.DType{collective.Float32, collective.Uint8} {
		for _, count := range []int{3, 4099, 100003} {
			bufs := make([]*Buffer, 2)
			for r := range bufs {
				if bufs[r], err = be.NewBuffer(r%ndev, dt, count); err != nil {
					t.Fatal(err)
				}
				defer bufs[r].Free()
			}
			for _, op := range collective.AllOps {
				name := fmt.Sprintf("lanes %v %v n=%d", dt, op, count)
				ref := uploadSmallInts(t, bufs, dt, count, op)
				allReduceGroup(t, ctx, name, g.Comms, bufs, op)
				for r, b := range bufs {
					checkDownload(t, name, r, b, ref)
				}
			}
		}
	}
	lcfg := collective.DefaultConfig()
	lcfg.Channels, lcfg.ChunkBytes = 2, 64<<10
	r := rand.New(rand.NewPCG(11, 12))
	for _, peer := range []bool{true, false} {
		for _, count := range []int{1000, 200003} {
			for _, op := range collective.AllOps {
				t.Run(fmt.Sprintf("local/peer=%v/n=%d/%v", peer, count, op), func(t *testing.T) {
					allReduceOnce(t, be, r, lcfg, []int{0, 1 % ndev}, peer, count, collective.Float32, op)
				})
			}
		}
	}
}
