//go:build cuda

package cudabuf

import (
	"bytes"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// With an issuing thread, the staging steps of many channels at once (reads,
// prefetches, received chunks reduced or written, divides) are enqueued by
// that thread and give the same bytes as without it.
func TestIssuingThreadCarriesStaging(t *testing.T) {
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	const channels, n = 16, 64 << 10 // 256 KiB of float32 per channel
	r := rand.New(rand.NewPCG(5, 6))
	a := smallInts(r, collective.Float32, channels*n, collective.OpSum)
	b := smallInts(r, collective.Float32, channels*n, collective.OpSum)
	results := map[bool][]byte{}
	for _, issuer := range []bool{false, true} {
		cfg := cuda.DefaultConfig()
		cfg.PinnedSlotBytes, cfg.PinnedSlots = 256<<10, 16
		be, err := Open(cfg, WithIssuingThread(issuer, cuda.DefaultIssuerConfig()))
		if err != nil {
			t.Fatal(err)
		}
		buf, err := be.NewBuffer(0, collective.Float32, channels*n)
		if err != nil {
			t.Fatal(err)
		}
		if err := buf.Upload(a.Bytes()); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		errs := make(chan error, channels)
		for c := 0; c < channels; c++ {
			wg.Add(1)
			go func(off int) {
				defer wg.Done()
				errs <- func() error {
					// a prefetched read, a received chunk reduced in, a read of
					// the result, a received chunk written over it, a divide
					if err := buf.PrefetchChunk(off, n); err != nil {
						return err
					}
					pre, err := buf.ReadChunk(off, n)
					if err != nil {
						return err
					}
					buf.ReleaseChunk(off, n, pre)
					dst, tok, err := buf.BeginRecv(off, n)
					if err != nil {
						return err
					}
					copy(dst, b.Bytes()[off*4:(off+n)*4])
					if err := buf.CommitRecv(off, n, tok, true, collective.OpSum); err != nil {
						return err
					}
					sum, err := buf.ReadChunk(off, n)
					if err != nil {
						return err
					}
					if err := buf.WriteChunk(off, collective.Segments{sum}); err != nil {
						return err
					}
					buf.ReleaseChunk(off, n, sum)
					return buf.DivChunk(off, n, 2)
				}()
			}(c * n)
		}
		wg.Wait()
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatalf("issuer %v: %v", issuer, err)
			}
		}
		got := make([]byte, channels*n*4)
		if err := buf.Download(got); err != nil {
			t.Fatal(err)
		}
		results[issuer] = got
		var issued int64
		if iss := be.devs[0].iss; iss != nil {
			issued = iss.Stats().Issued
		}
		// per channel at least: prefetch, commit, read, write, divide
		if issuer && issued < 5*channels || !issuer && issued != 0 {
			t.Fatalf("issuer %v: %d enqueues went through the issuing thread", issuer, issued)
		}
		buf.Free()
		if err := be.Close(); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(results[false], results[true]) {
		t.Fatal("the issuing thread changed the result")
	}
	// and both are (a+b)/2 element by element
	want := collective.NewHostBuffer(collective.Float32, channels*n)
	for i := 0; i < channels*n; i++ {
		want.Set(i, (a.At(i)+b.At(i))/2)
	}
	compareBytes(t, collective.Float32, results[true], want.Bytes())
}
