package localapi

import "errors"

// Errors of the package; test with errors.Is.
var (
	// ErrProtocol: a packet that does not decode.
	ErrProtocol = errors.New("localapi: protocol error")
	// ErrDenied: a hello that names a rank this agent does not run, with a
	// wrong secret, or for a generation that is not current.
	ErrDenied = errors.New("localapi: denied")
	// ErrBadRegion: a region descriptor that is missing, not a sealed memfd,
	// or smaller than announced; or a buffer outside its region.
	ErrBadRegion = errors.New("localapi: bad shared-memory region")
	// ErrBadConfig: an invalid server configuration.
	ErrBadConfig = errors.New("localapi: bad config")
	// ErrClosed: the server was closed.
	ErrClosed = errors.New("localapi: closed")
	// ErrUnsupportedOS: Listen on a system other than Linux (the local API
	// needs SOCK_SEQPACKET sockets and sealed memfds).
	ErrUnsupportedOS = errors.New("localapi: the local API runs on Linux only")
)
