//go:build cuda

package node

// CUDABuild reports whether this binary has the CUDA data path.
const CUDABuild = true
