//go:build cuda

package cudabuf

import (
	"fmt"
	"io"
	"sync"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// Device is the "cuda" collective.Device: the built-in allreduce job and
// `gpumesh bench allreduce --device cuda` allocate their buffers through it.
// Device index i (the rank's placed GPU, or its local rank when it has
// none) is GPU i mod the number of GPUs. The Backend (contexts,
// kernels, pinned pool) is opened on the first Alloc, so a binary that never
// runs a CUDA job never touches the GPUs; an open that fails is returned by
// that Alloc and retried by the next.
type Device struct {
	cfg  cuda.Config
	opts []Option

	mu sync.Mutex
	be *Backend
}

var _ collective.Device = (*Device)(nil)

// NewDevice returns a lazily opened CUDA device for the collectives.
func NewDevice(cfg cuda.Config, opts ...Option) *Device {
	return &Device{cfg: cfg, opts: opts}
}

// Register makes "cuda" available to collective.LookupDevice (and so to the
// allreduce job and the bench command) with the default configuration. It
// does no CUDA work; call it once at program start in a -tags cuda build.
func Register() *Device {
	d := NewDevice(cuda.DefaultConfig())
	collective.RegisterDevice(d)
	return d
}

// Name implements collective.Device.
func (d *Device) Name() string { return "cuda" }

// Backend opens the backend if needed and returns it.
func (d *Device) Backend() (*Backend, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.be != nil {
		return d.be, nil
	}
	be, err := Open(d.cfg, d.opts...)
	if err != nil {
		return nil, fmt.Errorf("cuda device: %w", err)
	}
	d.be = be
	return be, nil
}

// Alloc implements collective.Device: a zeroed device buffer on GPU
// gpu mod NumDevices. The returned *Buffer is an io.Closer.
func (d *Device) Alloc(gpu int, dt collective.DType, n int) (collective.Buffer, error) {
	be, err := d.Backend()
	if err != nil {
		return nil, err
	}
	if gpu < 0 {
		return nil, fmt.Errorf("%w: device index %d", collective.ErrBadArgument, gpu)
	}
	b, err := be.NewBuffer(gpu%be.NumDevices(), dt, n)
	if err != nil {
		return nil, err
	}
	if err := b.Zero(); err != nil {
		b.Free()
		return nil, err
	}
	return b, nil
}

// Close closes the backend if it was opened. Buffers must be closed first.
func (d *Device) Close() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.be == nil {
		return nil
	}
	err := d.be.Close()
	d.be = nil
	return err
}

var _ io.Closer = (*Buffer)(nil)

// Close implements io.Closer (same as Free).
func (buf *Buffer) Close() error { return buf.Free() }

// Zero sets every element to zero bits and waits for it.
func (buf *Buffer) Zero() error {
	buf.mu.Lock()
	buf.dropPrefetchLocked(0, buf.n)
	err := buf.waitReadersLocked(0, buf.n)
	if err == nil {
		err = buf.wr.Memset(buf.mem.Ptr(), 0, buf.mem.Len())
		buf.wrSeq.Add(1)
	}
	buf.mu.Unlock()
	if err != nil {
		return err
	}
	return buf.Sync()
}
