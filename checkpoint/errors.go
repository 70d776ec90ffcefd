package checkpoint

import "errors"

var (
	// ErrNoCheckpoint is returned by Latest when the store holds no complete
	// checkpoint (a fresh job starts from scratch).
	ErrNoCheckpoint = errors.New("no complete checkpoint")
	// ErrNotFound is returned for an object or part that does not exist.
	ErrNotFound = errors.New("not found")
	// ErrIncomplete is returned by Commit when a listed part is missing or
	// has another size than the manifest says.
	ErrIncomplete = errors.New("checkpoint incomplete")
	// ErrCorrupt is returned when a downloaded part's size or CRC32C differs
	// from its manifest's, or a manifest cannot be read.
	ErrCorrupt = errors.New("checkpoint corrupt")
	// ErrInvalidURI is returned by ParseURI and Open for a URI that is not
	// s3://bucket/prefix or file:///absolute/dir.
	ErrInvalidURI = errors.New("invalid checkpoint URI")
	// ErrOtherJob is returned by Owner.Check when the newest checkpoint was
	// written by another job than the one about to use it.
	ErrOtherJob = errors.New("the checkpoints belong to another job")
	// ErrInvalidConfig is returned for a configuration that fails validation.
	ErrInvalidConfig = errors.New("invalid checkpoint configuration")
)
