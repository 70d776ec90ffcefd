package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/node/driver"
)

func init() { registerCommand(newSuperviseCommand) }

// newSuperviseCommand is the hidden per-task supervisor the exec driver
// starts: it runs one task, writes its logs with rotation and records its
// exit, so that tasks outlive an agent restart.
func newSuperviseCommand() *cobra.Command {
	return &cobra.Command{
		Use:                driver.SupervisorCommand,
		Short:              "Run one task under supervision (used by the agent)",
		Hidden:             true,
		DisableFlagParsing: true,
		Run: func(cmd *cobra.Command, args []string) {
			os.Exit(driver.SupervisorMain(args))
		},
	}
}
