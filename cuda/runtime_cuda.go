//go:build cuda

package cuda

import (
	"errors"
	"fmt"
	"runtime"
	"sync"

	"gorgonia.org/cu"

	// CUDA_DEVICE_ORDER=PCI_BUS_ID before cu's init initialises the driver.
	_ "github.com/gpumesh/gpumesh/internal/cudaorder"
)

// Built reports whether this binary has the CUDA data path (the "cuda" tag).
const Built = true

// Available reports whether the driver lists at least one device.
func Available() bool {
	n, err := cu.NumDevices()
	return err == nil && n > 0
}

// Runtime owns the opened devices and the pinned host pool.
type Runtime struct {
	cfg  Config
	devs []*Device
	pool *HostPool

	mu     sync.Mutex
	closed bool
}

// Open retains the primary context of each configured device, loads the
// kernels into it (JIT from PTX) and allocates the pinned host pool once.
func Open(cfg Config) (*Runtime, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n, err := cu.NumDevices()
	if err != nil {
		return nil, fmt.Errorf("cuda: cuDeviceGetCount: %w", err)
	}
	if n == 0 {
		return nil, ErrNoDevice
	}
	ords := cfg.Devices
	if len(ords) == 0 {
		for i := 0; i < n; i++ {
			ords = append(ords, i)
		}
	}
	r := &Runtime{cfg: cfg}
	for _, o := range ords {
		if o >= n {
			r.Close()
			return nil, fmt.Errorf("%w: ordinal %d, the driver lists %d device(s)", ErrNoDevice, o, n)
		}
		d, err := openDevice(o)
		if err != nil {
			r.Close()
			return nil, err
		}
		r.devs = append(r.devs, d)
	}
	pool, err := newHostPool(r.devs[0], cfg.PinnedSlotBytes, cfg.PinnedSlots)
	if err != nil {
		r.Close()
		return nil, err
	}
	r.pool = pool
	return r, nil
}

// Devices returns the opened devices in the order of the config.
func (r *Runtime) Devices() []*Device { return r.devs }

// Pool returns the pinned host buffer pool shared by all devices.
func (r *Runtime) Pool() *HostPool { return r.pool }

// Close frees the pool, unloads the kernels and releases the contexts. It is
// idempotent. Buffers, streams and events must be closed first.
func (r *Runtime) Close() error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return nil
	}
	r.closed = true
	var errs []error
	if r.pool != nil {
		errs = append(errs, r.pool.close())
	}
	for _, d := range r.devs {
		errs = append(errs, d.close())
	}
	return errors.Join(errs...)
}

// Device is one GPU with its retained primary context and loaded kernels.
type Device struct {
	props Properties
	dev   cu.Device
	ctx   cu.CUContext
	mod   cu.Module
	fns   map[string]cu.Function
	// maxBlocks caps a launch's grid (a few waves of the multiprocessors).
	maxBlocks int
}

func openDevice(ordinal int) (*Device, error) {
	dev, err := cu.GetDevice(ordinal)
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuDeviceGet: %w", ordinal, err)
	}
	d := &Device{dev: dev, fns: map[string]cu.Function{}}
	d.props.Ordinal = ordinal
	if d.props.Name, err = dev.Name(); err != nil {
		return nil, fmt.Errorf("cuda: device %d: name: %w", ordinal, err)
	}
	if u, err := dev.UUID(); err == nil {
		d.props.UUID = "GPU-" + u.String()
	}
	if d.props.TotalMemBytes, err = dev.TotalMem(); err != nil {
		return nil, fmt.Errorf("cuda: device %d: total memory: %w", ordinal, err)
	}
	attr := func(a cu.DeviceAttribute) int { v, _ := dev.Attribute(a); return v }
	d.props.ComputeMajor = attr(cu.ComputeCapabilityMajor)
	d.props.ComputeMinor = attr(cu.ComputeCapabilityMinor)
	d.props.Multiprocessor = attr(cu.MultiprocessorCount)
	d.props.PCIBusID = fmt.Sprintf("%04x:%02x:%02x.0", attr(cu.PciDomainID), attr(cu.PciBusID), attr(cu.PciDeviceID))
	d.maxBlocks = 8 * d.props.Multiprocessor
	if d.maxBlocks < 8 {
		d.maxBlocks = 8
	}
	if d.ctx, err = dev.RetainPrimaryCtx(); err != nil {
		return nil, fmt.Errorf("cuda: device %d: retain primary context: %w", ordinal, err)
	}
	err = d.Do(func() error {
		m, err := cu.LoadData(kernelsPTX)
		if err != nil {
			return fmt.Errorf("cuda: device %d: JIT-load kernels (cuModuleLoadData): %w", ordinal, err)
		}
		d.mod = m
		for _, name := range kernelNames() {
			f, err := m.Function(name)
			if err != nil {
				return fmt.Errorf("cuda: device %d: kernel %q missing from the embedded PTX (run go generate ./cuda/): %w", ordinal, name, err)
			}
			d.fns[name] = f
		}
		return nil
	})
	if err != nil {
		_ = dev.ReleasePrimaryCtx()
		return nil, err
	}
	return d, nil
}

func (d *Device) close() error {
	var errs []error
	if d.mod != (cu.Module{}) {
		errs = append(errs, d.Do(func() error { return d.mod.Unload() }))
	}
	errs = append(errs, d.dev.ReleasePrimaryCtx())
	return errors.Join(errs...)
}

// Properties returns what the driver reported about the device.
func (d *Device) Properties() Properties { return d.props }

// Ordinal is the driver's ordinal of the device.
func (d *Device) Ordinal() int { return d.props.Ordinal }

// Do runs fn with the device's context current on a locked OS thread. Every
// driver call of this package goes through it; callers use it to batch
// several calls. fn must not start goroutines that use the context.
func (d *Device) Do(fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	if err := cu.SetCurrentContext(d.ctx); err != nil {
		return fmt.Errorf("cuda: device %d: make context current: %w", d.props.Ordinal, err)
	}
	return fn()
}

// NewIssuer starts an issuing thread for d (see Issuer): an OS thread with
// d's context current, for callers that hand it their enqueues instead of
// calling the driver from many goroutines. Functions given to it may call
// any method of this package (each makes the context current again, which
// costs little on that thread) but must not block. Close it before the
// runtime.
func (d *Device) NewIssuer(cfg IssuerConfig) (*Issuer, error) {
	return NewIssuer(cfg, func() error {
		if err := cu.SetCurrentContext(d.ctx); err != nil {
			return fmt.Errorf("cuda: device %d: make context current on the issuing thread: %w", d.props.Ordinal, err)
		}
		return nil
	})
}

// function returns a kernel loaded at open; fns is read-only after open.
func (d *Device) function(name string) (cu.Function, error) {
	f, ok := d.fns[name]
	if !ok {
		return cu.Function{}, fmt.Errorf("%w: no kernel %q", ErrUnsupported, name)
	}
	return f, nil
}

// kernelNames lists every kernel of kernels.cu.
func kernelNames() []string {
	var names []string
	for _, dt := range AllDTypes() {
		for _, op := range []string{"sum", "prod", "max", "min"} {
			names = append(names, "reduce_"+op+"_"+dt.String())
		}
		names = append(names, "div_"+dt.String(), "fill_"+dt.String(), "count_mismatch_"+dt.String())
	}
	return append(names, "spin_ns")
}

// MemInfo returns the free and total device memory in bytes.
func (d *Device) MemInfo() (free, total int64, err error) {
	err = d.Do(func() error {
		free, total, err = cu.MemInfo()
		return err
	})
	return
}

// CanAccessPeer reports whether this device can read and write p's memory.
func (d *Device) CanAccessPeer(p *Device) (bool, error) {
	v, err := d.dev.CanAccessPeer(p.dev)
	if err != nil {
		return false, fmt.Errorf("cuda: cuDeviceCanAccessPeer(%d, %d): %w", d.props.Ordinal, p.props.Ordinal, err)
	}
	return v == 1, nil
}

// EnablePeerAccess lets kernels and copies on d reach p's memory directly.
// Enabling twice is not an error.
func (d *Device) EnablePeerAccess(p *Device) error {
	return d.Do(func() error {
		err := p.ctx.EnablePeerAccess(0)
		if err != nil && err.Error() == cu.PeerAccessAlreadyEnabled.Error() {
			return nil
		}
		if err != nil {
			return fmt.Errorf("cuda: enable peer access %d -> %d: %w", d.props.Ordinal, p.props.Ordinal, err)
		}
		return nil
	})
}

// Mem is device memory owned by one device.
type Mem struct {
	dev   *Device
	ptr   DevPtr
	bytes int64
	ipc   bool // opened from an IPC handle: closed, not freed
	view  bool // part of another Mem (View): not released here

	once sync.Once
}

// Alloc allocates bytes of device memory (cuMemAlloc).
func (d *Device) Alloc(bytes int64) (*Mem, error) {
	if bytes <= 0 {
		return nil, fmt.Errorf("%w: alloc of %d bytes", ErrBadArgument, bytes)
	}
	var p cu.DevicePtr
	err := d.Do(func() error {
		var err error
		p, err = cu.MemAlloc(bytes)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("cuda: device %d: cuMemAlloc(%d bytes): %w", d.props.Ordinal, bytes, err)
	}
	return &Mem{dev: d, ptr: DevPtr(p), bytes: bytes}, nil
}

// Ptr is the device address of the first byte.
func (m *Mem) Ptr() DevPtr { return m.ptr }

// Len is the size in bytes.
func (m *Mem) Len() int64 { return m.bytes }

// Device is the owner.
func (m *Mem) Device() *Device { return m.dev }

// Free releases the memory; later calls do nothing.
func (m *Mem) Free() error {
	var err error
	m.once.Do(func() {
		if m.view {
			return
		}
		err = m.dev.Do(func() error {
			if m.ipc {
				return ipcCloseMemHandle(m.ptr)
			}
			return cu.MemFree(cu.DevicePtr(m.ptr))
		})
	})
	return err
}

// IPCHandle returns a handle another process on this host can open with
// Device.OpenIPC to reach this memory.
func (m *Mem) IPCHandle() (IPCHandle, error) {
	var h IPCHandle
	err := m.dev.Do(func() error {
		var err error
		h, err = ipcGetMemHandle(m.ptr)
		return err
	})
	return h, err
}

// OpenIPC maps memory of another process (its IPCHandle) into d's context.
func (d *Device) OpenIPC(h IPCHandle, bytes int64) (*Mem, error) {
	var p DevPtr
	err := d.Do(func() error {
		var err error
		p, err = ipcOpenMemHandle(h)
		return err
	})
	if err != nil {
		return nil, err
	}
	return &Mem{dev: d, ptr: p, bytes: bytes, ipc: true}, nil
}

// CopyHtoD copies synchronously from host memory (pageable is allowed; not
// for hot paths): when it returns the bytes are in device memory, so work
// enqueued afterwards on any stream sees them.
//
// cuMemcpyHtoD alone does not promise that: from pageable memory it returns
// once the bytes are staged, with the DMA to the device still queued on the
// legacy default stream, and the package's streams are non-blocking (no
// implicit order with that stream). A copy on another stream enqueued right
// after it could then read the old contents, which happened whenever the
// GPU was shared (time-sliced) with other processes. So the legacy stream is
// synchronized before returning.
func (d *Device) CopyHtoD(dst DevPtr, src []byte) error {
	if len(src) == 0 {
		return nil
	}
	return d.Do(func() error {
		if err := cu.MemcpyHtoD(cu.DevicePtr(dst), unsafePointer(src), int64(len(src))); err != nil {
			return err
		}
		return cu.NoStream.Synchronize()
	})
}

// CopyDtoH copies synchronously to host memory (pageable is allowed; not for
// hot paths).
func (d *Device) CopyDtoH(dst []byte, src DevPtr) error {
	if len(dst) == 0 {
		return nil
	}
	return d.Do(func() error {
		return cu.MemcpyDtoH(unsafePointer(dst), cu.DevicePtr(src), int64(len(dst)))
	})
}

// Synchronize waits for all work on the device.
func (d *Device) Synchronize() error {
	return d.Do(cu.Synchronize)
}
