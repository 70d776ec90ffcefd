//go:build cgo

package cuda

import (
	"fmt"
	"sync"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// NVML reads GPU facts and health through an nvml.Interface: the real
// library (loaded at run time with dlopen) or a test double such as go-nvml's
// mock package. Safe for concurrent use.
type NVML struct {
	lib nvml.Interface

	mu     sync.Mutex
	inited bool
	absent bool
}

// NewNVML wraps lib; nil means the system's libnvidia-ml.so.1.
func NewNVML(lib nvml.Interface) *NVML {
	if lib == nil {
		lib = nvml.New()
	}
	return &NVML{lib: lib}
}

var defaultNVML = NewNVML(nil)

// Discover lists the GPUs of this host through NVML. A host without the NVML
// library or without GPUs returns an empty list and no error.
func Discover() ([]GPUInfo, error) { return defaultNVML.Discover() }

// Sample reads one health sample of every GPU (empty without NVML).
func Sample() ([]GPUMetrics, error) { return defaultNVML.Sample() }

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
		n.absent = true
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
	if err != nil {
		return nil, err
	}
	driver, _ := n.lib.SystemGetDriverVersion()
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
		if m, r := d.GetMemoryInfo(); r == nvml.SUCCESS {
			g.MemoryBytes = m.Total
		}
		if p, r := d.GetPciInfo(); r == nvml.SUCCESS {
			g.PCIBusID = cString(p.BusIdLegacy[:])
		}
		if ma, mi, r := d.GetCudaComputeCapability(); r == nvml.SUCCESS {
			g.ComputeMajor, g.ComputeMinor = ma, mi
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
		if u, r := d.GetUtilizationRates(); r == nvml.SUCCESS {
			m.UtilizationGPU, m.UtilizationMem = float64(u.Gpu), float64(u.Memory)
		} else {
			m.Missing = append(m.Missing, "utilization")
		}
		if mem, r := d.GetMemoryInfo(); r == nvml.SUCCESS {
			m.MemoryUsedBytes, m.MemoryFreeBytes = mem.Used, mem.Free
		} else {
			m.Missing = append(m.Missing, "memory")
		}
		if t, r := d.GetTemperature(nvml.TEMPERATURE_GPU); r == nvml.SUCCESS {
			m.TemperatureC = float64(t)
		} else {
			m.Missing = append(m.Missing, "temperature")
		}
		if p, r := d.GetPowerUsage(); r == nvml.SUCCESS {
			m.PowerWatts = float64(p) / 1000
		} else {
			m.Missing = append(m.Missing, "power")
		}
		if c, r := d.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_CORRECTED, nvml.VOLATILE_ECC); r == nvml.SUCCESS {
			m.ECCCorrected = c
		} else {
			m.Missing = append(m.Missing, "ecc_corrected")
		}
		if c, r := d.GetTotalEccErrors(nvml.MEMORY_ERROR_TYPE_UNCORRECTED, nvml.VOLATILE_ECC); r == nvml.SUCCESS {
			m.ECCUncorrected = c
		} else {
			m.Missing = append(m.Missing, "ecc_uncorrected")
		}
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
