package main

import (
	"errors"
	"fmt"
	"runtime"
	"slices"
	"strings"

	"github.com/spf13/cobra"
)

// The agent runs on Linux only: its exec driver (process groups, pidfds,
// /proc), the local API PyTorch ranks talk to (SOCK_SEQPACKET sockets,
// sealed memfds) and CUDA. The client commands reach a cluster's agents
// over gRPC and build and run elsewhere too, such as on a laptop running
// macOS; there newRootCommand calls linuxOnly, and the commands that would
// run an agent in this process fail before they create or start anything.

// errNeedsLinux is returned by the agent commands where the agent does not
// run (agentOS false).
var errNeedsLinux = errors.New("needs Linux (the agent's exec driver, local API and CUDA)")

// agentCommands are the top-level commands that run agents in this
// process.
var agentCommands = []string{"agent", "dev"}

// clientCommands are what a user on another system runs against a
// cluster, named in errNeedsLinux's message.
var clientCommands = []string{
	"job run", "job status", "job logs", "job stop", "job list", "job plan",
	"service list", "service status", "nodes", "members", "checkpoint list",
	"ec2 user-data", "ec2 iam-policy", "tls ca create", "tls cert create",
}

// linuxOnly makes root's agent commands fail at once with errNeedsLinux
// (their --help still works, and says "Linux only").
func linuxOnly(root *cobra.Command) {
	for _, c := range root.Commands() {
		if !slices.Contains(agentCommands, c.Name()) {
			continue
		}
		c.Short += " (Linux only)"
		path := c.CommandPath()
		c.PreRunE = func(*cobra.Command, []string) error {
			return fmt.Errorf("%s %w; on %s/%s, use the client commands against a cluster's agent (--address HOST:PORT or $GPUMESH_ADDR): %s",
				path, errNeedsLinux, runtime.GOOS, runtime.GOARCH, "gpumesh "+strings.Join(clientCommands, ", gpumesh "))
		}
	}
}
