//go:build !linux

package driver

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// The exec driver needs Linux (/proc, pidfd, parent-death signals). Elsewhere
// the package builds, so that the gpumesh CLI does, and New and
// SupervisorMain refuse to run.
const supported = false

type procStat struct {
	State   byte
	Pgrp    int
	Session int
	Start   uint64
}

var errUnsupported = errors.New("the exec driver runs on Linux only")

func readProcStat(int) (procStat, error)         { return procStat{}, errUnsupported }
func parseProcStat([]byte) (procStat, error)     { return procStat{}, errUnsupported }
func bootID() string                             { return "" }
func sameProcess(int, uint64) bool               { return false }
func groupMembers(int, int) []int                { return nil }
func killGroupIfOurs(int, int) bool              { return false }
func pidfdOpen(int) (*os.File, error)            { return nil, errUnsupported }
func pidfdWait(*os.File, <-chan struct{}) error  { return errUnsupported }
func pidfdSignal(*os.File, syscall.Signal) error { return errUnsupported }
func pidfdReap(*os.File)                         {}
func taskSysProcAttr(u *TaskUser) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: credential(u)}
}
func waitExitedNoReap(int) {}
func closeOnExecFrom(int)  {}

var errNotPollable = errUnsupported

func flockTry(f *os.File) (bool, error) {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == unix.EWOULDBLOCK {
		return false, nil
	}
	return err == nil, err
}
