//go:build cuda

package main

import (
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/collective/cudabuf"
	"github.com/gpumesh/gpumesh/cuda"
)

// The cuda build registers the "cuda" device for the collectives: the
// allreduce job with device cuda (or auto on a GPU host) and
// `gpumesh bench allreduce --device cuda` allocate their buffers on GPUs.
// Registration is lazy: no CUDA work happens until the first buffer.
func init() {
	cudabuf.Register()
	setCUDAIssuer = func(spin time.Duration) {
		ic := cuda.DefaultIssuerConfig()
		ic.Spin = spin
		if spin == 0 {
			ic.WaitSpin = 0
		}
		collective.RegisterDevice(cudabuf.NewDevice(cuda.DefaultConfig(), cudabuf.WithIssuingThread(true, ic)))
	}
}
