package deploy

import "errors"

var (
	// ErrNotOnEC2 means the instance metadata service did not answer within
	// the probe timeout: the process is not running on EC2 (or IMDS is
	// disabled for the instance). Callers start with UnknownIdentity().
	ErrNotOnEC2 = errors.New("not on EC2: the instance metadata service did not answer")
	// ErrMetadataNotFound is a 404 from the instance metadata service: the
	// item does not exist (for spot and rebalance notices: nothing pending).
	ErrMetadataNotFound = errors.New("instance metadata item not found")
	// ErrInvalidConfig wraps every configuration validation error.
	ErrInvalidConfig = errors.New("invalid deploy config")
	// ErrInvalidTag is returned for a malformed KEY=VALUE tag.
	ErrInvalidTag = errors.New("invalid EC2 tag")
	// ErrFleetNotFound is returned when DescribeFleets does not know a fleet ID.
	ErrFleetNotFound = errors.New("EC2 fleet not found")
	// ErrWatcherStopped is returned by Watcher.Start on a watcher that has
	// already been started or stopped.
	ErrWatcherStopped = errors.New("interruption watcher already started or stopped")
)
