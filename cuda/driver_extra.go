//go:build cuda

package cuda

// The few driver calls gorgonia.org/cu does not wrap: pinned host
// allocation, host registration (for shared memory between processes) and
// IPC handles for device memory. Each returns a Go error naming the call.

/*
#cgo LDFLAGS: -lcuda
#include <cuda.h>
#include <string.h>

static CUresult gm_memHostAlloc(void **p, size_t bytes, unsigned int flags) {
	return cuMemHostAlloc(p, bytes, flags);
}
static CUresult gm_ipcGetMemHandle(void *out, CUdeviceptr p) {
	CUipcMemHandle h;
	CUresult r = cuIpcGetMemHandle(&h, p);
	if (r == CUDA_SUCCESS) memcpy(out, &h, sizeof(h));
	return r;
}
static CUresult gm_ipcOpenMemHandle(CUdeviceptr *p, const void *in) {
	CUipcMemHandle h;
	memcpy(&h, in, sizeof(h));
	return cuIpcOpenMemHandle(p, h, CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS);
}
static CUresult gm_ipcGetEventHandle(void *out, CUevent e) {
	CUipcEventHandle h;
	CUresult r = cuIpcGetEventHandle(&h, e);
	if (r == CUDA_SUCCESS) memcpy(out, &h, sizeof(h));
	return r;
}
static CUresult gm_ipcOpenEventHandle(CUevent *e, const void *in) {
	CUipcEventHandle h;
	memcpy(&h, in, sizeof(h));
	return cuIpcOpenEventHandle(e, h);
}
*/
import "C"

import (
	"fmt"
	"unsafe"
)

// IPCHandleSize is the size of a device memory IPC handle.
const IPCHandleSize = C.CU_IPC_HANDLE_SIZE

// IPCHandle names device memory for another process on the same host.
type IPCHandle [IPCHandleSize]byte

func driverErr(r C.CUresult, call string) error {
	if r == C.CUDA_SUCCESS {
		return nil
	}
	var name *C.char
	if C.cuGetErrorName(r, &name) != C.CUDA_SUCCESS || name == nil {
		return fmt.Errorf("cuda: %s failed with CUresult %d", call, int(r))
	}
	return fmt.Errorf("cuda: %s failed: %s (%d)", call, C.GoString(name), int(r))
}

// memHostAlloc allocates portable pinned host memory (usable by every
// context). A context must be current.
func memHostAlloc(bytes int) (unsafe.Pointer, error) {
	var p unsafe.Pointer
	r := C.gm_memHostAlloc(&p, C.size_t(bytes), C.CU_MEMHOSTALLOC_PORTABLE)
	return p, driverErr(r, fmt.Sprintf("cuMemHostAlloc(%d bytes)", bytes))
}

func memFreeHost(p unsafe.Pointer) error {
	return driverErr(C.cuMemFreeHost(p), "cuMemFreeHost")
}

// memHostRegister page-locks existing host memory (for example a shared
// memory mapping) for every context.
func memHostRegister(p unsafe.Pointer, bytes int) error {
	return driverErr(C.cuMemHostRegister(p, C.size_t(bytes), C.CU_MEMHOSTREGISTER_PORTABLE), "cuMemHostRegister")
}

func memHostUnregister(p unsafe.Pointer) error {
	return driverErr(C.cuMemHostUnregister(p), "cuMemHostUnregister")
}

func ipcGetMemHandle(p DevPtr) (IPCHandle, error) {
	var h IPCHandle
	r := C.gm_ipcGetMemHandle(unsafe.Pointer(&h[0]), C.CUdeviceptr(p))
	return h, driverErr(r, "cuIpcGetMemHandle")
}

func ipcOpenMemHandle(h IPCHandle) (DevPtr, error) {
	var p C.CUdeviceptr
	r := C.gm_ipcOpenMemHandle(&p, unsafe.Pointer(&h[0]))
	return DevPtr(p), driverErr(r, "cuIpcOpenMemHandle")
}

func ipcCloseMemHandle(p DevPtr) error {
	return driverErr(C.cuIpcCloseMemHandle(C.CUdeviceptr(p)), "cuIpcCloseMemHandle")
}

// ipcGetEventHandle exports an event created with the interprocess flag.
// ev is the raw CUevent (gorgonia.org/cu's Event holds exactly that).
func ipcGetEventHandle(ev unsafe.Pointer) (IPCHandle, error) {
	var h IPCHandle
	r := C.gm_ipcGetEventHandle(unsafe.Pointer(&h[0]), *(*C.CUevent)(ev))
	return h, driverErr(r, "cuIpcGetEventHandle")
}

// ipcOpenEventHandle opens another process's event and returns the raw
// CUevent.
func ipcOpenEventHandle(h IPCHandle) (unsafe.Pointer, error) {
	var e C.CUevent
	r := C.gm_ipcOpenEventHandle(&e, unsafe.Pointer(&h[0]))
	return unsafe.Pointer(e), driverErr(r, "cuIpcOpenEventHandle")
}
