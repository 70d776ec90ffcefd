package procs

import "syscall"

// setParentDeathSignal makes the child get SIGKILL when its parent thread
// exits (see startTied).
func setParentDeathSignal(a *syscall.SysProcAttr) { a.Pdeathsig = syscall.SIGKILL }
