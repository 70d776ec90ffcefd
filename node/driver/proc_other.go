//go:build !linux

package driver

import (
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

func readProcStat(int) (procStat, error)         { return procStat{}, ErrUnsupportedOS }
func bootID() string                             { return "" }
func sameProcess(int, uint64) bool               { return false }
func killGroupIfOurs(int, int) bool              { return false }
func pidfdOpen(int) (*os.File, error)            { return nil, ErrUnsupportedOS }
func pidfdWait(*os.File, <-chan struct{}) error  { return ErrUnsupportedOS }
func pidfdSignal(*os.File, syscall.Signal) error { return ErrUnsupportedOS }
func pidfdReap(*os.File)                         {}
func taskSysProcAttr(u *TaskUser) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Credential: credential(u)}
}
func waitExitedNoReap(int) {}
func closeOnExecFrom(int)  {}
func resetThreadNice()     {}

var errNotPollable = ErrUnsupportedOS

func flockTry(f *os.File) (bool, error) {
	err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
	if err == unix.EWOULDBLOCK {
		return false, nil
	}
	return err == nil, err
}
