//go:build cuda

package pipeline

import (
	_ "embed"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"
	"unsafe"

	"gorgonia.org/cu"

	"github.com/gpumesh/gpumesh/cuda"
)

//go:generate nvcc -arch=compute_75 -ptx -o kernels/mlp.ptx kernels/mlp.cu

//go:embed kernels/mlp.ptx
var mlpPTX string

var mlpKernels = []string{
	"gemm_f32", "add_row_vector_f32", "sum_rows_f32", "tanh_f32", "relu_f32",
	"tanh_grad_f32", "relu_grad_f32", "axpy_f32", "mse_grad_f32",
}

func init() {
	openBenchDevices = func(stages int) ([]Device, func(), error) {
		rt, err := cuda.Open(cuda.DefaultConfig())
		if err != nil {
			return nil, nil, fmt.Errorf("%w: %v", ErrNoDevice, err)
		}
		gpus := rt.Devices()
		if len(gpus) == 0 {
			rt.Close()
			return nil, nil, fmt.Errorf("%w: no GPU", ErrNoDevice)
		}
		// one CUDADevice (its own stream) per stage, round robin over the
		// GPUs: stages sharing a GPU do not queue behind each other's work
		var devs []Device
		for s := 0; s < stages; s++ {
			c, err := NewCUDADevice(gpus[s%len(gpus)])
			if err != nil {
				for _, d := range devs {
					d.(*CUDADevice).Close()
				}
				rt.Close()
				return nil, nil, err
			}
			devs = append(devs, c)
		}
		return devs, func() {
			for _, d := range devs {
				d.(*CUDADevice).Close()
			}
			rt.Close()
		}, nil
	}
}

// CUDADevice runs the MLP's layer math on one GPU with the kernels of
// kernels/mlp.cu (no cuBLAS: the binary needs only libcuda). Work is issued
// in order on the CUDADevice's own non-blocking stream, so two CUDADevices
// on one GPU (two pipeline stages) do not wait for each other; Upload
// returns once the source is consumed, Download once the data is there.
// Give each stage a CUDADevice of its own: as an AsyncDevice it times the
// stage's work between BeginBusy and EndBusy, from one goroutine.
type CUDADevice struct {
	dev *cuda.Device
	fns map[string]cu.Function
	// pool keeps freed allocations by size for reuse: cuMemAlloc and
	// cuMemFree are slow and the latter synchronizes the device, while a
	// pipeline stage allocates the same shapes every micro-batch.
	pool freeList[int64, *cuda.Mem]
	// staging: pinned host buffers by size, for DownloadAsync; events:
	// free events by kind (timing or not)
	staging freeList[int, []byte]
	events  freeList[bool, *cuda.Event]
	// recv lends pinned memory to the stage's links (pinnedRecv)
	recv *recvPool

	mu     sync.Mutex
	st     *cuda.Stream
	pinned [][]byte // every staging buffer made, freed at Close

	spans      []busySpan // marked, not yet added to busy
	spanStart  *cuda.Event
	busyMillis float64
	// tracing: spans on the host's clock, from a base event whose host
	// time was taken when it completed
	traceOn  bool
	base     *cuda.Event
	baseHost time.Time
	traced   [][2]time.Time
}

// busySpan is one action's device work between two timing events.
type busySpan struct{ start, end *cuda.Event }

var _ AsyncDevice = (*CUDADevice)(nil)

// NewCUDADevice loads the MLP kernels on d (JIT from embedded PTX).
func NewCUDADevice(d *cuda.Device) (*CUDADevice, error) {
	c := &CUDADevice{dev: d, fns: map[string]cu.Function{}}
	c.recv = newRecvPool(c.allocRecv)
	err := d.Do(func() error {
		mod, err := cu.LoadData(mlpPTX)
		if err != nil {
			return fmt.Errorf("load MLP kernels: %w", err)
		}
		for _, name := range mlpKernels {
			f, err := mod.Function(name)
			if err != nil {
				return fmt.Errorf("kernel %s: %w", name, err)
			}
			c.fns[name] = f
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("%w: cuda:%d: %v", ErrNoDevice, d.Ordinal(), err)
	}
	if c.st, err = d.NewStream(); err != nil {
		return nil, fmt.Errorf("%w: cuda:%d: %v", ErrNoDevice, d.Ordinal(), err)
	}
	return c, nil
}

// stream is the device's stream, made again after Close.
func (c *CUDADevice) stream() (cu.Stream, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st == nil {
		st, err := c.dev.NewStream()
		if err != nil {
			return cu.Stream{}, fmt.Errorf("%w: %v", ErrDevice, err)
		}
		c.st = st
	}
	return c.st.Handle(), nil
}

// Name returns "cuda:N".
func (c *CUDADevice) Name() string { return fmt.Sprintf("cuda:%d", c.dev.Ordinal()) }

type cudaTensor struct {
	r, c int
	mem  *cuda.Mem
}

func (t *cudaTensor) Rows() int { return t.r }
func (t *cudaTensor) Cols() int { return t.c }

func (t *cudaTensor) ptr() uint64 { return uint64(t.mem.Ptr()) }

func devTensors(ts ...Tensor) ([]*cudaTensor, error) {
	out := make([]*cudaTensor, len(ts))
	for i, t := range ts {
		d, ok := t.(*cudaTensor)
		if !ok {
			return nil, fmt.Errorf("%w: cuda device given a %T", ErrDevice, t)
		}
		out[i] = d
	}
	return out, nil
}

// New allocates a zeroed tensor.
func (c *CUDADevice) New(rows, cols int) (Tensor, error) {
	if rows < 0 || cols < 0 {
		return nil, fmt.Errorf("%w: bad shape %d×%d", ErrDevice, rows, cols)
	}
	n := int64(max(rows*cols, 1))
	m, err := c.pool.get(4*n, func() (*cuda.Mem, error) { return c.dev.Alloc(4 * n) })
	if err != nil {
		return nil, err
	}
	st, err := c.stream()
	if err == nil {
		err = c.dev.Do(func() error { return cu.MemsetD32Async(cu.DevicePtr(m.Ptr()), 0, n, st) })
	}
	if err != nil {
		m.Free()
		return nil, err
	}
	return &cudaTensor{r: rows, c: cols, mem: m}, nil
}

// Free gives the tensor's device memory back to the device's pool.
func (c *CUDADevice) Free(t Tensor) {
	if d, ok := t.(*cudaTensor); ok && d.mem != nil {
		c.pool.put(d.mem.Len(), d.mem)
		d.mem = nil
	}
}

// Close frees the pooled memory. Tensors still in use stay valid until
// freed; the device can be used again afterwards. The stage's links must
// be closed first (they may hold receive memory of the device's).
func (c *CUDADevice) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.st != nil { // pooled memory may still be in use by queued work
		_ = c.st.Close() // waits for it
		c.st = nil
	}
	for _, m := range c.pool.drain() {
		m.Free()
	}
	// the stream is drained: no copy into or out of pinned memory is
	// pending (the receive pool's waits return at once)
	c.staging.drain()
	for _, b := range c.pinned {
		_ = c.dev.PinnedFree(b)
	}
	c.pinned = nil
	recv, _ := c.recv.close()
	for _, b := range recv {
		_ = c.dev.PinnedFree(f32bytes(b))
	}
	for _, sp := range c.spans {
		c.events.put(true, sp.start)
		c.events.put(true, sp.end)
	}
	if c.spanStart != nil {
		c.events.put(true, c.spanStart)
	}
	c.spans, c.spanStart = nil, nil
	for _, e := range c.events.drain() {
		_ = e.Close()
	}
}

// getPinned returns a pinned host buffer of n bytes for DownloadAsync.
func (c *CUDADevice) getPinned(n int) ([]byte, error) {
	return c.staging.get(n, func() ([]byte, error) {
		b, err := c.dev.PinnedAlloc(n)
		if err != nil {
			return nil, fmt.Errorf("%w: staging memory: %v", ErrDevice, err)
		}
		c.mu.Lock()
		c.pinned = append(c.pinned, b)
		c.mu.Unlock()
		return b, nil
	})
}

// event returns a free event (with timing or not), made when none is.
func (c *CUDADevice) event(timing bool) (*cuda.Event, error) {
	return c.events.get(timing, func() (*cuda.Event, error) {
		e, err := c.dev.NewEvent(timing)
		if err != nil {
			return nil, fmt.Errorf("%w: %v", ErrDevice, err)
		}
		return e, nil
	})
}

// allocRecv makes pinned memory of n values for the receive pool (freed at
// Close).
func (c *CUDADevice) allocRecv(n int) ([]float32, error) {
	b, err := c.dev.PinnedAlloc(4 * n)
	if err != nil {
		return nil, fmt.Errorf("%w: receive memory: %v", ErrDevice, err)
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), n), nil
}

// recvMemory implements pinnedRecv.
func (c *CUDADevice) recvMemory() recvBuffers { return c.recv }

// DownloadAsync enqueues a copy of src into pinned staging memory and an
// event after it; the Staged's Wait waits for that event (on whichever
// goroutine calls it) and Release gives buffer and event back.
func (c *CUDADevice) DownloadAsync(src Tensor) (*Staged, error) {
	d, err := devTensors(src)
	if err != nil {
		return nil, err
	}
	n := d[0].r * d[0].c
	if n == 0 {
		return &Staged{}, nil
	}
	if _, err := c.stream(); err != nil {
		return nil, err
	}
	buf, err := c.getPinned(4 * n)
	if err != nil {
		return nil, err
	}
	ev, err := c.event(false)
	if err == nil {
		if err = c.st.CopyDtoH(buf, d[0].mem.Ptr()); err == nil {
			err = c.st.Record(ev)
		}
	}
	release := func() {
		c.staging.put(len(buf), buf)
		if ev != nil {
			c.events.put(false, ev)
		}
	}
	if err != nil {
		if ev != nil {
			_ = c.st.Synchronize() // the copy may be queued: let it land first
		}
		release()
		return nil, fmt.Errorf("%w: %v", ErrDevice, err)
	}
	return &Staged{
		Data:    unsafe.Slice((*float32)(unsafe.Pointer(&buf[0])), n),
		wait:    func() error { return ev.Synchronize() },
		release: release,
	}, nil
}

// MSEGrad computes g = 2·(y − t)/n on the device.
func (c *CUDADevice) MSEGrad(y, t, g Tensor, n float32) error {
	ts, err := devTensors(y, t, g)
	if err != nil {
		return err
	}
	Y, T, G := ts[0], ts[1], ts[2]
	if Y.r != T.r || Y.c != T.c || Y.r != G.r || Y.c != G.c {
		return fmt.Errorf("%w: loss gradient shapes %d×%d, %d×%d, %d×%d", ErrDevice, Y.r, Y.c, T.r, T.c, G.r, G.c)
	}
	k := Y.r * Y.c
	if k == 0 {
		return nil
	}
	return c.launch("mse_grad_f32", grid1(k), 1, 256, 1, Y.ptr(), T.ptr(), G.ptr(), uint64(k), f32arg(n))
}

// BeginBusy records a timing event at the current end of the queue, after
// adding up the spans that completed.
func (c *CUDADevice) BeginBusy() error {
	if _, err := c.stream(); err != nil {
		return err
	}
	if err := c.collectSpans(false); err != nil {
		return err
	}
	if c.traceOn && c.base == nil {
		// the base: recorded on an idle-or-not stream, waited for, and
		// its host time taken right after (microseconds of error)
		b, err := c.event(true)
		if err != nil {
			return err
		}
		if err := c.st.Record(b); err != nil {
			return fmt.Errorf("%w: %v", ErrDevice, err)
		}
		if err := b.Synchronize(); err != nil {
			return fmt.Errorf("%w: %v", ErrDevice, err)
		}
		c.base, c.baseHost = b, time.Now()
	}
	e, err := c.recordTiming()
	if err != nil {
		return err
	}
	c.spanStart = e
	return nil
}

// recordTiming records a timing event on the stage's stream (a span's
// start or end); the event goes back to its free list if that fails.
func (c *CUDADevice) recordTiming() (*cuda.Event, error) {
	e, err := c.event(true)
	if err != nil {
		return nil, err
	}
	if err := c.st.Record(e); err != nil {
		c.events.put(true, e)
		return nil, fmt.Errorf("%w: %v", ErrDevice, err)
	}
	return e, nil
}

// traceSpans turns recording of span times on or off (spanTracer).
func (c *CUDADevice) traceSpans(on bool) {
	c.traceOn = on
	if !on && c.base != nil {
		c.events.put(true, c.base)
		c.base = nil
	}
}

// takeSpans returns the recorded spans (spanTracer).
func (c *CUDADevice) takeSpans() [][2]time.Time {
	t := c.traced
	c.traced = nil
	return t
}

// EndBusy records the span's end event.
func (c *CUDADevice) EndBusy() error {
	if c.spanStart == nil {
		return fmt.Errorf("%w: EndBusy without BeginBusy", ErrDevice)
	}
	e, err := c.recordTiming()
	if err != nil {
		return err
	}
	c.spans = append(c.spans, busySpan{c.spanStart, e})
	c.spanStart = nil
	return nil
}

// collectSpans adds the completed spans' device time to busyMillis (all
// of them, waiting, when wait is set) and recycles their events.
func (c *CUDADevice) collectSpans(wait bool) error {
	done := 0
	for _, sp := range c.spans {
		if wait {
			if err := sp.end.Synchronize(); err != nil {
				return fmt.Errorf("%w: %v", ErrDevice, err)
			}
		} else if ok, err := sp.end.Done(); err != nil {
			return fmt.Errorf("%w: %v", ErrDevice, err)
		} else if !ok {
			break
		}
		ms, err := sp.end.Elapsed(sp.start)
		if err != nil {
			return fmt.Errorf("%w: %v", ErrDevice, err)
		}
		c.busyMillis += ms
		if c.traceOn && c.base != nil {
			if s0, err := sp.start.Elapsed(c.base); err == nil {
				at := c.baseHost.Add(time.Duration(s0 * 1e6))
				c.traced = append(c.traced, [2]time.Time{at, at.Add(time.Duration(ms * 1e6))})
			}
		}
		done++
	}
	for _, sp := range c.spans[:done] {
		c.events.put(true, sp.start)
		c.events.put(true, sp.end)
	}
	c.spans = append(c.spans[:0], c.spans[done:]...)
	return nil
}

// BusySeconds waits for every marked span and returns their device time
// since the last call.
func (c *CUDADevice) BusySeconds() (float64, error) {
	if err := c.collectSpans(true); err != nil {
		return 0, err
	}
	s := c.busyMillis / 1e3
	c.busyMillis = 0
	return s, nil
}

// Upload copies src into dst. From receive memory the device lent
// (pinnedRecv) the copy is queued behind an event and Upload returns at
// once; the memory is handed out again only after the copy.
func (c *CUDADevice) Upload(dst Tensor, src []float32) error {
	d, err := devTensors(dst)
	if err != nil {
		return err
	}
	if len(src) != d[0].r*d[0].c {
		return fmt.Errorf("%w: upload of %d values into %d×%d", ErrDevice, len(src), d[0].r, d[0].c)
	}
	if len(src) == 0 {
		return nil
	}
	st, err := c.stream()
	if err != nil {
		return err
	}
	b := f32bytes(src)
	if c.recv.owns(src) {
		return c.uploadPinned(d[0].mem.Ptr(), src)
	}
	// from pageable memory: returns once src is staged; ordered on st
	return c.dev.Do(func() error {
		return cu.MemcpyHtoDAsync(cu.DevicePtr(d[0].mem.Ptr()), unsafe.Pointer(&b[0]), int64(len(b)), st)
	})
}

// uploadPinned queues the copy of src, receive memory of the device's, to
// dst on the stream and an event after it, which the receive pool waits for
// before it hands src out again.
func (c *CUDADevice) uploadPinned(dst cuda.DevPtr, src []float32) error {
	ev, err := c.event(false)
	if err != nil {
		return err
	}
	if err = c.st.CopyHtoD(dst, f32bytes(src)); err == nil {
		err = c.st.Record(ev)
	}
	if err != nil {
		// the copy may be queued: let it finish before src is reused
		err = errors.Join(err, c.st.Synchronize())
		c.events.put(false, ev)
		return fmt.Errorf("%w: %v", ErrDevice, err)
	}
	c.recv.markUploaded(src, func() error {
		err := ev.Synchronize()
		c.events.put(false, ev)
		return err
	})
	return nil
}

// Download copies src into dst (waiting for the work that writes it).
func (c *CUDADevice) Download(dst []float32, src Tensor) error {
	d, err := devTensors(src)
	if err != nil {
		return err
	}
	if len(dst) != d[0].r*d[0].c {
		return fmt.Errorf("%w: download of %d×%d into %d values", ErrDevice, d[0].r, d[0].c, len(dst))
	}
	if len(dst) == 0 {
		return nil
	}
	st, err := c.stream()
	if err != nil {
		return err
	}
	b := f32bytes(dst)
	// to pageable memory: returns once the copy (after st's work) is done
	return c.dev.Do(func() error {
		return cu.MemcpyDtoHAsync(unsafe.Pointer(&b[0]), cu.DevicePtr(d[0].mem.Ptr()), int64(len(b)), st)
	})
}

func f32arg(f float32) uint64 { return uint64(math.Float32bits(f)) }

// launch runs a kernel; every argument is one 64-bit slot.
func (c *CUDADevice) launch(name string, gx, gy, bx, by int, args ...uint64) error {
	params := make([]unsafe.Pointer, len(args))
	for i := range args {
		params[i] = unsafe.Pointer(&args[i])
	}
	st, err := c.stream()
	if err != nil {
		return err
	}
	return c.dev.Do(func() error {
		if err := c.fns[name].Launch(gx, gy, 1, bx, by, 1, 0, st, params); err != nil {
			return fmt.Errorf("%w: launch %s: %v", ErrDevice, name, err)
		}
		return nil
	})
}

func grid1(n int) int { return max(1, min((n+255)/256, 4096)) }

func b2u(b bool) uint64 {
	if b {
		return 1
	}
	return 0
}

// Gemm computes c = alpha·op(a)·op(b) + beta·c.
func (c *CUDADevice) Gemm(transA, transB bool, alpha float32, a, b Tensor, beta float32, out Tensor) error {
	t, err := devTensors(a, b, out)
	if err != nil {
		return err
	}
	A, B, C := t[0], t[1], t[2]
	m, k := A.r, A.c
	if transA {
		m, k = k, m
	}
	kb, n := B.r, B.c
	if transB {
		kb, n = n, kb
	}
	if k != kb || C.r != m || C.c != n {
		return fmt.Errorf("%w: gemm shapes %d×%d (T=%v) · %d×%d (T=%v) into %d×%d", ErrDevice, A.r, A.c, transA, B.r, B.c, transB, C.r, C.c)
	}
	if m == 0 || n == 0 {
		return nil
	}
	return c.launch("gemm_f32", (n+15)/16, (m+15)/16, 16, 16,
		b2u(transA), b2u(transB), uint64(m), uint64(n), uint64(k), f32arg(alpha),
		A.ptr(), uint64(A.c), B.ptr(), uint64(B.c), f32arg(beta), C.ptr())
}

// AddRowVector adds v to every row of x.
func (c *CUDADevice) AddRowVector(x, v Tensor) error {
	t, err := devTensors(x, v)
	if err != nil {
		return err
	}
	X, V := t[0], t[1]
	if V.r != 1 || V.c != X.c {
		return fmt.Errorf("%w: bias %d×%d for %d×%d", ErrDevice, V.r, V.c, X.r, X.c)
	}
	if X.r*X.c == 0 {
		return nil
	}
	return c.launch("add_row_vector_f32", grid1(X.r*X.c), 1, 256, 1, X.ptr(), V.ptr(), uint64(X.r), uint64(X.c))
}

// SumRows computes dst = Σ_i x[i,:] + beta·dst.
func (c *CUDADevice) SumRows(dst, x Tensor, beta float32) error {
	t, err := devTensors(dst, x)
	if err != nil {
		return err
	}
	D, X := t[0], t[1]
	if D.r != 1 || D.c != X.c {
		return fmt.Errorf("%w: row sum %d×%d into %d×%d", ErrDevice, X.r, X.c, D.r, D.c)
	}
	if X.c == 0 {
		return nil
	}
	return c.launch("sum_rows_f32", grid1(X.c), 1, 256, 1, D.ptr(), X.ptr(), uint64(X.r), uint64(X.c), f32arg(beta))
}

// Activate applies act in place.
func (c *CUDADevice) Activate(act string, x Tensor) error {
	t, err := devTensors(x)
	if err != nil {
		return err
	}
	n := t[0].r * t[0].c
	var k string
	switch act {
	case ActTanh:
		k = "tanh_f32"
	case ActReLU:
		k = "relu_f32"
	default:
		return fmt.Errorf("%w: unknown activation %q", ErrDevice, act)
	}
	if n == 0 {
		return nil
	}
	return c.launch(k, grid1(n), 1, 256, 1, t[0].ptr(), uint64(n))
}

// ActivationGrad multiplies dy by act'(given output y).
func (c *CUDADevice) ActivationGrad(act string, y, dy Tensor) error {
	t, err := devTensors(y, dy)
	if err != nil {
		return err
	}
	Y, D := t[0], t[1]
	if Y.r != D.r || Y.c != D.c {
		return fmt.Errorf("%w: activation gradient shapes %d×%d and %d×%d", ErrDevice, Y.r, Y.c, D.r, D.c)
	}
	n := Y.r * Y.c
	var k string
	switch act {
	case ActTanh:
		k = "tanh_grad_f32"
	case ActReLU:
		k = "relu_grad_f32"
	default:
		return fmt.Errorf("%w: unknown activation %q", ErrDevice, act)
	}
	if n == 0 {
		return nil
	}
	return c.launch(k, grid1(n), 1, 256, 1, Y.ptr(), D.ptr(), uint64(n))
}

// Axpy computes y += alpha·x.
func (c *CUDADevice) Axpy(alpha float32, x, y Tensor) error {
	t, err := devTensors(x, y)
	if err != nil {
		return err
	}
	X, Y := t[0], t[1]
	n := X.r * X.c
	if n != Y.r*Y.c {
		return fmt.Errorf("%w: axpy of %d into %d values", ErrDevice, n, Y.r*Y.c)
	}
	if n == 0 {
		return nil
	}
	return c.launch("axpy_f32", grid1(n), 1, 256, 1, f32arg(alpha), X.ptr(), Y.ptr(), uint64(n))
}
