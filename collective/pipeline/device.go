package pipeline

import (
	"errors"
	"fmt"
	"math"
	"time"
)

// Activation functions of the MLP's hidden layers.
const (
	ActTanh = "tanh"
	ActReLU = "relu"
)

// ErrDevice means a device operation got tensors of the wrong shape or kind.
var ErrDevice = errors.New("pipeline device error")

// Tensor is a row-major matrix that lives on a Device.
type Tensor interface {
	Rows() int
	Cols() int
}

// Device does the MLP's layer math. The CPU implementation works on host
// slices; a CUDA implementation (own kernels: matrix multiply, bias,
// activation and their gradients) plugs in behind the same interface with
// device buffers, and the runtime copies activations to and from host
// memory only at stage boundaries (Upload/Download). A Device is used from
// one goroutine at a time.
type Device interface {
	// Name is "cpu" or "cuda:N".
	Name() string
	// New returns a zeroed rows×cols tensor.
	New(rows, cols int) (Tensor, error)
	// Free releases a tensor's memory; the tensor must not be used again.
	Free(t Tensor)
	// Upload copies len(src) = rows×cols values into dst.
	Upload(dst Tensor, src []float32) error
	// Download copies src into dst (len rows×cols).
	Download(dst []float32, src Tensor) error
	// Gemm computes c = alpha·op(a)·op(b) + beta·c, op transposing when
	// asked.
	Gemm(transA, transB bool, alpha float32, a, b Tensor, beta float32, c Tensor) error
	// AddRowVector adds the 1×cols v to every row of x.
	AddRowVector(x, v Tensor) error
	// SumRows computes dst = Σ_i x[i,:] + beta·dst (dst is 1×cols).
	SumRows(dst, x Tensor, beta float32) error
	// Activate applies the activation in place.
	Activate(act string, x Tensor) error
	// ActivationGrad multiplies dy in place by the activation's derivative,
	// given the activation's output y.
	ActivationGrad(act string, y, dy Tensor) error
	// Axpy computes y += alpha·x.
	Axpy(alpha float32, x, y Tensor) error
}

// HostTensor is a tensor in host memory, the CPU device's tensor.
type HostTensor struct {
	R, C int
	Data []float32
}

// Rows is the number of rows.
func (t *HostTensor) Rows() int { return t.R }

// Cols is the number of columns.
func (t *HostTensor) Cols() int { return t.C }

// CPU is the host implementation of Device.
type CPU struct{}

var _ Device = CPU{}

// Name returns "cpu".
func (CPU) Name() string { return "cpu" }

func host(ts ...Tensor) ([]*HostTensor, error) {
	out := make([]*HostTensor, len(ts))
	for i, t := range ts {
		h, ok := t.(*HostTensor)
		if !ok {
			return nil, fmt.Errorf("%w: cpu device given a %T", ErrDevice, t)
		}
		out[i] = h
	}
	return out, nil
}

// New returns a zeroed tensor.
func (CPU) New(rows, cols int) (Tensor, error) {
	if rows < 0 || cols < 0 {
		return nil, fmt.Errorf("%w: bad shape %d×%d", ErrDevice, rows, cols)
	}
	return &HostTensor{R: rows, C: cols, Data: make([]float32, rows*cols)}, nil
}

// Free does nothing: host tensors are garbage collected.
func (CPU) Free(Tensor) {}

// Upload copies src into dst.
func (CPU) Upload(dst Tensor, src []float32) error {
	h, err := host(dst)
	if err != nil {
		return err
	}
	if len(src) != len(h[0].Data) {
		return fmt.Errorf("%w: upload of %d values into %d×%d", ErrDevice, len(src), h[0].R, h[0].C)
	}
	copy(h[0].Data, src)
	return nil
}

// Download copies src into dst.
func (CPU) Download(dst []float32, src Tensor) error {
	h, err := host(src)
	if err != nil {
		return err
	}
	if len(dst) != len(h[0].Data) {
		return fmt.Errorf("%w: download of %d×%d into %d values", ErrDevice, h[0].R, h[0].C, len(dst))
	}
	copy(dst, h[0].Data)
	return nil
}

// Gemm computes c = alpha·op(a)·op(b) + beta·c.
func (CPU) Gemm(transA, transB bool, alpha float32, a, b Tensor, beta float32, c Tensor) error {
	h, err := host(a, b, c)
	if err != nil {
		return err
	}
	A, B, C := h[0], h[1], h[2]
	m, k := A.R, A.C
	if transA {
		m, k = k, m
	}
	kb, n := B.R, B.C
	if transB {
		kb, n = n, kb
	}
	if k != kb || C.R != m || C.C != n {
		return fmt.Errorf("%w: gemm shapes %d×%d (T=%v) · %d×%d (T=%v) into %d×%d", ErrDevice, A.R, A.C, transA, B.R, B.C, transB, C.R, C.C)
	}
	if beta != 1 {
		for i := range C.Data {
			C.Data[i] *= beta
		}
	}
	at := func(i, p int) float32 {
		if transA {
			return A.Data[p*A.C+i]
		}
		return A.Data[i*A.C+p]
	}
	for i := 0; i < m; i++ {
		crow := C.Data[i*n : (i+1)*n]
		for p := 0; p < k; p++ {
			av := alpha * at(i, p)
			if av == 0 {
				continue
			}
			if !transB {
				brow := B.Data[p*n : (p+1)*n]
				for j, bv := range brow {
					crow[j] += av * bv
				}
			} else {
				for j := 0; j < n; j++ {
					crow[j] += av * B.Data[j*B.C+p]
				}
			}
		}
	}
	return nil
}

// AddRowVector adds v to every row of x.
func (CPU) AddRowVector(x, v Tensor) error {
	h, err := host(x, v)
	if err != nil {
		return err
	}
	X, V := h[0], h[1]
	if V.R != 1 || V.C != X.C {
		return fmt.Errorf("%w: bias %d×%d for %d×%d", ErrDevice, V.R, V.C, X.R, X.C)
	}
	for i := 0; i < X.R; i++ {
		row := X.Data[i*X.C : (i+1)*X.C]
		for j := range row {
			row[j] += V.Data[j]
		}
	}
	return nil
}

// SumRows computes dst = Σ_i x[i,:] + beta·dst.
func (CPU) SumRows(dst, x Tensor, beta float32) error {
	h, err := host(dst, x)
	if err != nil {
		return err
	}
	D, X := h[0], h[1]
	if D.R != 1 || D.C != X.C {
		return fmt.Errorf("%w: row sum %d×%d into %d×%d", ErrDevice, X.R, X.C, D.R, D.C)
	}
	for j := range D.Data {
		D.Data[j] *= beta
	}
	for i := 0; i < X.R; i++ {
		for j, v := range X.Data[i*X.C : (i+1)*X.C] {
			D.Data[j] += v
		}
	}
	return nil
}

// Activate applies act in place.
func (CPU) Activate(act string, x Tensor) error {
	h, err := host(x)
	if err != nil {
		return err
	}
	d := h[0].Data
	switch act {
	case ActTanh:
		for i, v := range d {
			d[i] = float32(math.Tanh(float64(v)))
		}
	case ActReLU:
		for i, v := range d {
			if v < 0 {
				d[i] = 0
			}
		}
	default:
		return fmt.Errorf("%w: unknown activation %q", ErrDevice, act)
	}
	return nil
}

// ActivationGrad multiplies dy by act'(given output y).
func (CPU) ActivationGrad(act string, y, dy Tensor) error {
	h, err := host(y, dy)
	if err != nil {
		return err
	}
	Y, D := h[0], h[1]
	if Y.R != D.R || Y.C != D.C {
		return fmt.Errorf("%w: activation gradient shapes %d×%d and %d×%d", ErrDevice, Y.R, Y.C, D.R, D.C)
	}
	switch act {
	case ActTanh:
		for i, v := range Y.Data {
			D.Data[i] *= 1 - v*v
		}
	case ActReLU:
		for i, v := range Y.Data {
			if v <= 0 {
				D.Data[i] = 0
			}
		}
	default:
		return fmt.Errorf("%w: unknown activation %q", ErrDevice, act)
	}
	return nil
}

// Axpy computes y += alpha·x.
func (CPU) Axpy(alpha float32, x, y Tensor) error {
	h, err := host(x, y)
	if err != nil {
		return err
	}
	X, Y := h[0], h[1]
	if len(X.Data) != len(Y.Data) {
		return fmt.Errorf("%w: axpy of %d into %d values", ErrDevice, len(X.Data), len(Y.Data))
	}
	for i, v := range X.Data {
		Y.Data[i] += alpha * v
	}
	return nil
}

// AsyncDevice is a Device whose work runs in order on a device queue after
// the calls that issue it return (CUDADevice). RunJob then keeps the
// stage's goroutine off every per-message wait: a stage's output is copied
// into staging memory of the device's (DownloadAsync) and the endpoint's
// sender goroutine waits for it, the loss gradient is computed on the device
// (MSEGrad), and the stage's busy time is the device's (BeginBusy, EndBusy,
// BusySeconds) rather than the host's time in Forward and Backward.
type AsyncDevice interface {
	Device
	// DownloadAsync starts copying src into host memory owned by the
	// device and returns at once; see Staged.
	DownloadAsync(src Tensor) (*Staged, error)
	// MSEGrad computes g = 2·(y − t)/n elementwise, in float32 as the CPU
	// does.
	MSEGrad(y, t, g Tensor, n float32) error
	// BeginBusy and EndBusy mark the start and end of one action's device
	// work; BusySeconds waits for all marked work and returns the device
	// time between each pair of marks, summed, since the last BusySeconds.
	BeginBusy() error
	EndBusy() error
	BusySeconds() (float64, error)
}

// pinnedRecv is an AsyncDevice that lends host memory for received
// messages (page-locked for a GPU): RunJob has its stage's links receive
// into recvMemory, and an Upload from such a message's Data returns once
// the copy is queued, without waiting for it. The memory goes back with
// Message.Release and is handed out again only once the copies reading it
// are done (recvPool).
type pinnedRecv interface {
	AsyncDevice
	recvMemory() recvBuffers
}

// Staged is host memory a device fills asynchronously: Data is valid once
// Wait returns nil, until Release, which gives the memory back to the
// device (at most once; the Staged must not be used afterwards).
type Staged struct {
	Data    []float32
	wait    func() error
	release func()
}

// Wait blocks until Data holds the copy.
func (s *Staged) Wait() error {
	if s.wait == nil {
		return nil
	}
	return s.wait()
}

// Release gives the memory back to the device.
func (s *Staged) Release() {
	if s.release != nil {
		r := s.release
		s.release = nil
		r()
	}
}

// message makes a Message of the staged data: the endpoint's sender waits
// for it and releases it once the link is done with it.
func (s *Staged) message(rows, cols int) *Message {
	return &Message{Rows: rows, Cols: cols, Data: s.Data, ready: s.Wait, sent: s.Release}
}

// spanTracer is an AsyncDevice that can also report when, on the host's
// clock, the device ran each span it timed (StageConfig.Trace).
type spanTracer interface {
	// traceSpans turns recording on or off.
	traceSpans(on bool)
	// takeSpans returns the recorded spans (start, end) in marking order,
	// once BusySeconds has waited for them, and forgets them.
	takeSpans() [][2]time.Time
}
