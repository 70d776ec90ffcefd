package main

import (
	"github.com/spf13/cobra"
)

// Commands register themselves from their own files with registerCommand (a
// top-level command) or registerBenchCommand (a child of "gpumesh bench"), so
// that each area of the CLI lives in one file.
var (
	commandConstructors      []func() *cobra.Command
	benchCommandConstructors []func() *cobra.Command
)

func registerCommand(f func() *cobra.Command) { commandConstructors = append(commandConstructors, f) }
func registerBenchCommand(f func() *cobra.Command) {
	benchCommandConstructors = append(benchCommandConstructors, f)
}

func newRootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "gpumesh",
		Short:         "A self-organizing GPU cluster: gossip, Raft scheduling and fast collectives",
		SilenceUsage:  true,
		SilenceErrors: true,
		Example: `  gpumesh dev --demo                     # a 3-node cluster in this process runs a real all-reduce
  gpumesh agent --data-dir /var/lib/gpumesh --join 10.0.1.17
  gpumesh job run examples/hello.yaml`,
	}
	bench := &cobra.Command{
		Use:     "bench",
		Short:   "Measure the data plane on this machine",
		Example: "  gpumesh bench pipeline --stages 4 --microbatches 16",
	}
	for _, f := range benchCommandConstructors {
		bench.AddCommand(f())
	}
	root.AddCommand(bench)
	for _, f := range commandConstructors {
		root.AddCommand(f())
	}
	if !agentOS {
		linuxOnly(root)
	}
	return root
}
