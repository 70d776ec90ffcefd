//go:build !cuda

package cuda

// Built reports whether this binary has the CUDA data path (the "cuda" tag).
const Built = false

// Runtime is the CUDA data path; in a build without the "cuda" tag it cannot
// be opened.
type Runtime struct{}

// Open returns ErrNotBuilt in a build without the "cuda" tag.
func Open(cfg Config) (*Runtime, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return nil, ErrNotBuilt
}

// Available reports whether CUDA devices can be used by this binary: never
// without the "cuda" tag.
func Available() bool { return false }

// Close does nothing.
func (r *Runtime) Close() error { return nil }
