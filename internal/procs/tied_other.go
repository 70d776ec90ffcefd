//go:build !linux

package procs

import "syscall"

// setParentDeathSignal does nothing: only Linux has parent-death signals, so
// elsewhere agents of a killed test binary must be stopped by hand.
func setParentDeathSignal(*syscall.SysProcAttr) {}
