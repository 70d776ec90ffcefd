//go:build !cgo

package cuda

// Discover reports no GPUs in a build without cgo (NVML cannot be loaded).
func Discover() ([]GPUInfo, error) { return nil, nil }

// Sample reports no GPUs in a build without cgo.
func Sample() ([]GPUMetrics, error) { return nil, nil }
