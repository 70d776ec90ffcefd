package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"syscall"
	"testing"

	"github.com/hashicorp/go-hclog"
)

func TestDevNoiseLeavesOutOnlyTheBenignLibraryErrors(t *testing.T) {
	var buf bytes.Buffer
	l := hclog.New(&hclog.LoggerOptions{Name: "dev", Level: hclog.Error, Output: &buf, Exclude: devNoise})
	reset := &net.OpError{Op: "read", Net: "tcp", Err: os.NewSyscallError("read", syscall.ECONNRESET)}
	// as raft's loggers get it: named sub-loggers of the dev logger
	l.Named("node-1").Named("autopilot").Error("Error when computing next state", "error", fmt.Errorf("wrapped: %w", context.Canceled))
	l.Named("node-2").Named("transport").Error("failed to decode incoming command", "error", reset)
	if buf.Len() != 0 {
		t.Fatalf("benign errors were logged:\n%s", buf.String())
	}
	kept := []struct {
		msg string
		err error
	}{
		{"Error when computing next state", errors.New("no leader")},
		{"failed to decode incoming command", errors.New("unknown rpc type 9")},
		{"failed to apply", context.Canceled},
	}
	for _, k := range kept {
		l.Named("x").Error(k.msg, "error", k.err)
	}
	for _, k := range kept {
		if !strings.Contains(buf.String(), k.msg+": error=\""+k.err.Error()) {
			t.Errorf("%q with %v was left out; log:\n%s", k.msg, k.err, buf.String())
		}
	}
	if devNoise(hclog.Warn, "failed to decode incoming command", "error", reset) {
		t.Error("a warning was taken for noise")
	}
}
