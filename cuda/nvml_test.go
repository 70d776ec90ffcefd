//go:build cgo

package cuda

import (
	"errors"
	"testing"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
)

func fakeDevice(i int) *mock.Device {
	return &mock.Device{
		GetUUIDFunc: func() (string, nvml.Return) { return []string{"GPU-aaa", "GPU-bbb"}[i], nvml.SUCCESS },
		GetNameFunc: func() (string, nvml.Return) { return "NVIDIA H100 80GB HBM3", nvml.SUCCESS },
		GetMemoryInfoFunc: func() (nvml.Memory, nvml.Return) {
			return nvml.Memory{Total: 80 << 30, Used: uint64(i+1) << 30, Free: 80<<30 - uint64(i+1)<<30}, nvml.SUCCESS
		},
		GetPciInfoFunc: func() (nvml.PciInfo, nvml.Return) {
			var p nvml.PciInfo
			copy(p.BusIdLegacy[:], []int8{'0', '0', '0', '0', ':', '1', '8', ':', '0', '0', '.', '0'})
			return p, nvml.SUCCESS
		},
		GetCudaComputeCapabilityFunc: func() (int, int, nvml.Return) { return 9, 0, nvml.SUCCESS },
		GetUtilizationRatesFunc: func() (nvml.Utilization, nvml.Return) {
			return nvml.Utilization{Gpu: 87, Memory: 40}, nvml.SUCCESS
		},
		GetTemperatureFunc: func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 61, nvml.SUCCESS },
		GetPowerUsageFunc:  func() (uint32, nvml.Return) { return 350500, nvml.SUCCESS },
		GetTotalEccErrorsFunc: func(t nvml.MemoryErrorType, _ nvml.EccCounterType) (uint64, nvml.Return) {
			if i == 1 {
				return 0, nvml.ERROR_NOT_SUPPORTED
			}
			if t == nvml.MEMORY_ERROR_TYPE_CORRECTED {
				return 3, nvml.SUCCESS
			}
			return 1, nvml.SUCCESS
		},
	}
}

func fakeLib(initRet nvml.Return) (*mock.Interface, *int) {
	shutdowns := 0
	devs := []*mock.Device{fakeDevice(0), fakeDevice(1)}
	return &mock.Interface{
		InitFunc:                   func() nvml.Return { return initRet },
		ShutdownFunc:               func() nvml.Return { shutdowns++; return nvml.SUCCESS },
		DeviceGetCountFunc:         func() (int, nvml.Return) { return 2, nvml.SUCCESS },
		DeviceGetHandleByIndexFunc: func(i int) (nvml.Device, nvml.Return) { return devs[i], nvml.SUCCESS },
		SystemGetDriverVersionFunc: func() (string, nvml.Return) { return "580.159.04", nvml.SUCCESS },
	}, &shutdowns
}

func TestNVMLDiscoverAndSample(t *testing.T) {
	lib, shutdowns := fakeLib(nvml.SUCCESS)
	n := NewNVML(lib)
	gpus, err := n.Discover()
	if err != nil {
		t.Fatal(err)
	}
	if len(gpus) != 2 || gpus[1].UUID != "GPU-bbb" || gpus[0].Model != "NVIDIA H100 80GB HBM3" ||
		gpus[0].MemoryBytes != 80<<30 || gpus[0].PCIBusID != "0000:18:00.0" || gpus[0].ComputeMajor != 9 ||
		gpus[0].DriverVersion != "580.159.04" {
		t.Fatalf("Discover: %+v", gpus)
	}
	ms, err := n.Sample()
	if err != nil {
		t.Fatal(err)
	}
	if len(ms) != 2 {
		t.Fatalf("Sample: %d GPUs", len(ms))
	}
	m0, m1 := ms[0], ms[1]
	if m0.UtilizationGPU != 87 || m0.UtilizationMem != 40 || m0.TemperatureC != 61 || m0.PowerWatts != 350.5 ||
		m0.MemoryUsedBytes != 1<<30 || m0.ECCCorrected != 3 || m0.ECCUncorrected != 1 || len(m0.Missing) != 0 {
		t.Errorf("GPU 0 sample: %+v", m0)
	}
	if m1.MemoryUsedBytes != 2<<30 || len(m1.Missing) != 2 || m1.Missing[0] != "ecc_corrected" {
		t.Errorf("GPU 1 sample (ECC unsupported): %+v", m1)
	}
	if err := n.Close(); err != nil || *shutdowns != 1 {
		t.Fatalf("Close: %v, %d shutdowns", err, *shutdowns)
	}
	if err := n.Close(); err != nil || *shutdowns != 1 {
		t.Fatalf("second Close: %v, %d shutdowns", err, *shutdowns)
	}
}

func TestNVMLMissingLibraryMeansNoGPUs(t *testing.T) {
	lib, _ := fakeLib(nvml.ERROR_LIBRARY_NOT_FOUND)
	n := NewNVML(lib)
	for i := 0; i < 2; i++ {
		gpus, err := n.Discover()
		if err != nil || len(gpus) != 0 {
			t.Fatalf("Discover without NVML: %v, %v", gpus, err)
		}
		ms, err := n.Sample()
		if err != nil || len(ms) != 0 {
			t.Fatalf("Sample without NVML: %v, %v", ms, err)
		}
	}
	if len(lib.InitCalls()) != 1 {
		t.Errorf("Init tried %d times, want once", len(lib.InitCalls()))
	}
}

func TestNVMLInitFailureIsAnError(t *testing.T) {
	lib, _ := fakeLib(nvml.ERROR_UNKNOWN)
	if _, err := NewNVML(lib).Discover(); !errors.Is(err, ErrNVML) {
		t.Fatalf("err %v, want ErrNVML", err)
	}
}

// The real library: on a host without it, no GPUs and no error; on a GPU
// host, at least one GPU with a UUID.
func TestSystemNVMLDoesNotCrash(t *testing.T) {
	gpus, err := Discover()
	if err != nil {
		t.Fatalf("Discover: %v", err)
	}
	for _, g := range gpus {
		if g.UUID == "" || g.Model == "" {
			t.Errorf("GPU without UUID or model: %+v", g)
		}
	}
	t.Logf("%d GPU(s): %+v", len(gpus), gpus)
	if _, err := Sample(); err != nil {
		t.Fatalf("Sample: %v", err)
	}
}
