package cuda

import (
	"errors"
	"fmt"
)

var (
	// ErrNotBuilt is returned by Open in a binary built without the "cuda"
	// build tag.
	ErrNotBuilt = errors.New("cuda: this binary was built without CUDA support; rebuild with -tags cuda on a host with the CUDA headers")
	// ErrNoDevice is returned when the driver reports no usable device, or a
	// requested ordinal does not exist.
	ErrNoDevice = errors.New("cuda: no CUDA device")
	// ErrClosed is returned by calls on a closed runtime, pool or stream.
	ErrClosed = errors.New("cuda: closed")
	// ErrUnsupported is returned for a dtype/op pair no kernel implements.
	ErrUnsupported = errors.New("cuda: unsupported dtype or op")
	// ErrBadArgument is returned for sizes or offsets out of range.
	ErrBadArgument = errors.New("cuda: bad argument")
	// ErrNVML wraps failures of the NVML library once it is loaded.
	ErrNVML = errors.New("cuda: nvml")
)

// DType is an element type the kernels understand.
type DType int

// Element types.
const (
	Float32 DType = iota + 1
	Float64
	Float16
	BFloat16
	Int32
	Int64
	Uint8
)

// Size returns the size of one element in bytes, or 0 for an unknown dtype.
func (d DType) Size() int {
	switch d {
	case Float32, Int32:
		return 4
	case Float64, Int64:
		return 8
	case Float16, BFloat16:
		return 2
	case Uint8:
		return 1
	}
	return 0
}

// String is the kernel-name spelling of the dtype ("float32", ...).
func (d DType) String() string {
	switch d {
	case Float32:
		return "float32"
	case Float64:
		return "float64"
	case Float16:
		return "float16"
	case BFloat16:
		return "bfloat16"
	case Int32:
		return "int32"
	case Int64:
		return "int64"
	case Uint8:
		return "uint8"
	}
	return fmt.Sprintf("dtype(%d)", int(d))
}

// IsFloat reports whether the dtype is a floating-point type.
func (d DType) IsFloat() bool {
	return d == Float32 || d == Float64 || d == Float16 || d == BFloat16
}

// AllDTypes lists every dtype with kernels.
func AllDTypes() []DType { return []DType{Float32, Float64, Float16, BFloat16, Int32, Int64, Uint8} }

// Op is an element-wise reduction. Avg is Sum followed by Div by the rank
// count, done by the caller once all contributions are in.
type Op int

// Reduction ops.
const (
	Sum Op = iota + 1
	Prod
	Max
	Min
	Avg
)

// String is the kernel-name spelling of the op.
func (o Op) String() string {
	switch o {
	case Sum:
		return "sum"
	case Prod:
		return "prod"
	case Max:
		return "max"
	case Min:
		return "min"
	case Avg:
		return "avg"
	}
	return fmt.Sprintf("op(%d)", int(o))
}

// AllOps lists every op.
func AllOps() []Op { return []Op{Sum, Prod, Max, Min, Avg} }

// kernelOp is the reduce kernel an op uses (avg reduces with sum).
func (o Op) kernelOp() (string, error) {
	switch o {
	case Sum, Avg:
		return "sum", nil
	case Prod, Max, Min:
		return o.String(), nil
	}
	return "", fmt.Errorf("%w: op %v", ErrUnsupported, o)
}

// DevPtr is a device address in a device's (unified) address space.
type DevPtr uintptr

// Add returns p advanced by off bytes.
func (p DevPtr) Add(off int64) DevPtr { return p + DevPtr(off) }

// Properties describe one device as the driver reports it.
type Properties struct {
	Ordinal        int    `json:"ordinal"`
	Name           string `json:"name"`
	UUID           string `json:"uuid"`
	TotalMemBytes  int64  `json:"total_mem_bytes"`
	ComputeMajor   int    `json:"compute_major"`
	ComputeMinor   int    `json:"compute_minor"`
	Multiprocessor int    `json:"multiprocessors"`
	PCIBusID       string `json:"pci_bus_id"`
}
