package driver

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Exit codes of SupervisorMain (the task's own exit code is in exit.json).
const (
	supervisorOK        = 0
	supervisorUsage     = 2
	supervisorDuplicate = 3
	supervisorFailed    = 4
	supervisorOrphaned  = 5 // the state directory went away; the task was stopped, nothing recorded
)

// logDrainTimeout bounds how long the supervisor waits for the log pipes to
// reach EOF after the task's process group is gone (a process that left the
// group may hold them open).
const logDrainTimeout = 2 * time.Second

// SupervisorMain runs one task under supervision; it is the body of the
// hidden "gpumesh task-supervise" command, which the driver starts for
// every task in a session of its own, so it outlives the daemon:
//
//	task-supervise --dir <alloc dir>/.gpumesh [--lock-fd N] [--ready-fd N] [--dir-check DURATION]
//	               [--daemon-pid N --daemon-start TICKS]
//
// It holds the task directory's lock for its whole life (so a task is never
// started twice and a new daemon can tell it is alive), starts the command in
// its own process group with SIGKILL as parent-death signal, copies stdout and
// stderr into rotated log files, turns SIGTERM into a graceful stop (SIGTERM
// to the task's group, SIGKILL when the kill deadline passes), and when the
// task ends kills what is left of its group and records the exit status in
// exit.json. Every --dir-check interval it checks that the lock file in
// --dir is still the one it holds; when it is gone or replaced, it stops the
// task as a plain stop would and exits without recording anything (see
// "Orphans" in the package doc). With --daemon-pid it also stops the task,
// recording the stop as usual, once that process (identified with its start
// time) has exited (Config.StopWithDaemon). args are the arguments after the
// command name; the return value is the process exit code.
func SupervisorMain(args []string) int {
	if !supported {
		fmt.Fprintln(os.Stderr, "task-supervise: the exec driver runs on Linux only")
		return supervisorFailed
	}
	// Catch stop signals before anything else: their default action would
	// kill the supervisor and lose the task's exit status.
	sigCh := make(chan os.Signal, 8)
	signal.Notify(sigCh, unix.SIGTERM, unix.SIGINT)
	// SIGHUP is caught and dropped rather than ignored: an ignored signal
	// would stay ignored in the task across exec, a caught one does not.
	hupCh := make(chan os.Signal, 1)
	signal.Notify(hupCh, unix.SIGHUP)
	defer signal.Stop(hupCh)

	// The task must inherit stdin, stdout and stderr only, not whatever
	// descriptors the daemon's own parent leaked to it and it to us.
	closeOnExecFrom(3)

	fset := flag.NewFlagSet(SupervisorCommand, flag.ContinueOnError)
	dir := fset.String("dir", "", "the task's state directory (<alloc dir>/.gpumesh)")
	lockFD := fset.Int("lock-fd", -1, "inherited descriptor of the locked supervisor.lock")
	readyFD := fset.Int("ready-fd", -1, "inherited pipe to report the start on")
	dirCheck := fset.Duration("dir-check", DefaultDirCheckInterval, "how often to check that --dir is still this task's")
	daemonPid := fset.Int("daemon-pid", 0, "stop the task when this process (the daemon) has exited")
	daemonStart := fset.Uint64("daemon-start", 0, "the --daemon-pid process's start time (clock ticks after boot, /proc/<pid>/stat)")
	if err := fset.Parse(args); err != nil {
		return supervisorUsage
	}
	if *dir == "" {
		fmt.Fprintln(os.Stderr, "task-supervise: --dir is required")
		return supervisorUsage
	}
	if *dirCheck <= 0 {
		fmt.Fprintln(os.Stderr, "task-supervise: --dir-check must be > 0")
		return supervisorUsage
	}
	if abs, err := filepath.Abs(*dir); err == nil {
		*dir = abs
	}
	logger := hclog.New(&hclog.LoggerOptions{
		Name:   "task-supervisor",
		Output: os.Stderr,
		Level:  hclog.Info,
	}).With("dir", *dir, "pid", os.Getpid())

	s := &supervisor{dir: *dir, dirCheck: *dirCheck, daemonPid: *daemonPid, daemonStart: *daemonStart, logger: logger, sigCh: sigCh}
	if *readyFD >= 0 {
		unix.CloseOnExec(*readyFD)
		s.ready = os.NewFile(uintptr(*readyFD), "ready")
	}
	code := s.run(*lockFD)
	signal.Stop(sigCh)
	return code
}

type supervisor struct {
	dir      string
	dirCheck time.Duration // how often orphaned runs
	// daemonPid and daemonStart identify the daemon whose exit stops the
	// task (--daemon-pid); 0 when tasks outlive it.
	daemonPid   int
	daemonStart uint64
	logger      hclog.Logger
	sigCh       chan os.Signal
	ready       *os.File

	spec     specFile
	lock     *os.File
	cmd      *exec.Cmd
	pgid     int
	started  time.Time
	killAt   time.Time
	stopped  bool
	reason   string
	killed   bool
	timer    *time.Timer
	timerC   <-chan time.Time
	deadline string // path of the deadline file

	// note is our own write end of the task's stderr pipe, kept open until
	// the logs close, so that a message of ours lands in the task's log in
	// order with its output.
	note    *os.File
	writers []*rotatingWriter
	// orphan says why the state directory is no longer ours ("" while it
	// is); from then on nothing is written by path into the allocation.
	orphan string
}

// report tells the driver how the start went, once.
func (s *supervisor) report(m readyMsg) {
	if s.ready == nil {
		return
	}
	b, _ := json.Marshal(m)
	_, _ = s.ready.Write(append(b, '\n'))
	_ = s.ready.Close()
	s.ready = nil
}

func (s *supervisor) fail(code int, format string, args ...any) int {
	msg := fmt.Sprintf(format, args...)
	s.logger.Error("task supervisor failed", "error", msg)
	s.report(readyMsg{Error: msg})
	return code
}

func (s *supervisor) run(lockFD int) int {
	// The lock: inherited from the driver (taken before it started us, so
	// there is no moment when a live task directory looks unlocked), or
	// taken here when run by hand.
	if lockFD >= 0 {
		unix.CloseOnExec(lockFD)
		s.lock = os.NewFile(uintptr(lockFD), lockFileName)
	} else {
		f, err := os.OpenFile(filepath.Join(s.dir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return s.fail(supervisorFailed, "open lock: %v", err)
		}
		s.lock = f
	}
	if ok, err := flockTry(s.lock); err != nil {
		return s.fail(supervisorFailed, "lock %s: %v", filepath.Join(s.dir, lockFileName), err)
	} else if !ok {
		return s.fail(supervisorDuplicate, "another supervisor holds %s: not starting the task twice", filepath.Join(s.dir, lockFileName))
	}
	if exists(filepath.Join(s.dir, exitFileName)) {
		return s.fail(supervisorDuplicate, "%s exists: the task already ran", exitFileName)
	}
	if err := readJSON(filepath.Join(s.dir, specFileName), &s.spec); err != nil {
		return s.fail(supervisorFailed, "read spec: %v", err)
	}
	if s.spec.Version != stateVersion {
		return s.fail(supervisorFailed, "spec version %d, this binary speaks %d", s.spec.Version, stateVersion)
	}
	spec := s.spec.Spec
	s.deadline = DeadlineFile(s.spec.AllocDir)

	// Log writers and pipes. The task writes into pipes; we copy into the
	// rotated files, so the task never sees rotation.
	if err := os.MkdirAll(spec.LogDir, 0o755); err != nil {
		return s.startFailed("create log dir: %v", err)
	}
	if err := writeLogMeta(spec.LogDir, spec.Logs); err != nil {
		return s.startFailed("write log settings: %v", err)
	}
	var copiers sync.WaitGroup
	var readEnds []*os.File
	var writers []*rotatingWriter
	startCopy := func(stream string) (*os.File, error) {
		w, err := openRotatingWriter(spec.LogDir, stream, spec.Logs)
		if err != nil {
			return nil, err
		}
		pr, pw, err := os.Pipe()
		if err != nil {
			_ = w.Close()
			return nil, err
		}
		readEnds, writers = append(readEnds, pr), append(writers, w)
		s.writers = writers
		copiers.Add(1)
		go func() {
			defer copiers.Done()
			s.copyLog(stream, pr, w)
		}()
		return pw, nil
	}
	stdoutW, err := startCopy(Stdout)
	if err != nil {
		return s.startFailed("open stdout log: %v", err)
	}
	stderrW, err := startCopy(Stderr)
	if err != nil {
		_ = stdoutW.Close()
		s.closeLogs(&copiers, readEnds, writers)
		return s.startFailed("open stderr log: %v", err)
	}
	closeLogs := func() {
		_ = stdoutW.Close()
		_ = stderrW.Close()
		s.closeLogs(&copiers, readEnds, writers)
	}

	if err := os.MkdirAll(spec.Dir, 0o755); err != nil {
		closeLogs()
		return s.startFailed("create working dir: %v", err)
	}
	if err := prepareUserDirs(spec.User, s.spec.AllocDir, spec.Dir); err != nil {
		closeLogs()
		return s.startFailed("give the task's directories to user %s: %v", spec.User.Name, err)
	}
	path, err := lookPath(spec.Command[0], spec.Env, spec.Dir)
	if err != nil {
		closeLogs()
		return s.startFailed("%v", err)
	}
	devnull, err := os.Open(os.DevNull)
	if err != nil {
		closeLogs()
		return s.startFailed("open %s: %v", os.DevNull, err)
	}
	s.cmd = &exec.Cmd{
		Path:   path,
		Args:   spec.Command,
		Env:    spec.Env,
		Dir:    spec.Dir,
		Stdin:  devnull,
		Stdout: stdoutW,
		Stderr: stderrW,
		// Its own process group, so that stop signals reach all of it, and
		// SIGKILL when the supervisor dies (see taskSysProcAttr).
		SysProcAttr: taskSysProcAttr(spec.User),
	}
	// The parent-death signal fires when the forking thread exits, so this
	// goroutine stays locked to its thread for good.
	runtime.LockOSThread()
	// The daemon may run at a raised priority (the unit's Nice=-5) so that
	// training cannot starve it; the task gets the normal one. Linux keeps
	// niceness per thread and the task is forked from this one.
	resetThreadNice()
	err = s.cmd.Start()
	_ = devnull.Close()
	_ = stdoutW.Close() // the task holds the write ends now; we keep stderr's for notes
	s.note = stderrW
	if err != nil {
		s.closeLogs(&copiers, readEnds, writers)
		if spec.User != nil && errors.Is(err, fs.ErrPermission) {
			return s.startFailed("start %q as user %s: %v (the user must be able to reach %s and read the program: make the data dir and the folders above it traversable, e.g. chmod 711)",
				spec.Command[0], spec.User.Name, err, spec.Dir)
		}
		return s.startFailed("start %q: %v", spec.Command[0], err)
	}
	s.started = time.Now()
	pid := s.cmd.Process.Pid
	s.pgid = pid

	// Watch for the exit without reaping: the zombie keeps the PID and so
	// the process group ID ours until we have killed what is left of it.
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		waitExitedNoReap(pid)
	}()

	st := taskState{
		Version:       stateVersion,
		BootID:        bootID(),
		SupervisorPid: os.Getpid(),
		TaskPid:       pid,
		TaskPgid:      pid,
		SpecHash:      s.spec.Hash,
		StartedAt:     s.started,
	}
	if ps, err := readProcStat(os.Getpid()); err == nil {
		st.SupervisorStart = ps.Start
	}
	if ps, err := readProcStat(pid); err == nil {
		st.TaskStart = ps.Start
	}
	if err := writeJSONAtomic(filepath.Join(s.dir, stateFileName), st, ephemeral); err != nil {
		// Without state.json a new daemon could not find the task: do not
		// let it run unrecorded.
		s.logger.Error("cannot record the task's state; killing it", "error", err)
		_ = unix.Kill(-s.pgid, unix.SIGKILL)
		<-exited
		_ = s.cmd.Wait()
		s.closeLogs(&copiers, readEnds, writers)
		return s.startFailed("write state: %v", err)
	}
	s.logger.Info("task started", "task_pid", pid, "command", spec.Command)
	s.report(readyMsg{OK: true, TaskPid: pid})

	check := time.NewTicker(s.dirCheck)
	defer check.Stop()
	for {
		select {
		case <-check.C:
			if s.orphan == "" {
				if why := s.orphaned(); why != "" {
					s.abandon(why)
				} else if s.daemonPid > 0 && !sameProcess(s.daemonPid, s.daemonStart) {
					s.daemonGone()
				}
			}
		case <-s.sigCh:
			s.handleStop()
		case <-s.timerC:
			s.timerC = nil
			s.logger.Warn("kill timeout passed; sending SIGKILL to the task's process group", "pgid", s.pgid)
			s.killed = true
			_ = unix.Kill(-s.pgid, unix.SIGKILL)
		case <-exited:
			return s.finish(&copiers, readEnds, writers)
		}
	}
}

// startFailed records a task that never ran and reports it.
func (s *supervisor) startFailed(format string, args ...any) int {
	msg := fmt.Sprintf(format, args...)
	res := ExitResult{ExitCode: -1, Error: "start: " + msg, FinishedAt: time.Now()}
	if err := writeJSONAtomic(filepath.Join(s.dir, exitFileName), res, durable); err != nil {
		s.logger.Error("cannot record the failed start", "error", err)
	}
	if ld := s.spec.Spec.LogDir; ld != "" {
		_ = markLogClosed(ld, Stdout)
		_ = markLogClosed(ld, Stderr)
	}
	s.logger.Error("task did not start", "error", msg)
	s.report(readyMsg{Error: msg})
	return supervisorOK
}

// handleStop applies the newest stop request (stop.json; none means a
// plain stop with the task's kill timeout, as when an operator or the init
// system sends SIGTERM).
func (s *supervisor) handleStop() {
	var req stopRequest
	if s.orphan == "" {
		if err := readJSON(filepath.Join(s.dir, stopFileName), &req); err != nil && !errors.Is(err, fs.ErrNotExist) {
			s.logger.Warn("unreadable stop request; stopping with the kill timeout", "error", err)
		}
	}
	s.stop(req)
}

// stop begins a stop, or brings SIGKILL of one under way sooner.
func (s *supervisor) stop(req stopRequest) {
	now := time.Now()
	killAt := req.KillAt
	if killAt.IsZero() {
		killAt = now.Add(s.spec.Spec.KillTimeout)
	}
	if req.Force {
		killAt = now
	}
	first := !s.stopped
	if !first && !killAt.Before(s.killAt) {
		return // an earlier request already kills sooner
	}
	s.killAt = killAt
	if first {
		s.stopped, s.reason = true, req.Reason
	}
	// The deadline file tells the task when SIGKILL comes (Unix seconds).
	// An orphan's allocation directory is gone or another task's.
	if s.orphan == "" {
		secs := strconv.FormatInt(killAt.Unix(), 10) + "\n"
		if err := writeFileAtomic(s.deadline, []byte(secs), 0o644, ephemeral); err != nil {
			s.logger.Warn("cannot write the stop deadline file", "path", s.deadline, "error", err)
		}
	}
	grace := killAt.Sub(now)
	s.logger.Info("stopping task", "reason", req.Reason, "grace", grace)
	if grace <= 0 {
		s.killed = true
		_ = unix.Kill(-s.pgid, unix.SIGKILL)
		return
	}
	if first {
		_ = unix.Kill(-s.pgid, unix.SIGTERM)
	}
	if s.timer != nil {
		s.timer.Stop()
	}
	s.timer = time.NewTimer(grace)
	s.timerC = s.timer.C
}

// finish runs once the task's main process exited: kill the rest of its
// group, reap it, drain the logs, record the exit status.
func (s *supervisor) finish(copiers *sync.WaitGroup, readEnds []*os.File, writers []*rotatingWriter) int {
	_ = unix.Kill(-s.pgid, unix.SIGKILL) // leftovers of the group; the zombie leader keeps the ID ours
	if s.timer != nil {
		s.timer.Stop()
	}
	err := s.cmd.Wait()
	res := ExitResult{
		ExitCode:   -1,
		StartedAt:  s.started,
		FinishedAt: time.Now(),
		Stopped:    s.stopped,
		StopReason: s.reason,
		Killed:     s.killed,
	}
	var ee *exec.ExitError
	switch {
	case err == nil:
		res.ExitCode = 0
	case errors.As(err, &ee):
		if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
			res.Signal = int(ws.Signal())
		} else {
			res.ExitCode = ee.ExitCode()
		}
	default:
		res.Error = "wait: " + err.Error()
	}
	if res.ExitCode != 0 && res.Error == "" {
		res.Error = torchErrorMessage(filepath.Join(s.spec.AllocDir, ErrorFileName), s.started)
	}
	s.closeLogs(copiers, readEnds, writers)
	if s.orphan != "" {
		// No daemon will read it, and the path may be another task's now.
		s.logger.Warn("orphaned task exited; its exit status is not recorded", "why", s.orphan, "result", res.String())
		return supervisorOrphaned
	}
	if err := writeJSONAtomic(filepath.Join(s.dir, exitFileName), res, durable); err != nil {
		s.logger.Error("cannot record the exit status", "error", err)
		return supervisorFailed
	}
	s.logger.Info("task exited", "exit_code", res.ExitCode, "signal", res.Signal, "stopped", res.Stopped, "killed", res.Killed)
	return supervisorOK
}

// orphaned reports why the state directory no longer belongs to this
// supervisor: its lock file is gone (the allocation directory, or the whole
// data directory, was deleted or moved) or is another file (deleted and
// made again). It returns "" while the lock file is the one we hold, and
// for errors other than "not there", which prove nothing.
func (s *supervisor) orphaned() string {
	held, err := s.lock.Stat()
	if err != nil {
		return ""
	}
	path := filepath.Join(s.dir, lockFileName)
	cur, err := os.Stat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ENOTDIR):
		return path + " is gone: the allocation or data directory was deleted or moved"
	case err != nil:
		return ""
	case !os.SameFile(held, cur):
		return path + " is another file: the allocation directory was deleted and made again"
	}
	return ""
}

// abandon stops the task of a supervisor whose state directory is gone:
// no daemon can find the task again, so nothing could ever stop it. The
// stop is the plain one (SIGTERM, SIGKILL after the kill timeout); nothing
// more is written by path into the allocation directory, which may be
// another task's now.
func (s *supervisor) abandon(why string) {
	s.orphan = why
	for _, w := range s.writers {
		w.detach()
	}
	s.logger.Warn("stopping the task: no agent can find it again", "why", why)
	if s.note != nil {
		// Into the task's stderr log (the file we hold open, wherever it is now).
		_, _ = fmt.Fprintf(s.note, "gpumesh task supervisor: stopping the task: %s; no agent can find it again\n", why)
	}
	s.stop(stopRequest{Reason: "orphaned: " + why, RequestedAt: time.Now()})
}

// daemonGone stops the task of a daemon whose tasks do not outlive it
// (--daemon-pid), once, as a plain stop with a reason; the state directory
// is still the task's, so its exit is recorded as usual.
func (s *supervisor) daemonGone() {
	why := fmt.Sprintf("the agent that started it (pid %d) has exited, and its tasks do not outlive it", s.daemonPid)
	s.daemonPid = 0
	s.logger.Warn("stopping the task", "why", why)
	if s.note != nil {
		_, _ = fmt.Fprintf(s.note, "gpumesh task supervisor: stopping the task: %s\n", why)
	}
	s.stop(stopRequest{Reason: why, RequestedAt: time.Now()})
}

// closeLogs waits (bounded) for the copiers to reach EOF, then closes
// everything and marks the streams complete.
func (s *supervisor) closeLogs(copiers *sync.WaitGroup, readEnds []*os.File, writers []*rotatingWriter) {
	if s.note != nil {
		_ = s.note.Close()
		s.note = nil
	}
	done := make(chan struct{})
	go func() { copiers.Wait(); close(done) }()
	t := time.NewTimer(logDrainTimeout)
	select {
	case <-done:
	case <-t.C:
		s.logger.Warn("a process outside the task's group still holds its output; closing the logs")
		for _, r := range readEnds {
			_ = r.Close() // unblocks the copier's Read
		}
		<-done
	}
	t.Stop()
	for _, r := range readEnds {
		_ = r.Close()
	}
	for _, w := range writers {
		if err := w.Close(); err != nil {
			s.logger.Warn("closing log", "stream", w.stream, "error", err)
		}
	}
}

// copyLog copies one stream into its log files. A failing disk does not
// block the task: output is then read and dropped.
func (s *supervisor) copyLog(stream string, r io.Reader, w *rotatingWriter) {
	buf := make([]byte, logCopyBufBytes)
	failed := false
	for {
		n, err := r.Read(buf)
		if n > 0 && !failed {
			if _, werr := w.Write(buf[:n]); werr != nil {
				failed = true
				s.logger.Error("cannot write log; dropping further output", "stream", stream, "error", werr)
			}
		}
		if err != nil {
			return
		}
	}
}

// lookPath resolves argv[0] the way a shell would with the task's PATH: a
// name with a slash is taken as is (relative to the working directory), a
// bare name is searched in the PATH of env.
func lookPath(name string, env []string, dir string) (string, error) {
	if strings.Contains(name, "/") {
		p := name
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		if err := checkExecutable(p); err != nil {
			return "", fmt.Errorf("command %q: %w", name, err)
		}
		return p, nil
	}
	pathEnv, found := "", false
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			pathEnv, found = v, true
		}
	}
	if !found && env == nil {
		pathEnv = os.Getenv("PATH")
	}
	for _, d := range filepath.SplitList(pathEnv) {
		if d == "" {
			d = "."
		}
		if !filepath.IsAbs(d) {
			d = filepath.Join(dir, d)
		}
		p := filepath.Join(d, name)
		if checkExecutable(p) == nil {
			return p, nil
		}
	}
	return "", fmt.Errorf("command %q not found in the task's PATH %q", name, pathEnv)
}

func checkExecutable(p string) error {
	st, err := os.Stat(p)
	if err != nil {
		return err
	}
	if st.IsDir() {
		return fmt.Errorf("%s is a directory", p)
	}
	if st.Mode()&0o111 == 0 {
		return fmt.Errorf("%s is not executable", p)
	}
	return nil
}

// torchErrorMessage returns the message of a torchelastic error file
// written after start (by @record on an uncaught exception), or "".
func torchErrorMessage(path string, after time.Time) string {
	st, err := os.Stat(path)
	if err != nil || st.ModTime().Before(after.Add(-time.Second)) {
		return ""
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	var f struct {
		Message json.RawMessage `json:"message"`
	}
	if json.Unmarshal(data, &f) != nil {
		return ""
	}
	var msg string
	if json.Unmarshal(f.Message, &msg) != nil {
		var inner struct {
			Message string `json:"message"`
		}
		if json.Unmarshal(f.Message, &inner) != nil {
			return ""
		}
		msg = inner.Message
	}
	const maxLen = 1024
	if len(msg) > maxLen {
		msg = msg[:maxLen] + "..."
	}
	return msg
}
