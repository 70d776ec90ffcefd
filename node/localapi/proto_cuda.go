package localapi

import (
	"encoding/binary"
	"fmt"
)

// CUDA tensors (protocol version 1, an optional message: an agent built
// without CUDA answers it with StatusUnsupported, and the client stages
// its CUDA tensors through host memory instead).
//
//	REGISTER_CUDA (6)  u8 type, u8 what, 6×0, u64 id, u64 size,
//	                   16 bytes device UUID (cuDeviceGetUuid), 64 bytes handle
//
// what 1 (memory): handle is a CUDA IPC memory handle (cuIpcGetMemHandle) of
// a whole device allocation of at least size bytes on the device; id
// becomes a region id, and operations name its elements with byte offsets
// from the allocation's base, like those of a shared-memory region. The
// agent opens the handle once (cuIpcOpenMemHandle) and checks the size
// against the allocation the driver reports; UNREGISTER (or the end of the
// connection) closes it. The client keeps the allocation alive meanwhile.
//
// what 2 (event): handle is a CUDA IPC event handle (cuIpcGetEventHandle)
// of an event on the device; id names it. Before every operation on that
// device's regions the agent waits for the event's latest record, so the
// client records it on its stream after the kernels that produce the
// operation's input and before it sends the operation. A second event for
// the same device replaces the first.
//
// Both are answered by REGISTERED with the id. An operation on device
// regions is answered by DONE once the agent's device work on them has
// finished, so the client may read the result on any stream.
const (
	MsgRegisterCUDA = 6

	CUDAMemory = 1
	CUDAEvent  = 2

	// StatusUnsupported: the agent cannot do what was asked (REGISTER_CUDA
	// on an agent built without CUDA, or a device it does not have); the
	// connection stays usable.
	StatusUnsupported = 5

	registerCUDALen = 24 + 16 + CUDAHandleSize
	// CUDAHandleSize is the size of a CUDA IPC memory or event handle.
	CUDAHandleSize = 64
)

// RegisterCUDA announces device memory or an event by CUDA IPC handle.
type RegisterCUDA struct {
	What   uint8 // CUDAMemory or CUDAEvent
	ID     uint64
	Size   uint64 // bytes (memory); 0 for an event
	Device [16]byte
	Handle [CUDAHandleSize]byte
}

func decodeRegisterCUDA(b []byte) (Request, error) {
	if len(b) != registerCUDALen {
		return Request{}, fmt.Errorf("%w: register_cuda of %d bytes, want %d", ErrProtocol, len(b), registerCUDALen)
	}
	r := &RegisterCUDA{What: b[1], ID: binary.LittleEndian.Uint64(b[8:]), Size: binary.LittleEndian.Uint64(b[16:])}
	if r.What != CUDAMemory && r.What != CUDAEvent {
		return Request{}, fmt.Errorf("%w: register_cuda of kind %d (1 memory, 2 event)", ErrProtocol, r.What)
	}
	copy(r.Device[:], b[24:40])
	copy(r.Handle[:], b[40:])
	return Request{RegisterCUDA: r}, nil
}

// EncodeRegisterCUDA encodes a REGISTER_CUDA (clients and tests).
func EncodeRegisterCUDA(r *RegisterCUDA) []byte {
	b := make([]byte, registerCUDALen)
	b[0], b[1] = MsgRegisterCUDA, r.What
	binary.LittleEndian.PutUint64(b[8:], r.ID)
	binary.LittleEndian.PutUint64(b[16:], r.Size)
	copy(b[24:40], r.Device[:])
	copy(b[40:], r.Handle[:])
	return b
}

// FormatGPUUUID formats a device UUID as the driver tools do
// ("GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx").
func FormatGPUUUID(u [16]byte) string {
	return fmt.Sprintf("GPU-%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}
