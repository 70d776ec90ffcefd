//go:build cuda

package localapi

import (
	"fmt"
	"sync"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/collective/cudabuf"
	"github.com/gpumesh/gpumesh/cuda"
)

func init() { newCUDAOpener = openCUDA }

// maxCachedBuffers bounds the device buffers kept per region (DDP uses a
// few per bucket allocation); an operation beyond it gets a buffer of its
// own, freed when it ends.
const maxCachedBuffers = 32

// cudaIPC opens ranks' allocations in the agent's contexts (the CUDA
// backend of the "cuda" collective device, shared with built-in jobs).
type cudaIPC struct {
	be *cudabuf.Backend

	mu   sync.Mutex
	open map[ipcKey]*openAlloc // every opened allocation, shared by the connections
}

// ipcKey names an allocation: a context may open a handle once (two
// process groups of one rank register the same allocation twice).
type ipcKey struct {
	dev    int
	handle cuda.IPCHandle
}

type openAlloc struct {
	mem  *cuda.Mem
	refs int
}

func openCUDA() (cudaOpener, error) {
	if !cudabuf.Available() {
		return nil, fmt.Errorf("%w (no CUDA device is visible to the agent)", ErrNoCUDA)
	}
	d, err := collective.LookupDevice("cuda")
	if err != nil {
		d = cudabuf.Register()
	}
	cd, ok := d.(*cudabuf.Device)
	if !ok {
		return nil, fmt.Errorf("%w (the registered cuda device is a %T)", ErrNoCUDA, d)
	}
	be, err := cd.Backend()
	if err != nil {
		return nil, fmt.Errorf("%w: %v", ErrNoCUDA, err)
	}
	return &cudaIPC{be: be, open: map[ipcKey]*openAlloc{}}, nil
}

func (c *cudaIPC) device(u [16]byte) (int, error) {
	i := c.be.DeviceIndex(FormatGPUUUID(u))
	if i < 0 {
		return 0, fmt.Errorf("%w (the rank's GPU %s is not one of the agent's)", ErrNoCUDA, FormatGPUUUID(u))
	}
	return i, nil
}

// OpenMemory implements cudaOpener.
func (c *cudaIPC) OpenMemory(r *RegisterCUDA) (deviceMem, error) {
	i, err := c.device(r.Device)
	if err != nil {
		return nil, err
	}
	if r.Size > 1<<62 {
		return nil, fmt.Errorf("%w: size %d", ErrBadRegion, r.Size)
	}
	k := ipcKey{dev: i, handle: cuda.IPCHandle(r.Handle)}
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.open[k]
	if a == nil {
		mem, err := c.be.Device(i).OpenIPCAllocation(k.handle, int64(r.Size))
		if err != nil {
			return nil, fmt.Errorf("%w: the CUDA IPC handle does not open as an allocation of %d bytes on %s: %v", ErrBadRegion, r.Size, FormatGPUUUID(r.Device), err)
		}
		a = &openAlloc{mem: mem}
		c.open[k] = a
	} else if uint64(a.mem.Len()) < r.Size {
		return nil, fmt.Errorf("%w: the CUDA IPC handle maps an allocation of %d bytes, not the %d bytes announced", ErrBadRegion, a.mem.Len(), r.Size)
	}
	a.refs++
	return &ipcMem{be: c.be, dev: i, uuid: r.Device, mem: a.mem, size: r.Size, bufs: map[bufKey]*cudabuf.Buffer{},
		close: func() error { return c.release(k) }}, nil
}

// release drops a registration of an allocation; the last closes it.
func (c *cudaIPC) release(k ipcKey) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.open[k]
	if a == nil {
		return nil
	}
	if a.refs--; a.refs > 0 {
		return nil
	}
	delete(c.open, k)
	return a.mem.Free()
}

// OpenEvent implements cudaOpener.
func (c *cudaIPC) OpenEvent(r *RegisterCUDA) (deviceEvent, error) {
	i, err := c.device(r.Device)
	if err != nil {
		return nil, err
	}
	ev, err := c.be.Device(i).OpenIPCEvent(cuda.IPCHandle(r.Handle))
	if err != nil {
		return nil, fmt.Errorf("%w: the CUDA IPC event handle does not open on %s: %v", ErrBadRegion, FormatGPUUUID(r.Device), err)
	}
	return ipcEvent{ev}, nil
}

// ipcEvent is a rank's event opened in the agent's context.
type ipcEvent struct{ *cuda.Event }

// Wait implements deviceEvent.
func (e ipcEvent) Wait() error { return e.Synchronize() }

type bufKey struct {
	off, count uint64
	dt         collective.DType
}

// ipcMem is one opened allocation and the device buffers made over it.
type ipcMem struct {
	be   *cudabuf.Backend
	dev  int
	uuid [16]byte
	mem  *cuda.Mem
	size uint64
	// close releases the allocation (shared with other registrations).
	close func() error

	mu   sync.Mutex
	bufs map[bufKey]*cudabuf.Buffer // freed by Close: no operation uses the region then
}

func (m *ipcMem) Size() uint64     { return m.size }
func (m *ipcMem) Device() [16]byte { return m.uuid }

// Buffer implements deviceMem: one buffer per (offset, count, dtype) is
// kept, so that a bucket reduced again reuses its streams and the
// communicator's per-buffer state.
func (m *ipcMem) Buffer(off, count uint64, dt collective.DType) (collective.Buffer, func(), error) {
	k := bufKey{off, count, dt}
	m.mu.Lock()
	defer m.mu.Unlock()
	if b := m.bufs[k]; b != nil {
		return b, func() {}, nil
	}
	if count == 0 {
		// Nothing to touch: a host buffer of no elements.
		return collective.NewHostBuffer(dt, 0), func() {}, nil
	}
	buf, err := m.be.WrapMem(m.dev, dt, m.mem, int64(off), int(count))
	if err != nil {
		return nil, nil, err
	}
	if len(m.bufs) >= maxCachedBuffers {
		return buf, func() { _ = buf.Free() }, nil
	}
	m.bufs[k] = buf
	return buf, func() {}, nil
}

// Close implements deviceMem.
func (m *ipcMem) Close() error {
	m.mu.Lock()
	bufs := m.bufs
	m.bufs = nil
	m.mu.Unlock()
	var first error
	for _, b := range bufs {
		if err := b.Free(); err != nil && first == nil {
			first = err
		}
	}
	if err := m.close(); err != nil && first == nil {
		first = err
	}
	return first
}
