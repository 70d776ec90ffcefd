package mesh

import "errors"

var (
	// ErrInvalidConfig wraps every Config.Validate failure.
	ErrInvalidConfig = errors.New("mesh: invalid config")
	// ErrInvalidKey is returned for an encryption key that is not 32 bytes
	// (or not base64 where a string was given).
	ErrInvalidKey = errors.New("mesh: invalid encryption key")
	// ErrInvalidMeta wraps every failure to validate or decode a Meta.
	ErrInvalidMeta = errors.New("mesh: invalid node metadata")
	// ErrMetaVersion is returned when a record was written in a format
	// version this build does not read.
	ErrMetaVersion = errors.New("mesh: unknown node metadata version")
	// ErrMetaTooLarge is returned when a Meta encodes to more than
	// MetaMaxSize bytes.
	ErrMetaTooLarge = errors.New("mesh: node metadata too large")
	// ErrImmutableMeta is returned by UpdateMeta when the update changes the
	// node's ID, name or gossip address.
	ErrImmutableMeta = errors.New("mesh: node ID, name and gossip address cannot change")
	// ErrNoPeers is returned by a join when no address other than this
	// node's own was given or discovered.
	ErrNoPeers = errors.New("mesh: no peer addresses to join")
	// ErrShutdown is returned by calls on a Mesh that was shut down.
	ErrShutdown = errors.New("mesh: shut down")
	// ErrLeft is returned by calls that need membership after Leave.
	ErrLeft = errors.New("mesh: left the mesh")
)
