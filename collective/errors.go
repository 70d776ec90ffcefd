package collective

import "errors"

// Errors returned by the package. Operations wrap them with details; test
// with errors.Is.
var (
	// ErrBadDType: an element type that is not supported.
	ErrBadDType = errors.New("collective: unsupported dtype")
	// ErrBadOp: a reduction operator that is not supported.
	ErrBadOp = errors.New("collective: unsupported reduction op")
	// ErrBadArgument: a buffer, rank or size argument that cannot work.
	ErrBadArgument = errors.New("collective: bad argument")
	// ErrMismatch: ranks called different operations (or the same operation
	// with different dtype, count, op or root). Every rank of the group gets
	// an error wrapping it.
	ErrMismatch = errors.New("collective: ranks disagree")
	// ErrTimeout: no progress within Config.Timeout (a peer is dead, hung or
	// unreachable).
	ErrTimeout = errors.New("collective: timed out waiting for peers")
	// ErrPeerFailed: a peer's link broke or the peer aborted the group.
	ErrPeerFailed = errors.New("collective: peer failed")
	// ErrAborted: the communicator failed earlier and can no longer be used;
	// create a new one (next generation).
	ErrAborted = errors.New("collective: communicator aborted")
	// ErrClosed: the communicator or transport was closed.
	ErrClosed = errors.New("collective: closed")
	// ErrStaleGeneration: traffic for an older generation of a job than one
	// this node already serves.
	ErrStaleGeneration = errors.New("collective: stale generation")
	// ErrBadFrame: a frame that does not decode.
	ErrBadFrame = errors.New("collective: bad frame")
	// ErrCheckFailed: a built-in job found wrong values.
	ErrCheckFailed = errors.New("collective: result check failed")
	// ErrNoDevice: a device (for example "cuda") with no registered backend.
	ErrNoDevice = errors.New("collective: device backend not available")
)
