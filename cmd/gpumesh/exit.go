package main

import (
	"errors"
	"fmt"
	"io"
)

// Exit statuses of the gpumesh binary.
const (
	exitOK = 0
	// exitFailed: an error, or a job that failed.
	exitFailed = 1
	// exitNotPlaced: `job run` gave up waiting for a placement
	// (--place-timeout; the job stays queued), or `job plan` found that the
	// spec would not place now.
	exitNotPlaced = 2
)

// exitError ends the command with a chosen exit status. With a nil err the
// command has already said everything on its output, so nothing more is
// printed (a failure is reported once, not again as "Error: ...").
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string {
	if e.err == nil {
		return fmt.Sprintf("exit status %d", e.code)
	}
	return e.err.Error()
}

func (e *exitError) Unwrap() error { return e.err }

// exitStatus prints err, if the command has not already said it, and
// returns the process's exit status.
func exitStatus(err error, stderr io.Writer) int {
	if err == nil {
		return exitOK
	}
	var ee *exitError
	if errors.As(err, &ee) {
		if ee.err != nil {
			fmt.Fprintln(stderr, "Error:", ee.err)
		}
		return ee.code
	}
	fmt.Fprintln(stderr, "Error:", err)
	return exitFailed
}
