package node

import (
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/consensus"
)

// AllocGCKeep defaults to consensus's and refuses a negative count.
func TestConfigAllocGCKeep(t *testing.T) {
	c := DefaultConfig()
	if c.AllocGCKeep != consensus.DefaultConfig().AllocGCKeep {
		t.Fatalf("default AllocGCKeep %d, want consensus's %d", c.AllocGCKeep, consensus.DefaultConfig().AllocGCKeep)
	}
	c.DataDir = t.TempDir()
	if err := c.Validate(); err != nil {
		t.Fatal(err)
	}
	c.AllocGCKeep = -1
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--alloc-gc-keep") {
		t.Fatalf("AllocGCKeep -1: %v, want an error naming --alloc-gc-keep", err)
	}
}
