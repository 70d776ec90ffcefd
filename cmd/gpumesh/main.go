// Command gpumesh is the single gpumesh binary: the agent daemon, a local dev
// cluster, and the client commands that talk to a running cluster.
package main

import (
	"fmt"
	"os"
)

func main() {
	if err := newRootCommand().Execute(); err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
}
