package driver

import "errors"

var (
	// ErrInvalidConfig is returned by Config.Validate and New for a bad
	// driver configuration.
	ErrInvalidConfig = errors.New("driver config")
	// ErrInvalidSpec is returned by Start for a bad task spec.
	ErrInvalidSpec = errors.New("task spec")
	// ErrInvalidEnv is returned by BuildEnv for an impossible rank placement.
	ErrInvalidEnv = errors.New("rank environment")
	// ErrAlreadyRunning is returned by Start when a different task already
	// runs in the same allocation directory.
	ErrAlreadyRunning = errors.New("task already running")
	// ErrTaskExited is returned by Start when the allocation directory holds a
	// task that already ran: a rank runs once per generation, and a restart
	// is a new generation.
	ErrTaskExited = errors.New("task already ran")
	// ErrStartFailed is returned by Start when the command could not be
	// started (not found, not executable, bad working directory).
	ErrStartFailed = errors.New("task start failed")
	// ErrSupervisor is returned when the task supervisor process could not
	// be started or did not report back.
	ErrSupervisor = errors.New("task supervisor")
	// ErrNotFound is returned for a task or allocation directory the driver
	// does not know.
	ErrNotFound = errors.New("task not found")
	// ErrShutdown is returned by calls made after Shutdown.
	ErrShutdown = errors.New("driver is shut down")
	// ErrStillRunning is returned by Remove for a task that has not exited.
	ErrStillRunning = errors.New("task still running")
	// ErrNoLogs is returned by Logs when a stream has no log files.
	ErrNoLogs = errors.New("no logs")
	// ErrUnsupportedOS is returned by New on a system other than Linux (the
	// driver needs /proc, pidfds and parent-death signals).
	ErrUnsupportedOS = errors.New("the exec driver runs on Linux only")
)
