// Package cuda is the GPU boundary of gpumesh: devices, contexts pinned to OS
// threads, device and pinned host buffers, streams, events, embedded PTX
// kernels, and NVML discovery.
//
// Two builds:
//
//   - Default build: no cgo of ours and no import of gorgonia.org/cu. Open
//     returns ErrNotBuilt and Available reports false. NVML discovery
//     (Discover, Sample) works in both builds when cgo is enabled: go-nvml
//     loads libnvidia-ml.so.1 at run time, and a host without it has no GPUs
//     (an empty list, no error, no crash).
//   - "cuda" build tag: the real data path through gorgonia.org/cu plus one
//     small cgo file of ours for the driver calls cu lacks (pinned host
//     allocation, host registration, IPC handles). gorgonia.org/cu calls
//     cuInit in its package init and exits the process when that fails, so a
//     cuda build runs only where a GPU driver works. Before that init,
//     internal/cudaorder sets CUDA_DEVICE_ORDER=PCI_BUS_ID (unless set), so
//     device ordinals here are NVML's, the ones placement hands out.
//
// Threading contract: a CUDA context is current per OS thread. Every method
// here that calls the driver runs inside Device.Do, which locks the calling
// goroutine to its OS thread, makes the device's primary context current, runs
// the function and unlocks. Methods are safe for concurrent use unless their
// doc says otherwise; operations on one Stream are ordered. Every driver call
// costs microseconds of host time and the driver serializes concurrent
// callers: measured on an H200, an upload plus a kernel launch plus an event
// record take about 12 us, and 16 goroutines doing the same on one device do
// not go faster in total (collective/cudabuf's staging microbenchmark), so
// hot paths should make few calls per chunk. An Issuer (Device.NewIssuer)
// is one thread per device that runs such calls for many goroutines, in
// the order each submitted them, so that only that thread calls into the
// driver for them.
//
// Pinned host memory (HostPool, PinnedAlloc) is mapped into every device at
// its host address (unified addressing): MappedHost gives the address a
// kernel can read it at, without a copy.
//
// Kernels live in kernels/kernels.cu, are compiled to PTX for compute_75 by
// `go generate ./cuda/` (nvcc), committed, embedded with go:embed and
// JIT-compiled by the driver (cuModuleLoadData) when a device is opened, so
// the binary depends only on libcuda.so.1 and runs on sm_75 and newer.
//
// Typical use (cuda build):
//
//	rt, err := cuda.Open(cuda.DefaultConfig())
//	if err != nil { ... }           // ErrNotBuilt, ErrNoDevice, driver errors
//	defer rt.Close()
//	dev := rt.Devices()[0]
//	mem, _ := dev.Alloc(1 << 20)
//	s, _ := dev.NewStream()
//	buf, _ := rt.Pool().Get(ctx)    // pinned host slot
//	_ = s.CopyDtoH(buf.Bytes()[:1<<20], mem.Ptr())
//	_ = s.Synchronize()
package cuda

//go:generate nvcc -ptx -arch=compute_75 -O3 -o kernels/kernels.ptx kernels/kernels.cu
