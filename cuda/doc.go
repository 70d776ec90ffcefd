// Package cuda is the GPU boundary of gpumesh: devices, contexts pinned to OS
// threads, device and pinned host buffers, streams, events, embedded PTX
// kernels, and NVML discovery. The CUDA data path is built only with the
// "cuda" build tag; without it the package builds and reports no devices.
package cuda
