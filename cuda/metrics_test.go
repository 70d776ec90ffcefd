package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

func TestCollectorExportsSamples(t *testing.T) {
	c := NewCollector(func() ([]GPUMetrics, error) {
		return []GPUMetrics{
			{Index: 0, UUID: "GPU-a", UtilizationGPU: 50, UtilizationMem: 10, MemoryUsedBytes: 1 << 30, MemoryFreeBytes: 2 << 30,
				TemperatureC: 60, PowerWatts: 300, ECCCorrected: 2, ECCUncorrected: 1},
			{Index: 1, UUID: "GPU-b", UtilizationGPU: -1, UtilizationMem: -1, TemperatureC: -1, PowerWatts: -1,
				Missing: []string{"utilization", "temperature", "power", "ecc_corrected", "ecc_uncorrected"}},
		}, nil
	})
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(c)
	want := `
# HELP gpumesh_gpu_ecc_errors_total Volatile ECC error count since the driver loaded, by type (corrected, uncorrected).
# TYPE gpumesh_gpu_ecc_errors_total counter
gpumesh_gpu_ecc_errors_total{gpu="0",type="corrected",uuid="GPU-a"} 2
gpumesh_gpu_ecc_errors_total{gpu="0",type="uncorrected",uuid="GPU-a"} 1
# HELP gpumesh_gpu_utilization_ratio Fraction of the last sample period a kernel ran (NVML), 0..1.
# TYPE gpumesh_gpu_utilization_ratio gauge
gpumesh_gpu_utilization_ratio{gpu="0",uuid="GPU-a"} 0.5
# HELP gpumesh_gpu_memory_used_bytes Device memory in use.
# TYPE gpumesh_gpu_memory_used_bytes gauge
gpumesh_gpu_memory_used_bytes{gpu="0",uuid="GPU-a"} 1.073741824e+09
gpumesh_gpu_memory_used_bytes{gpu="1",uuid="GPU-b"} 0
# HELP gpumesh_gpu_nvml_up 1 when the last NVML sample succeeded, 0 when it failed.
# TYPE gpumesh_gpu_nvml_up gauge
gpumesh_gpu_nvml_up 1
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want),
		"gpumesh_gpu_ecc_errors_total", "gpumesh_gpu_utilization_ratio", "gpumesh_gpu_memory_used_bytes", "gpumesh_gpu_nvml_up"); err != nil {
		t.Fatal(err)
	}
	if n := testutil.CollectAndCount(c); n != 1+6+2+2 {
		t.Fatalf("%d metrics, want 11", n)
	}
}

func TestCollectorReportsNVMLFailure(t *testing.T) {
	c := NewCollector(func() ([]GPUMetrics, error) { return nil, errors.New("boom") })
	if n := testutil.CollectAndCount(c); n != 1 {
		t.Fatalf("%d metrics on failure, want only nvml_up", n)
	}
	if v := testutil.ToFloat64(c); v != 0 {
		t.Fatalf("nvml_up = %v, want 0", v)
	}
}

// The GPU families pass the client library's linter (promtool's rules).
func TestCollectorLints(t *testing.T) {
	c := NewCollector(func() ([]GPUMetrics, error) {
		return []GPUMetrics{{Index: 0, UUID: "GPU-a", UtilizationGPU: 50, UtilizationMem: 10, MemoryUsedBytes: 1 << 30,
			MemoryFreeBytes: 2 << 30, TemperatureC: 60, PowerWatts: 300, ECCCorrected: 2, ECCUncorrected: 1}}, nil
	})
	problems, err := testutil.CollectAndLint(c)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}
