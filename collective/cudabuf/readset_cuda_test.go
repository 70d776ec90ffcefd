//go:build cuda

package cudabuf

import (
	"bytes"
	"testing"

	"github.com/gpumesh/gpumesh/collective"
)

// Two reads of one range outstanding (the same chunk read for two peers):
// releasing the first must not give back the second's staging slot, which
// the next reads would then reuse and overwrite while the second is still
// being sent.
func TestTwoReadsOfOneRangeKeepTheirBytes(t *testing.T) {
	be := openBackend(t)
	const n = 4096 // 16 KiB of float32: one pool slot
	buf, err := be.NewBuffer(0, collective.Float32, 2*n)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	src := collective.NewHostBuffer(collective.Float32, 2*n)
	for i := 0; i < 2*n; i++ {
		src.Set(i, float64(i)) // the two halves differ everywhere
	}
	if err := buf.Upload(src.Bytes()); err != nil {
		t.Fatal(err)
	}
	first, err := buf.ReadChunk(0, n)
	if err != nil {
		t.Fatal(err)
	}
	second, err := buf.ReadChunk(0, n)
	if err != nil {
		t.Fatal(err)
	}
	want := src.Bytes()[:4*n]
	compareBytes(t, collective.Float32, second, want)
	buf.ReleaseChunk(0, n, first)
	// Cycle every free slot through reads of the other half: a slot given
	// back by mistake is among them.
	_, total := be.StagingSlots()
	for i := 0; i <= total; i++ {
		b, err := buf.ReadChunk(n, n)
		if err != nil {
			t.Fatal(err)
		}
		buf.ReleaseChunk(n, n, b)
	}
	if !bytes.Equal(second, want) {
		t.Fatal("the second read's bytes changed after the first read of the range was released: its slot was given back and reused")
	}
	buf.ReleaseChunk(0, n, second)
	if err := buf.Sync(); err != nil {
		t.Fatal(err)
	}
	if free, total := be.StagingSlots(); free != total {
		t.Fatalf("%d of %d staging slots free after every read was released", free, total)
	}
}
