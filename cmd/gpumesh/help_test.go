package main

import (
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestEveryCommandHasAnExample walks the whole command tree: every command
// a person can run or look at has an Example in its --help.
func TestEveryCommandHasAnExample(t *testing.T) {
	root := newRootCommand()
	var walk func(c *cobra.Command)
	n := 0
	walk = func(c *cobra.Command) {
		if c.Hidden || c.Name() == "help" || c.Name() == "completion" || strings.HasPrefix(c.Use, "__") {
			return
		}
		n++
		if strings.TrimSpace(c.Example) == "" {
			t.Errorf("`%s --help` has no Example", c.CommandPath())
		}
		for _, sub := range c.Commands() {
			walk(sub)
		}
	}
	walk(root)
	if n < 10 {
		t.Fatalf("walked only %d commands; is the tree registered?", n)
	}
}
