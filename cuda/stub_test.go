//go:build !cuda

package cuda

import (
	"errors"
	"testing"
)

func TestStubReportsNoDevices(t *testing.T) {
	if Built || Available() {
		t.Fatal("a build without the cuda tag claims CUDA support")
	}
	rt, err := Open(DefaultConfig())
	if !errors.Is(err, ErrNotBuilt) || rt != nil {
		t.Fatalf("Open: %v, %v; want nil, ErrNotBuilt", rt, err)
	}
}
