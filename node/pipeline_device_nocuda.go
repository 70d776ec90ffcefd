//go:build !cuda

package node

import "github.com/gpumesh/gpumesh/collective/pipeline"

// pipelineDevice is where a pipeline stage computes: the CPU in a build
// without CUDA (a spec asking for cuda fails with the pipeline's
// ErrNoDevice).
func pipelineDevice(want string, gpu int) (pipeline.Device, error) { return nil, nil }
