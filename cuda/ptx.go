package cuda

import _ "embed"

// kernelsPTX is kernels/kernels.cu compiled for compute_75 by go generate;
// the cuda build JIT-loads it into every device.
//
//go:embed kernels/kernels.ptx
var kernelsPTX string
