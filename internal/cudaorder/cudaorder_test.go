package cudaorder

import (
	"os"
	"testing"
)

func TestInitSetsPCIBusOrder(t *testing.T) {
	// The test binary's environment: unset unless the caller set it.
	if v := os.Getenv(Var); v == "" {
		t.Fatalf("%s is empty after init, want %s", Var, Value)
	}
}
