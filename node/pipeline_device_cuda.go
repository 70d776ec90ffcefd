//go:build cuda

package node

import (
	"fmt"
	"sync"

	"github.com/gpumesh/gpumesh/collective/pipeline"
	"github.com/gpumesh/gpumesh/cuda"
)

var (
	cudaOnce sync.Once
	cudaRT   *cuda.Runtime
	cudaErr  error
)

// pipelineDevice gives a pipeline stage that asks for cuda (or auto, where
// GPUs exist) GPU gpu (see deviceIndex) modulo the GPUs there are.
func pipelineDevice(want string, gpu int) (pipeline.Device, error) {
	if want != "cuda" && want != "auto" {
		return nil, nil
	}
	cudaOnce.Do(func() { cudaRT, cudaErr = cuda.Open(cuda.DefaultConfig()) })
	if cudaErr != nil || cudaRT == nil || len(cudaRT.Devices()) == 0 {
		if want == "auto" {
			return nil, nil
		}
		return nil, fmt.Errorf("pipeline on cuda: no usable GPU: %v", cudaErr)
	}
	devs := cudaRT.Devices()
	d, err := pipeline.NewCUDADevice(devs[gpu%len(devs)])
	if err != nil {
		return nil, err
	}
	return d, nil
}
