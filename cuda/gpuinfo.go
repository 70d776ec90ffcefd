package cuda

// GPUInfo is what a node gossips about each GPU (static facts).
type GPUInfo struct {
	Index         int    `json:"index"`
	UUID          string `json:"uuid"`
	Model         string `json:"model"`
	MemoryBytes   uint64 `json:"memory_bytes"`
	PCIBusID      string `json:"pci_bus_id,omitempty"`
	ComputeMajor  int    `json:"compute_major,omitempty"`
	ComputeMinor  int    `json:"compute_minor,omitempty"`
	DriverVersion string `json:"driver_version,omitempty"`
}

// GPUMetrics is one health sample of one GPU. A field NVML could not read
// stays at -1 (or 0 for counters) and is named in Missing.
type GPUMetrics struct {
	Index           int     `json:"index"`
	UUID            string  `json:"uuid"`
	UtilizationGPU  float64 `json:"utilization_gpu"`    // percent of time a kernel ran, 0..100
	UtilizationMem  float64 `json:"utilization_memory"` // percent of time memory was read or written
	MemoryUsedBytes uint64  `json:"memory_used_bytes"`
	MemoryFreeBytes uint64  `json:"memory_free_bytes"`
	TemperatureC    float64 `json:"temperature_c"`
	PowerWatts      float64 `json:"power_watts"`
	// ECC error counts since the driver loaded (volatile): corrected and
	// uncorrected. Zero where ECC is off or unsupported.
	ECCCorrected   uint64   `json:"ecc_corrected"`
	ECCUncorrected uint64   `json:"ecc_uncorrected"`
	Missing        []string `json:"missing,omitempty"`
}
