package main

import (
	"context"
	"errors"
	"io"
	"syscall"

	"github.com/hashicorp/go-hclog"
)

// devNoise reports the library errors a dev cluster logs in normal
// operation, which `gpumesh dev` leaves out at its default level (error):
// on a loaded machine leadership moves between the in-process agents, and
// raft's autopilot then logs its cancelled state computation, and raft's
// transport the connection a peer closed under it. Both are harmless and
// look alarming to someone trying the cluster; --log-level warn (or lower)
// shows them again. Nothing else is left out.
func devNoise(level hclog.Level, msg string, args ...interface{}) bool {
	if level != hclog.Error {
		return false
	}
	var benign error
	switch msg {
	case "Error when computing next state": // raft-autopilot, leadership lost
		benign = context.Canceled
	case "failed to decode incoming command": // raft transport, peer went away
		benign = syscall.ECONNRESET
	default:
		return false
	}
	for i := 1; i < len(args); i += 2 {
		if err, ok := args[i].(error); ok && (errors.Is(err, benign) || (benign == syscall.ECONNRESET && errors.Is(err, io.EOF))) {
			return true
		}
	}
	return false
}
