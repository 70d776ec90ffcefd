//go:build cuda

package cudabuf

import (
	"fmt"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// WrapMem returns a Buffer over n elements of dt at byte offset off of mem,
// device memory on the backend's device index dev that the caller owns (for
// example another process's allocation opened with OpenIPCAllocation): the
// buffer's Free releases its streams and events, not the memory, and the
// memory must outlive the buffer.
func (b *Backend) WrapMem(dev int, dt collective.DType, mem *cuda.Mem, off int64, n int) (*Buffer, error) {
	if dev < 0 || dev >= len(b.devs) {
		return nil, fmt.Errorf("%w: device index %d, %d device(s) open", collective.ErrBadArgument, dev, len(b.devs))
	}
	ds := b.devs[dev]
	if mem.Device() != ds.dev {
		return nil, fmt.Errorf("%w: memory of device %d wrapped for device %d", collective.ErrBadArgument, mem.Device().Ordinal(), ds.dev.Ordinal())
	}
	cdt, err := DType(dt)
	if err != nil {
		return nil, err
	}
	bytes := int64(n) * int64(dt.Size())
	if n <= 0 {
		return nil, fmt.Errorf("%w: %d elements", collective.ErrBadArgument, n)
	}
	view, err := mem.View(off, bytes)
	if err != nil {
		return nil, err
	}
	return b.newBuffer(ds, dt, cdt, n, view)
}

// DeviceIndex returns the index (for NewBuffer, WrapMem) of the device whose
// UUID is uuid ("GPU-..."), or -1.
func (b *Backend) DeviceIndex(uuid string) int {
	for i, ds := range b.devs {
		if ds.dev.Properties().UUID == uuid {
			return i
		}
	}
	return -1
}

// Device returns the device of index i (see DeviceIndex).
func (b *Backend) Device(i int) *cuda.Device { return b.devs[i].dev }
