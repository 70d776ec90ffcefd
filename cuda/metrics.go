package cuda

import (
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// Collector exports GPU health (Sample) as Prometheus metrics, read at
// scrape time. Register it on the node's registry:
//
//	reg.MustRegister(cuda.NewCollector(nil))
//
// A host without GPUs or NVML exports nothing. Safe for concurrent scrapes.
type Collector struct {
	sample func() ([]GPUMetrics, error)

	util, memUtil, memUsed, memFree, temp, power, ecc, up *prometheus.Desc
}

var _ prometheus.Collector = (*Collector)(nil)

// NewCollector builds a collector over sample; nil means the package-level
// Sample (the system's NVML).
func NewCollector(sample func() ([]GPUMetrics, error)) *Collector {
	if sample == nil {
		sample = Sample
	}
	l := []string{"gpu", "uuid"}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("gpumesh_gpu_"+name, help, labels, nil)
	}
	return &Collector{
		sample:  sample,
		util:    d("utilization_ratio", "Fraction of the last sample period a kernel ran (NVML), 0..1.", l...),
		memUtil: d("memory_utilization_ratio", "Fraction of the last sample period device memory was read or written, 0..1.", l...),
		memUsed: d("memory_used_bytes", "Device memory in use.", l...),
		memFree: d("memory_free_bytes", "Device memory free.", l...),
		temp:    d("temperature_celsius", "GPU core temperature.", l...),
		power:   d("power_watts", "Board power draw.", l...),
		ecc:     d("ecc_errors_total", "Volatile ECC error count since the driver loaded, by type (corrected, uncorrected).", "gpu", "uuid", "type"),
		up:      d("nvml_up", "1 when the last NVML sample succeeded, 0 when it failed."),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.util, c.memUtil, c.memUsed, c.memFree, c.temp, c.power, c.ecc, c.up} {
		ch <- d
	}
}

// Collect implements prometheus.Collector: one NVML sample per scrape. Values
// NVML could not read are left out.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	ms, err := c.sample()
	if err != nil {
		ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 0)
		return
	}
	ch <- prometheus.MustNewConstMetric(c.up, prometheus.GaugeValue, 1)
	for _, m := range ms {
		g := strconv.Itoa(m.Index)
		gauge := func(d *prometheus.Desc, v float64, ok bool) {
			if ok {
				ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, g, m.UUID)
			}
		}
		gauge(c.util, m.UtilizationGPU/100, m.UtilizationGPU >= 0)
		gauge(c.memUtil, m.UtilizationMem/100, m.UtilizationMem >= 0)
		gauge(c.memUsed, float64(m.MemoryUsedBytes), !missing(m, "memory"))
		gauge(c.memFree, float64(m.MemoryFreeBytes), !missing(m, "memory"))
		gauge(c.temp, m.TemperatureC, m.TemperatureC >= 0)
		gauge(c.power, m.PowerWatts, m.PowerWatts >= 0)
		if !missing(m, "ecc_corrected") {
			ch <- prometheus.MustNewConstMetric(c.ecc, prometheus.CounterValue, float64(m.ECCCorrected), g, m.UUID, "corrected")
		}
		if !missing(m, "ecc_uncorrected") {
			ch <- prometheus.MustNewConstMetric(c.ecc, prometheus.CounterValue, float64(m.ECCUncorrected), g, m.UUID, "uncorrected")
		}
	}
}

func missing(m GPUMetrics, field string) bool {
	for _, f := range m.Missing {
		if f == field {
			return true
		}
	}
	return false
}
