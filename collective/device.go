package collective

import (
	"fmt"
	"sort"
	"sync"
)

// Device allocates Buffers in one kind of memory. "cpu" (host memory) is
// always registered; a CUDA backend registers "cuda" from its own package
// (built with the cuda tag), so that the built-in allreduce job and
// `gpumesh bench allreduce --device cuda` use device memory without this
// package importing any CUDA code.
type Device interface {
	// Name is the device kind ("cpu", "cuda").
	Name() string
	// Alloc returns a zeroed buffer of n elements of dt on device index gpu:
	// the GPU ordinal the rank was placed on (ranks sharing a GPU pass the
	// same one) or, for a rank placed without GPUs, its local rank (index
	// among the job's ranks on this node); a device with fewer GPUs takes
	// it modulo their number. If the Buffer implements io.Closer, the
	// caller closes it when done.
	Alloc(gpu int, dt DType, n int) (Buffer, error)
}

var (
	devicesMu sync.Mutex
	devices   = map[string]Device{"cpu": hostDevice{}}
)

// RegisterDevice makes a device available by name (replacing one of the same
// name). A CUDA package calls it from an init function or at agent start.
func RegisterDevice(d Device) {
	devicesMu.Lock()
	defer devicesMu.Unlock()
	devices[d.Name()] = d
}

// LookupDevice returns the named device. "auto" (or "") picks "cuda" when it
// is registered, else "cpu".
func LookupDevice(name string) (Device, error) {
	devicesMu.Lock()
	defer devicesMu.Unlock()
	if name == "" || name == "auto" {
		if d, ok := devices["cuda"]; ok {
			return d, nil
		}
		return devices["cpu"], nil
	}
	if d, ok := devices[name]; ok {
		return d, nil
	}
	var names []string
	for n := range devices {
		names = append(names, n)
	}
	sort.Strings(names)
	hint := ""
	if name == "cuda" {
		hint = "; this binary has no CUDA backend (build with -tags cuda and run on a GPU host)"
	}
	return nil, fmt.Errorf("%w: device %q (available: %v%s)", ErrNoDevice, name, names, hint)
}

type hostDevice struct{}

func (hostDevice) Name() string { return "cpu" }
func (hostDevice) Alloc(_ int, dt DType, n int) (Buffer, error) {
	if !dt.Valid() || n < 0 {
		return nil, fmt.Errorf("%w: cannot allocate %d elements of %v", ErrBadArgument, n, dt)
	}
	return NewHostBuffer(dt, n), nil
}
