//go:build cgo

package cuda

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/dl"
	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NVML reads GPU facts and health through an nvml.Interface: the real
// library (loaded at run time with dlopen) or a test double such as go-nvml's
// mock package. Safe for concurrent use.
//
// go-nvml links every NVML function as a weak symbol: calling one that the
// loaded library lacks (or calling any while no library is loaded) makes the
// dynamic linker kill the process ("symbol lookup error"). So NVML never calls
// a function before it knows the library has it: the real library is probed
// with dlsym first, and a library without the functions discovery needs counts
// as no NVML at all.
type NVML struct {
	lib nvml.Interface
	// has reports whether the library exports a symbol; nil means every
	// symbol is there (test doubles).
	has func(symbol string) bool

	mu     sync.Mutex
	inited bool
	absent bool
	reason string // why NVML is absent, for operators
}

// NewNVML wraps lib; nil means the system's libnvidia-ml.so.1.
func NewNVML(lib nvml.Interface) *NVML {
	if lib == nil {
		return newSystemNVML("libnvidia-ml.so.1")
	}
	return &NVML{lib: lib}
}

// newSystemNVML loads the NVML library at path (a file name is looked up as
// dlopen does) and probes which of the functions we call it exports.
func newSystemNVML(path string) *NVML {
	n := &NVML{lib: nvml.New(nvml.WithLibraryPath(path))}
	probe := dl.New(path, dl.RTLD_LAZY|dl.RTLD_LOCAL)
	if err := probe.Open(); err != nil {
		n.absent, n.reason = true, fmt.Sprintf("cannot load %s: %v", path, err)
		return n
	}
	defer func() { _ = probe.Close() }()
	exported := make(map[string]bool, len(nvmlSymbols))
	for _, s := range nvmlSymbols {
		exported[s] = probe.Lookup(s) == nil
	}
	n.has = func(s string) bool { return exported[s] }
	if missing := n.missing(nvmlRequired...); missing != "" {
		n.absent, n.reason = true, fmt.Sprintf("%s lacks %s", path, missing)
	}
	return n
}

// nvmlCall names the library symbols behind one go-nvml call: go-nvml binds
// the first of them that the library exports (newest version first).
type nvmlCall []string

var (
	callInit          = nvmlCall{"nvmlInit_v2", "nvmlInit"}
	callShutdown      = nvmlCall{"nvmlShutdown"}
	callErrorString   = nvmlCall{"nvmlErrorString"}
	callCount         = nvmlCall{"nvmlDeviceGetCount_v2", "nvmlDeviceGetCount"}
	callHandle        = nvmlCall{"nvmlDeviceGetHandleByIndex_v2", "nvmlDeviceGetHandleByIndex"}
	callUUID          = nvmlCall{"nvmlDeviceGetUUID"}
	callName          = nvmlCall{"nvmlDeviceGetName"}
	callDriverVersion = nvmlCall{"nvmlSystemGetDriverVersion"}
	callMemory        = nvmlCall{"nvmlDeviceGetMemoryInfo"}
	callPCI           = nvmlCall{"nvmlDeviceGetPciInfo_v3", "nvmlDeviceGetPciInfo_v2", "nvmlDeviceGetPciInfo"}
	callCompute       = nvmlCall{"nvmlDeviceGetCudaComputeCapability"}
	callUtilization   = nvmlCall{"nvmlDeviceGetUtilizationRates"}
	callTemperature   = nvmlCall{"nvmlDeviceGetTemperature"}
	callPower         = nvmlCall{"nvmlDeviceGetPowerUsage"}
	callECC           = nvmlCall{"nvmlDeviceGetTotalEccErrors"}

	// nvmlRequired are the calls without which there is no discovery; the
	// others are optional and skipped (reported as missing) when absent.
	nvmlRequired = []nvmlCall{callInit, callShutdown, callErrorString, callCount, callHandle, callUUID, callName}
	nvmlOptional = []nvmlCall{callDriverVersion, callMemory, callPCI, callCompute, callUtilization, callTemperature, callPower, callECC}
	nvmlSymbols  = func() []string {
		var all []string
		for _, c := range append(append([]nvmlCall{}, nvmlRequired...), nvmlOptional...) {
			all = append(all, c...)
		}
		return all
	}()
)

// can reports whether the library exports a symbol behind call.
func (n *NVML) can(call nvmlCall) bool {
	if n.has == nil {
		return true
	}
	for _, s := range call {
		if n.has(s) {
			return true
		}
	}
	return false
}

// missing names the first of calls the library cannot serve, or "".
func (n *NVML) missing(calls ...nvmlCall) string {
	for _, c := range calls {
		if !n.can(c) {
			return c[0]
		}
	}
	return ""
}

var defaultNVML = NewNVML(nil)

// Discover lists the GPUs of this host through NVML. A host without the NVML
// library, with a library that lacks the functions discovery needs, or without
// GPUs returns an empty list and no error.
func Discover() ([]GPUInfo, error) { return defaultNVML.Discover() }

// Sample reads one health sample of every GPU (empty without NVML).
func Sample() ([]GPUMetrics, error) { return defaultNVML.Sample() }

// NVMLUnavailable says why this host's NVML serves no GPUs ("" when it is
// usable or not yet tried).
func NVMLUnavailable() string { return defaultNVML.Unavailable() }

// Unavailable says why NVML is absent, or "" when it is usable or untried.
func (n *NVML) Unavailable() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.reason
}

// init loads the library once; it reports false when there is none.
func (n *NVML) init() (bool, error) {
	if n.inited {
		return true, nil
	}
	if n.absent {
		return false, nil
	}
	switch r := n.lib.Init(); r {
	case nvml.SUCCESS:
		n.inited = true
		return true, nil
	case nvml.ERROR_LIBRARY_NOT_FOUND, nvml.ERROR_DRIVER_NOT_LOADED, nvml.ERROR_NO_PERMISSION:
		n.absent, n.reason = true, fmt.Sprintf("nvmlInit: %v", nvml.ErrorString(r))
		return false, nil
	default:
		return false, fmt.Errorf("%w: nvmlInit: %v", ErrNVML, nvml.ErrorString(r))
	}
}

// Close shuts NVML down if it was started; idempotent.
func (n *NVML) Close() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.inited {
		return nil
	}
	n.inited = false
	if r := n.lib.Shutdown(); r != nvml.SUCCESS {
		return fmt.Errorf("%w: nvmlShutdown: %v", ErrNVML, nvml.ErrorString(r))
	}
	return nil
}

func (n *NVML) devices() ([]nvml.Device, error) {
	ok, err := n.init()
	if err != nil || !ok {
		return nil, err
	}
	cnt, r := n.lib.DeviceGetCount()
	if r != nvml.SUCCESS {
		return nil, fmt.Errorf("%w: nvmlDeviceGetCount: %v", ErrNVML, nvml.ErrorString(r))
	}
	devs := make([]nvml.Device, 0, cnt)
	for i := 0; i < cnt; i++ {
		d, r := n.lib.DeviceGetHandleByIndex(i)
		if r != nvml.SUCCESS {
			return nil, fmt.Errorf("%w: nvmlDeviceGetHandleByIndex(%d): %v", ErrNVML, i, nvml.ErrorString(r))
		}
		devs = append(devs, d)
	}
	return devs, nil
}

// Discover lists the GPUs (see the package-level Discover).
func (n *NVML) Discover() ([]GPUInfo, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	devs, err := n.devices()
	if err != nil || len(devs) == 0 {
		return nil, err // no library loaded: call nothing else of it
	}
	var driver string
	if n.can(callDriverVersion) {
		driver, _ = n.lib.SystemGetDriverVersion()
	}
	out := make([]GPUInfo, 0, len(devs))
	for i, d := range devs {
		g := GPUInfo{Index: i, DriverVersion: driver}
		var r nvml.Return
		if g.UUID, r = d.GetUUID(); r != nvml.SUCCESS {
			return nil, fmt.Errorf("%w: GPU %d: nvmlDeviceGetUUID: %v", ErrNVML, i, nvml.ErrorString(r))
		}
		if g.Model, r = d.GetName(); r != nvml.SUCCESS {
			return nil, fmt.Errorf("%w: GPU %d: nvmlDeviceGetName: %v", ErrNVML, i, nvml.ErrorString(r))
		}
		if n.can(callMemory) {
			if m, r := d.GetMemoryInfo(); r == nvml.SUCCESS {
				g.MemoryBytes = m.Total
			}
		}
		if n.can(callPCI) {
			if p, r := d.GetPciInfo(); r == nvml.SUCCESS {
				g.PCIBusID = cString(p.BusIdLegacy[:])
			}
		}
		if n.can(callCompute) {
			if ma, mi, r := d.GetCudaComputeCapability(); r == nvml.SUCCESS {
				g.ComputeMajor, g.ComputeMinor = ma, mi
			}
		}
		out = append(out, g)
	}
	return out, nil
}

// Sample reads one health sample of every GPU (see the package-level Sample).
func (n *NVML) Sample() ([]GPUMetrics, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	devs, err := n.devices()
	if err != nil {
		return nil, err
	}
	out := make([]GPUMetrics, 0, len(devs))
	for i, d := range devs {
		m := GPUMetrics{Index: i, UtilizationGPU: -1, UtilizationMem: -1, TemperatureC: -1, PowerWatts: -1}
		var r nvml.Return
		if m.UUID, r = d.GetUUID(); r != nvml.SUCCESS {
			m.Missing = append(m.Missing, "uuid")
		}
		read := func(c nvmlCall, what string, f func() nvml.Return) {
			if !n.can(c) || f() != nvml.SUCCESS {
				m.Missing = append(m.Missing, what)
			}
		}
		read(callUtilization, "utilization", func() nvml.Return {
			u, r := d.GetUtilizationRates()
			if r == nvml.SUCCESS {
				m.UtilizationGPU, m.UtilizationMem = float64(u.Gpu), float64(u.Memory)
			}
			return r
		})
		read(callMemory, "memory", func() nvml.Return {
			mem, r := d.GetMemoryInfo()
			if r == nvml.SUCCESS {
				m.MemoryUsedBytes, m.MemoryFreeBytes = mem.Used, mem.Free
			}
			return r
		})
		read(callTemperature, "temperature", func() nvml.Return {
			t, r := d.GetTemperature(nvml.TEMPERATURE_GPU)
			if r == nvml.SUCCESS {
				m.TemperatureC = float64(t)
			}
			return r
		})
		read(callPower, "power", func() nvml.Return {
			p, r := d.GetPowerUsage()
			if r == nvml.SUCCESS {
				m.PowerWatts = float64(p) / 1000
			}
			return r
		})
		read(callECC, "ecc_corrected", func() (r nvml.Return) {
			m.ECCCorrected, r = d.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC)
			return r
		})
		read(callECC, "ecc_uncorrected", func() (r nvml.Return) {
			m.ECCUncorrected, r = d.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC)
			return r
		})
		out = append(out, m)
	}
	return out, nil
}

func cString[T ~int8 | ~uint8](b []T) string {
	s := make([]byte, 0, len(b))
	for _, c := range b {
		if c == 0 {
			break
		}
		s = append(s, byte(c))
	}
	return string(s)
}
