//go:build cuda

package cuda

// Device memory of another process opened by IPC handle, checked against
// the allocation the driver reports, and views of a Mem that do not own it.

/*
#cgo LDFLAGS: -lcuda
#include <cuda.h>

static CUresult gm_memGetAddressRange(CUdeviceptr *base, size_t *size, CUdeviceptr p) {
	return cuMemGetAddressRange(base, size, p);
}
*/
import "C"

import "fmt"

// OpenIPCAllocation opens h (another process's cuIpcGetMemHandle of a whole
// allocation) in d's context like OpenIPC, then asks the driver for the
// allocation it maps and returns it whole: its Len is the allocation's size,
// whatever the other process claims. A handle that does not open, or whose
// allocation is smaller than atLeast bytes, is an error (and is closed).
func (d *Device) OpenIPCAllocation(h IPCHandle, atLeast int64) (*Mem, error) {
	var p DevPtr
	var base C.CUdeviceptr
	var size C.size_t
	err := d.Do(func() error {
		var err error
		if p, err = ipcOpenMemHandle(h); err != nil {
			return err
		}
		if err := driverErr(C.gm_memGetAddressRange(&base, &size, C.CUdeviceptr(p)), "cuMemGetAddressRange"); err != nil {
			_ = ipcCloseMemHandle(p)
			return err
		}
		if DevPtr(base) != p || int64(size) < atLeast {
			_ = ipcCloseMemHandle(p)
			return fmt.Errorf("%w: the IPC handle maps an allocation of %d bytes at offset %d, not the %d bytes announced", ErrBadArgument, int64(size), int64(p-DevPtr(base)), atLeast)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return &Mem{dev: d, ptr: p, bytes: int64(size), ipc: true}, nil
}

// View returns bytes of m at off as a Mem that m keeps owning: its Free
// does nothing, and it must not be used after m's Free.
func (m *Mem) View(off, bytes int64) (*Mem, error) {
	if off < 0 || bytes <= 0 || off > m.bytes || bytes > m.bytes-off {
		return nil, fmt.Errorf("%w: view of %d bytes at %d of %d", ErrBadArgument, bytes, off, m.bytes)
	}
	return &Mem{dev: m.dev, ptr: m.ptr.Add(off), bytes: bytes, view: true}, nil
}
