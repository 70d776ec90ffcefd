// Command gpumesh is the single gpumesh binary: the agent daemon, a local dev
// cluster, and the client commands that talk to a running cluster.
package main

import (
	"os"
)

func main() {
	os.Exit(exitStatus(newRootCommand().Execute(), os.Stderr))
}
