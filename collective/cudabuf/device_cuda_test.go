//go:build cuda

package cudabuf

import (
	"bytes"
	"testing"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

func TestDeviceRegistersAndAllocatesZeroed(t *testing.T) {
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	d := Register()
	defer d.Close()
	got, err := collective.LookupDevice("cuda")
	if err != nil || got != collective.Device(d) {
		t.Fatalf("LookupDevice(cuda) = %v, %v", got, err)
	}
	if auto, _ := collective.LookupDevice("auto"); auto != collective.Device(d) {
		t.Fatalf("auto picked %v, want cuda", auto)
	}
	be, err := d.Backend()
	if err != nil {
		t.Fatal(err)
	}
	for lr := 0; lr < 3; lr++ {
		b, err := d.Alloc(lr, collective.Float32, 1000)
		if err != nil {
			t.Fatal(err)
		}
		cb := b.(*Buffer)
		if cb.Device() != be.Runtime().Devices()[lr%be.NumDevices()] {
			t.Errorf("local rank %d on device %d", lr, cb.Device().Ordinal())
		}
		out, err := b.ReadChunk(0, 1000)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(out, make([]byte, 4000)) {
			t.Error("Alloc did not zero the buffer")
		}
		b.ReleaseChunk(0, 1000, out)
		if err := cb.Close(); err != nil {
			t.Fatal(err)
		}
	}
}
