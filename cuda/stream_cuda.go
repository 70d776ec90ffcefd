//go:build cuda

package cuda

import (
	"context"
	"fmt"
	"math"
	"sync"
	"time"
	"unsafe"

	"gorgonia.org/cu"
)

func unsafePointer(b []byte) unsafe.Pointer { return unsafe.Pointer(unsafe.SliceData(b)) }

// MappedHost is the device address of pinned host memory from PinnedAlloc
// or a HostPool: with unified addressing (every 64-bit platform CUDA
// supports) such memory is mapped into every device at its host address, so
// kernels may read it directly over the bus (zero copy). b must stay
// allocated while device work uses the address.
func MappedHost(b []byte) DevPtr { return DevPtr(uintptr(unsafePointer(b))) }

// Stream is an ordered queue of device work (copies and kernels) on one
// device. Calls only enqueue; Synchronize or an Event waits for completion.
// A Stream may be used from several goroutines, but work enqueued
// concurrently has no defined order between those goroutines.
type Stream struct {
	dev *Device
	s   cu.Stream

	mu     sync.Mutex
	closed bool
}

// NewStream creates a non-blocking stream (no implicit sync with stream 0).
func (d *Device) NewStream() (*Stream, error) {
	st := &Stream{dev: d}
	err := d.Do(func() error {
		var err error
		st.s, err = cu.MakeStream(cu.NonBlocking)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuStreamCreate: %w", d.props.Ordinal, err)
	}
	return st, nil
}

// Device is the stream's device.
func (s *Stream) Device() *Device { return s.dev }

// Handle is the driver stream, for callers that launch kernels of their own
// (inside Device.Do) on it.
func (s *Stream) Handle() cu.Stream { return s.s }

// Close destroys the stream after its work completes; idempotent.
func (s *Stream) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	return s.dev.Do(func() error {
		if err := s.s.Synchronize(); err != nil {
			return err
		}
		return s.s.Destroy()
	})
}

// Synchronize blocks until all enqueued work is done.
func (s *Stream) Synchronize() error {
	return s.dev.Do(func() error {
		if err := s.s.Synchronize(); err != nil {
			return fmt.Errorf("cuda: device %d: stream synchronize: %w", s.dev.props.Ordinal, err)
		}
		return nil
	})
}

// CopyDtoH enqueues a copy of len(dst) bytes from device memory to host
// memory. dst must be pinned (HostPool or PinnedAlloc) and must stay valid
// until the copy completes.
func (s *Stream) CopyDtoH(dst []byte, src DevPtr) error {
	if len(dst) == 0 {
		return nil
	}
	return s.dev.Do(func() error {
		return wrap(cu.MemcpyDtoHAsync(unsafePointer(dst), cu.DevicePtr(src), int64(len(dst)), s.s), "cuMemcpyDtoHAsync")
	})
}

// CopyHtoD enqueues a copy of len(src) bytes from pinned host memory to the
// device. src must stay valid and unchanged until the copy completes.
func (s *Stream) CopyHtoD(dst DevPtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return s.dev.Do(func() error {
		return wrap(cu.MemcpyHtoDAsync(cu.DevicePtr(dst), unsafePointer(src), int64(len(src)), s.s), "cuMemcpyHtoDAsync")
	})
}

// CopyDtoD enqueues a device-to-device copy within the unified address space
// (also between devices with peer access).
func (s *Stream) CopyDtoD(dst, src DevPtr, bytes int64) error {
	if bytes == 0 {
		return nil
	}
	return s.dev.Do(func() error {
		return wrap(cu.MemcpyAsync(cu.DevicePtr(dst), cu.DevicePtr(src), bytes, s.s), "cuMemcpyAsync")
	})
}

// CopyPeer enqueues a copy from src on srcDev to dst on dstDev
// (cuMemcpyPeerAsync: NVLink or PCIe, staged by the driver if peer access is
// off).
func (s *Stream) CopyPeer(dst DevPtr, dstDev *Device, src DevPtr, srcDev *Device, bytes int64) error {
	if bytes == 0 {
		return nil
	}
	return s.dev.Do(func() error {
		return wrap(cu.MemcpyPeerAsync(cu.DevicePtr(dst), dstDev.ctx, cu.DevicePtr(src), srcDev.ctx, bytes, s.s), "cuMemcpyPeerAsync")
	})
}

// Memset enqueues setting bytes bytes at dst to v.
func (s *Stream) Memset(dst DevPtr, v byte, bytes int64) error {
	return s.dev.Do(func() error {
		return wrap(cu.MemsetD8Async(cu.DevicePtr(dst), v, bytes, s.s), "cuMemsetD8Async")
	})
}

const blockSize = 256

func (s *Stream) launch(name string, n int64, vecElems int64, args ...unsafe.Pointer) error {
	f, err := s.dev.function(name)
	if err != nil {
		return err
	}
	work := (n + vecElems - 1) / vecElems
	grid := (work + blockSize - 1) / blockSize
	if grid > int64(s.dev.maxBlocks) {
		grid = int64(s.dev.maxBlocks)
	}
	if grid < 1 {
		grid = 1
	}
	return s.dev.Do(func() error {
		return wrap(f.Launch(int(grid), 1, 1, blockSize, 1, 1, 0, s.s, args), "cuLaunchKernel "+name)
	})
}

// Reduce enqueues dst[i] = dst[i] op src[i] for i < n elements of dt. For
// Avg it adds (the caller divides once with Div). dst and src may be on
// another device when peer access is enabled.
func (s *Stream) Reduce(op Op, dt DType, dst, src DevPtr, n int64) error {
	if n < 0 {
		return fmt.Errorf("%w: reduce of %d elements", ErrBadArgument, n)
	}
	if n == 0 {
		return nil
	}
	kop, err := op.kernelOp()
	if err != nil {
		return err
	}
	if dt.Size() == 0 {
		return fmt.Errorf("%w: dtype %v", ErrUnsupported, dt)
	}
	un := uint64(n)
	return s.launch("reduce_"+kop+"_"+dt.String(), n, int64(16/dt.Size()),
		unsafe.Pointer(&dst), unsafe.Pointer(&src), unsafe.Pointer(&un))
}

// Div enqueues dst[i] /= divisor for n elements (the end of Avg). Integers
// truncate toward zero.
func (s *Stream) Div(dt DType, dst DevPtr, n int64, divisor float64) error {
	if n <= 0 {
		return nil
	}
	if divisor == 0 || math.IsNaN(divisor) {
		return fmt.Errorf("%w: divide by %v", ErrBadArgument, divisor)
	}
	un := uint64(n)
	return s.launch("div_"+dt.String(), n, 1, unsafe.Pointer(&dst), unsafe.Pointer(&un), unsafe.Pointer(&divisor))
}

// Fill enqueues a deterministic pattern of small integers, a function of
// (seed, index) only: values in [-8, 8), or in {1, 2} when small is set
// (for products). Every value is exact in every dtype (uint8 wraps).
func (s *Stream) Fill(dt DType, dst DevPtr, n int64, seed uint64, small bool) error {
	if n <= 0 {
		return nil
	}
	seed &^= 1 << 63
	if small {
		seed |= 1 << 63
	}
	un := uint64(n)
	return s.launch("fill_"+dt.String(), n, 1, unsafe.Pointer(&dst), unsafe.Pointer(&un), unsafe.Pointer(&seed))
}

// Spin enqueues a kernel that waits d on the device and does nothing else,
// so that the stream's later work starts at least d later (tests: it delays
// one stream against the others as a GPU shared with other processes does).
func (s *Stream) Spin(d time.Duration) error {
	if d <= 0 {
		return nil
	}
	ns := uint64(d.Nanoseconds())
	f, err := s.dev.function("spin_ns")
	if err != nil {
		return err
	}
	return s.dev.Do(func() error {
		return wrap(f.Launch(1, 1, 1, 32, 1, 1, 0, s.s, []unsafe.Pointer{unsafe.Pointer(&ns)}), "cuLaunchKernel spin_ns")
	})
}

// CountMismatch compares n elements of a and b bit for bit (for floats,
// by value) on the device and returns how many differ. It synchronizes the
// stream. scratch must be at least 8 bytes of device memory.
func (s *Stream) CountMismatch(dt DType, a, b DevPtr, n int64, scratch *Mem) (int64, error) {
	if n <= 0 {
		return 0, nil
	}
	if scratch == nil || scratch.Len() < 8 {
		return 0, fmt.Errorf("%w: CountMismatch needs 8 bytes of scratch", ErrBadArgument)
	}
	c := scratch.Ptr()
	if err := s.Memset(c, 0, 8); err != nil {
		return 0, err
	}
	un := uint64(n)
	if err := s.launch("count_mismatch_"+dt.String(), n, 1, unsafe.Pointer(&a), unsafe.Pointer(&b), unsafe.Pointer(&un), unsafe.Pointer(&c)); err != nil {
		return 0, err
	}
	var out [8]byte
	if err := s.Synchronize(); err != nil {
		return 0, err
	}
	if err := s.dev.CopyDtoH(out[:], c); err != nil {
		return 0, err
	}
	return int64(*(*uint64)(unsafe.Pointer(&out[0]))), nil
}

// cu.Event must be exactly one CUevent (a pointer): the IPC calls cast it.
var _ = [1]struct{}{}[unsafe.Sizeof(cu.Event{})-unsafe.Sizeof(uintptr(0))]

// Event marks a point in a stream's work.
type Event struct {
	dev *Device
	e   cu.Event
}

// NewEvent creates an event. Timing is off unless timing is set (cheaper
// waits without it).
func (d *Device) NewEvent(timing bool) (*Event, error) {
	ev := &Event{dev: d}
	flags := cu.DisableTiming
	if timing {
		flags = cu.DefaultEvent
	}
	err := d.Do(func() error {
		var err error
		ev.e, err = cu.MakeEvent(flags)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuEventCreate: %w", d.props.Ordinal, err)
	}
	return ev, nil
}

// NewBlockingEvent creates an event whose Synchronize puts the caller to
// sleep instead of spinning on a CPU core (no timing). Use it where many
// goroutines wait at once.
func (d *Device) NewBlockingEvent() (*Event, error) {
	ev := &Event{dev: d}
	err := d.Do(func() error {
		var err error
		ev.e, err = cu.MakeEvent(cu.BlockingSyncEvent | cu.DisableTiming)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuEventCreate(blocking sync): %w", d.props.Ordinal, err)
	}
	return ev, nil
}

// NewIPCEvent creates an event another process on this host can wait on
// (interprocess, no timing). Export it with IPCHandle.
func (d *Device) NewIPCEvent() (*Event, error) {
	ev := &Event{dev: d}
	err := d.Do(func() error {
		var err error
		ev.e, err = cu.MakeEvent(cu.InterprocessEvent | cu.DisableTiming)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuEventCreate(interprocess): %w", d.props.Ordinal, err)
	}
	return ev, nil
}

// IPCHandle exports an event made by NewIPCEvent.
func (e *Event) IPCHandle() (IPCHandle, error) {
	var h IPCHandle
	err := e.dev.Do(func() error {
		var err error
		h, err = ipcGetEventHandle(unsafe.Pointer(&e.e))
		return err
	})
	return h, err
}

// OpenIPCEvent opens an event of another process (its IPCHandle) for
// Stream.Wait on d. Close it when done.
func (d *Device) OpenIPCEvent(h IPCHandle) (*Event, error) {
	ev := &Event{dev: d}
	err := d.Do(func() error {
		raw, err := ipcOpenEventHandle(h)
		if err != nil {
			return err
		}
		*(*unsafe.Pointer)(unsafe.Pointer(&ev.e)) = raw
		return nil
	})
	if err != nil {
		return nil, err
	}
	return ev, nil
}

// Record marks the current end of s's queue.
func (s *Stream) Record(e *Event) error {
	return s.dev.Do(func() error { return wrap(e.e.Record(s.s), "cuEventRecord") })
}

// Wait makes s's later work wait for e (on the device, the host does not
// block). e may belong to another device.
func (s *Stream) Wait(e *Event) error {
	return s.dev.Do(func() error { return wrap(s.s.Wait(e.e, 0), "cuStreamWaitEvent") })
}

// Synchronize blocks the caller until the event's work is done.
func (e *Event) Synchronize() error {
	return e.dev.Do(func() error { return wrap(e.e.Synchronize(), "cuEventSynchronize") })
}

// Done reports whether the event's work is done, without blocking.
func (e *Event) Done() (bool, error) {
	var done bool
	err := e.dev.Do(func() error {
		err := e.e.Query()
		if err == nil {
			done = true
			return nil
		}
		if err.Error() == cu.NotReady.Error() {
			return nil
		}
		return wrap(err, "cuEventQuery")
	})
	return done, err
}

// Elapsed returns the milliseconds between start and e (both timing events).
func (e *Event) Elapsed(start *Event) (float64, error) {
	var ms float64
	err := e.dev.Do(func() error {
		var err error
		ms, err = start.e.Elapsed(e.e)
		return wrap(err, "cuEventElapsedTime")
	})
	return ms, err
}

// Close destroys the event.
func (e *Event) Close() error {
	return e.dev.Do(func() error { return wrap(cu.DestroyEvent(&e.e), "cuEventDestroy") })
}

func wrap(err error, call string) error {
	if err == nil {
		return nil
	}
	return fmt.Errorf("cuda: %s: %w", call, err)
}

// PinnedBuffer is one slot of page-locked host memory from a HostPool.
type PinnedBuffer struct {
	pool *HostPool
	idx  int
	b    []byte
}

// Index is the slot's position in the pool, 0..Slots()-1 (stable, for
// per-slot side tables such as device scratch or events).
func (b *PinnedBuffer) Index() int { return b.idx }

// Bytes is the whole slot; it stays valid until Put.
func (b *PinnedBuffer) Bytes() []byte { return b.b }

// HostPool is a fixed set of pinned host buffers allocated once (one
// cuMemHostAlloc, portable to every context). Get blocks while all are in
// use. Safe for concurrent use.
type HostPool struct {
	dev       *Device
	base      unsafe.Pointer
	slot      int
	bufs      []*PinnedBuffer
	free      chan *PinnedBuffer
	closeOnce sync.Once
	done      chan struct{}
}

func newHostPool(d *Device, slotBytes, slots int) (*HostPool, error) {
	p := &HostPool{dev: d, slot: slotBytes, free: make(chan *PinnedBuffer, slots), done: make(chan struct{})}
	err := d.Do(func() error {
		var err error
		p.base, err = memHostAlloc(slotBytes * slots)
		return err
	})
	if err != nil {
		return nil, err
	}
	all := unsafe.Slice((*byte)(p.base), slotBytes*slots)
	for i := 0; i < slots; i++ {
		b := &PinnedBuffer{pool: p, idx: i, b: all[i*slotBytes : (i+1)*slotBytes : (i+1)*slotBytes]}
		p.bufs = append(p.bufs, b)
		p.free <- b
	}
	return p, nil
}

// SlotBytes is the size of each buffer.
func (p *HostPool) SlotBytes() int { return p.slot }

// Slots is the number of buffers.
func (p *HostPool) Slots() int { return len(p.bufs) }

// TryGet takes a free buffer if one is free now.
func (p *HostPool) TryGet() (*PinnedBuffer, bool) {
	select {
	case b := <-p.free:
		return b, true
	default:
		return nil, false
	}
}

// Get takes a free buffer, waiting for one until ctx ends.
func (p *HostPool) Get(ctx context.Context) (*PinnedBuffer, error) {
	select {
	case b := <-p.free:
		return b, nil
	default:
	}
	select {
	case b := <-p.free:
		return b, nil
	case <-p.done:
		return nil, ErrClosed
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// Put returns a buffer taken with Get. The caller must not touch it after.
func (p *HostPool) Put(b *PinnedBuffer) {
	if b == nil || b.pool != p {
		return
	}
	p.free <- b
}

// Free returns how many buffers are free now.
func (p *HostPool) Free() int { return len(p.free) }

func (p *HostPool) close() error {
	var err error
	p.closeOnce.Do(func() {
		close(p.done)
		err = p.dev.Do(func() error { return memFreeHost(p.base) })
	})
	return err
}

// PinnedAlloc allocates bytes of portable pinned host memory outside the
// pool (for long-lived staging areas). Free it with PinnedFree.
func (d *Device) PinnedAlloc(bytes int) ([]byte, error) {
	if bytes <= 0 {
		return nil, fmt.Errorf("%w: pinned alloc of %d bytes", ErrBadArgument, bytes)
	}
	var p unsafe.Pointer
	err := d.Do(func() error {
		var err error
		p, err = memHostAlloc(bytes)
		return err
	})
	if err != nil {
		return nil, err
	}
	return unsafe.Slice((*byte)(p), bytes), nil
}

// PinnedFree frees memory from PinnedAlloc.
func (d *Device) PinnedFree(b []byte) error {
	return d.Do(func() error { return memFreeHost(unsafePointer(b)) })
}

// RegisterHost page-locks existing host memory (for example a shared memory
// mapping between processes) so async copies can use it.
func (d *Device) RegisterHost(b []byte) error {
	return d.Do(func() error { return memHostRegister(unsafePointer(b), len(b)) })
}

// UnregisterHost undoes RegisterHost.
func (d *Device) UnregisterHost(b []byte) error {
	return d.Do(func() error { return memHostUnregister(unsafePointer(b)) })
}
