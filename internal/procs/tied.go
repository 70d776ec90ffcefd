package procs

import (
	"os/exec"
	"runtime"
	"syscall"
)

// startTied starts cmd so that it dies with this process: in a new process
// group (so that Kill reaches what it starts) and, on Linux, with SIGKILL as
// its parent-death signal, so that agents of a test binary that is killed
// (a timeout, ^C, SIGKILL) do not outlive it. Linux sends that signal when
// the *thread* that forked the child exits, and Go ends a thread when a
// goroutine locked to it returns; so the child is forked from a goroutine
// that stays locked to its thread until the child has exited, whatever
// thread the caller runs on. exited is closed once the child has exited and
// been reaped.
func startTied(cmd *exec.Cmd) (exited <-chan struct{}, err error) {
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	setParentDeathSignal(cmd.SysProcAttr)
	started := make(chan error, 1)
	done := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		if err := cmd.Start(); err != nil {
			runtime.UnlockOSThread()
			started <- err
			return
		}
		started <- nil
		_ = cmd.Wait()
		runtime.UnlockOSThread() // the child is gone: the thread may serve others
		close(done)
	}()
	if err := <-started; err != nil {
		return nil, err
	}
	return done, nil
}
