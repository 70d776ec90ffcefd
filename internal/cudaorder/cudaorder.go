// Package cudaorder makes the CUDA driver number devices by PCI bus, as
// NVML does, unless the environment already says how.
//
// The driver reads CUDA_DEVICE_ORDER when it is initialised, and
// gorgonia.org/cu initialises it in its package init: this package must be
// initialised before that. Go initialises packages in dependency order and,
// among packages ready at the same step, by import path; this package
// depends on os alone, so it is ready no later than cu, and
// "github.com/gpumesh/..." sorts before "gorgonia.org/...". The cuda
// package imports it (cuda build). With cgo, os.Setenv also sets the C
// environment the driver reads.
//
// Why: placement and CUDA_VISIBLE_DEVICES name GPUs by NVML index (PCI bus
// order); CUDA's default order is fastest first, which differs on a
// machine with mixed GPU models, so the agent's own device k would not be
// the GPU the scheduler gave it. Ranks get the same variable in their
// environment (node/driver).
package cudaorder

import "os"

// Var and Value are the variable and the order set.
const (
	Var   = "CUDA_DEVICE_ORDER"
	Value = "PCI_BUS_ID"
)

func init() {
	if _, ok := os.LookupEnv(Var); !ok {
		_ = os.Setenv(Var, Value)
	}
}
