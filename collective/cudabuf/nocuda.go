//go:build !cuda

package cudabuf

// Available reports whether this binary can put collectives on CUDA devices:
// never without the "cuda" build tag.
func Available() bool { return false }
