package driver

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// procStat is what the driver reads of /proc/<pid>/stat.
type procStat struct {
	State   byte   // R, S, D, Z, ...
	Pgrp    int    // process group
	Session int    // session ID
	Start   uint64 // start time, clock ticks after boot: with the PID, a process's identity
}

// readProcStat parses /proc/<pid>/stat. The command name (field 2) may hold
// spaces and parentheses, so fields are counted from the last ')'.
func readProcStat(pid int) (procStat, error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return procStat{}, err
	}
	return parseProcStat(data)
}

func parseProcStat(data []byte) (procStat, error) {
	i := bytes.LastIndexByte(data, ')')
	if i < 0 || i+2 > len(data) {
		return procStat{}, fmt.Errorf("malformed /proc stat line %q", data)
	}
	f := strings.Fields(string(data[i+1:]))
	// f[0] is field 3 (state); field N is f[N-3].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, fmt.Errorf("malformed /proc stat line %q", data)
	}
	pgrp, err1 := strconv.Atoi(f[2])
	sid, err2 := strconv.Atoi(f[3])
	start, err3 := strconv.ParseUint(f[19], 10, 64)
	if err := errors.Join(err1, err2, err3); err != nil {
		return procStat{}, fmt.Errorf("malformed /proc stat line %q: %w", data, err)
	}
	return procStat{State: f[0][0], Pgrp: pgrp, Session: sid, Start: start}, nil
}

// bootID identifies this boot of the machine: PIDs and start times of an
// earlier boot mean nothing.
func bootID() string {
	b, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// sameProcess reports whether pid is alive (not a zombie) and started at
// start: the process we recorded, not a later one given the same PID.
func sameProcess(pid int, start uint64) bool {
	st, err := readProcStat(pid)
	return err == nil && st.Start == start && st.State != 'Z' && st.State != 'X'
}

// groupMembers lists the live processes of process group pgid in session
// sid. A process group ID is not reused while the group has members, so a
// member found here belongs to the group we started.
func groupMembers(pgid, sid int) []int {
	entries, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		st, err := readProcStat(pid)
		if err != nil || st.State == 'Z' || st.State == 'X' {
			continue
		}
		if st.Pgrp == pgid && st.Session == sid {
			pids = append(pids, pid)
		}
	}
	return pids
}

// killGroupIfOurs sends SIGKILL to process group pgid if it still has
// members in session sid (what is left of a task whose supervisor died).
func killGroupIfOurs(pgid, sid int) bool {
	if pgid <= 1 || len(groupMembers(pgid, sid)) == 0 {
		return false
	}
	return unix.Kill(-pgid, unix.SIGKILL) == nil
}

// pidfdOpen opens a pidfd for pid as a non-blocking *os.File that the
// runtime poller watches: it turns readable when the process exits.
func pidfdOpen(pid int) (*os.File, error) {
	fd, err := unix.PidfdOpen(pid, unix.PIDFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "pidfd:"+strconv.Itoa(pid)), nil
}

// errNotPollable means the pidfd cannot be waited on through the poller;
// callers fall back to polling /proc.
var errNotPollable = errors.New("pidfd is not pollable")

// pidfdWait blocks until the process exits (nil), or cancel is closed
// (os.ErrDeadlineExceeded).
func pidfdWait(f *os.File, cancel <-chan struct{}) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		select {
		case <-cancel:
			_ = f.SetReadDeadline(time.Now())
		case <-stop:
		}
	}()
	err = rc.Read(func(fd uintptr) bool {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if err == unix.EINTR {
				continue
			}
			return n > 0
		}
	})
	if err != nil && !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, os.ErrClosed) {
		return fmt.Errorf("%w: %v", errNotPollable, err)
	}
	return err
}

func pidfdSignal(f *os.File, sig syscall.Signal) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.PidfdSendSignal(int(fd), sig, nil, 0)
	}); err != nil {
		return err
	}
	return serr
}

// pidfdReap reaps the process if it is our child (a supervisor started by
// this process, or adopted as a subreaper); ECHILD otherwise.
func pidfdReap(f *os.File) {
	rc, err := f.SyscallConn()
	if err != nil {
		return
	}
	_ = rc.Control(func(fd uintptr) {
		var info unix.Siginfo
		_ = unix.Waitid(unix.P_PIDFD, int(fd), &info, unix.WEXITED|unix.WNOHANG, nil)
	})
}

// flockTry takes an exclusive lock on f without blocking; ok is false when
// another open file description holds it.
func flockTry(f *os.File) (ok bool, err error) {
	for {
		err = unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == unix.EINTR {
			continue
		}
		break
	}
	if err == unix.EWOULDBLOCK {
		return false, nil
	}
	return err == nil, err
}

// supported is true where the driver works.
const supported = true

// taskSysProcAttr puts the task in a process group of its own and has the
// kernel SIGKILL it when the supervisor (the thread that started it) dies;
// with u, it runs as that user.
func taskSysProcAttr(u *TaskUser) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL, Credential: credential(u)}
}

// waitExitedNoReap blocks until pid (a child) has exited, leaving it a
// zombie: its PID, and so its process group ID, stay ours until reaped.
func waitExitedNoReap(pid int) {
	var info unix.Siginfo
	for {
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return
		}
	}
}

// closeOnExecFrom marks every descriptor from fd up close-on-exec.
func closeOnExecFrom(fd int) {
	if unix.CloseRange(uint(fd), ^uint(0), unix.CLOSE_RANGE_CLOEXEC) == nil {
		return
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return
	}
	for _, e := range entries {
		if n, err := strconv.Atoi(e.Name()); err == nil && n >= fd {
			unix.CloseOnExec(n)
		}
	}
}

// resetThreadNice puts the calling thread back at niceness 0 when it runs
// at a raised priority (a negative niceness); it never raises priority.
func resetThreadNice() {
	tid := unix.Gettid()
	// The raw syscall returns 20 - nice.
	if prio, err := unix.Getpriority(unix.PRIO_PROCESS, tid); err == nil && 20-prio < 0 {
		_ = unix.Setpriority(unix.PRIO_PROCESS, tid, 0)
	}
}
