package driver

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Driver runs tasks as supervised child processes and finds them again
// after a daemon restart. It is safe for concurrent use.
type Driver struct {
	cfg    Config
	logger hclog.Logger

	startMu sync.Mutex // serializes Start and Recover per driver

	mu       sync.Mutex
	tasks    map[TaskID]*Handle
	shutdown bool

	shutdownCh chan struct{}
	wg         sync.WaitGroup
}

// New returns a Driver. Call Recover before starting tasks, so that tasks
// left running by a previous daemon are found (and never started twice).
func New(cfg Config) (*Driver, error) {
	if !supported {
		return nil, ErrUnsupportedOS
	}
	cfg = cfg.withDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Join(cfg.DataDir, "alloc"), 0o755); err != nil {
		return nil, fmt.Errorf("%w: create %s: %v", ErrInvalidConfig, cfg.DataDir, err)
	}
	return &Driver{
		cfg:        cfg,
		logger:     cfg.Logger.Named("exec-driver"),
		tasks:      make(map[TaskID]*Handle),
		shutdownCh: make(chan struct{}),
	}, nil
}

// Shutdown stops watching tasks and returns once the driver's goroutines
// have. Tasks keep running (a daemon restart must not stop them); a new
// Driver's Recover finds them. Handles of running tasks are stale after
// it: their Done channel does not close. Safe to call more than once.
func (d *Driver) Shutdown() error {
	d.mu.Lock()
	if !d.shutdown {
		d.shutdown = true
		close(d.shutdownCh)
	}
	d.mu.Unlock()
	d.wg.Wait()
	return nil
}

func (d *Driver) goFunc(f func()) {
	d.wg.Add(1)
	go func() {
		defer d.wg.Done()
		f()
	}()
}

// Get returns the handle of a task this driver started or recovered.
func (d *Driver) Get(id TaskID) (*Handle, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	h, ok := d.tasks[id]
	return h, ok
}

// List returns the handles the driver knows, sorted by job, generation
// and rank.
func (d *Driver) List() []*Handle {
	d.mu.Lock()
	hs := make([]*Handle, 0, len(d.tasks))
	for _, h := range d.tasks {
		hs = append(hs, h)
	}
	d.mu.Unlock()
	sortHandles(hs)
	return hs
}

func sortHandles(hs []*Handle) {
	slices.SortFunc(hs, func(a, b *Handle) int {
		switch {
		case a.id.JobID != b.id.JobID:
			if a.id.JobID < b.id.JobID {
				return -1
			}
			return 1
		case a.id.Generation != b.id.Generation:
			if a.id.Generation < b.id.Generation {
				return -1
			}
			return 1
		default:
			return a.id.Rank - b.id.Rank
		}
	})
}

// resolve validates a spec and fills its defaults and absolute paths.
func (d *Driver) resolve(spec TaskSpec) (TaskSpec, string, error) {
	if err := spec.ID.Validate(); err != nil {
		return spec, "", err
	}
	if len(spec.Command) == 0 || spec.Command[0] == "" {
		return spec, "", fmt.Errorf("%w: task %s: command is required (argv, program first)", ErrInvalidSpec, spec.ID)
	}
	if spec.KillTimeout < 0 {
		return spec, "", fmt.Errorf("%w: task %s: kill_timeout must be >= 0, got %s", ErrInvalidSpec, spec.ID, spec.KillTimeout)
	}
	if err := checkUser(spec.User); err != nil {
		return spec, "", fmt.Errorf("task %s: %w", spec.ID, err)
	}
	allocDir := AllocDir(d.cfg.DataDir, spec.ID)
	spec.Command = slices.Clone(spec.Command)
	spec.Env = slices.Clone(spec.Env)
	switch {
	case spec.Dir == "":
		spec.Dir = allocDir
	case !filepath.IsAbs(spec.Dir):
		spec.Dir = filepath.Join(allocDir, spec.Dir)
	}
	switch {
	case spec.LogDir == "":
		spec.LogDir = filepath.Join(allocDir, LogDirName)
	case !filepath.IsAbs(spec.LogDir):
		spec.LogDir = filepath.Join(allocDir, spec.LogDir)
	}
	if spec.KillTimeout == 0 {
		spec.KillTimeout = d.cfg.KillTimeout
	}
	if spec.Logs == (LogConfig{}) {
		spec.Logs = d.cfg.Logs
	}
	if err := spec.Logs.Validate(); err != nil {
		return spec, "", fmt.Errorf("%w: task %s: %v", ErrInvalidSpec, spec.ID, err)
	}
	return spec, allocDir, nil
}

// traverseOnly makes the folders between dataDir and allocDir (alloc, the
// job's, the generation's) mode 0711 whatever the umask (the systemd unit's
// is 0027): a task running as another user reaches its own directory
// through them but cannot list them, so no job learns another's IDs.
func traverseOnly(dataDir, allocDir string) error {
	for p := filepath.Dir(allocDir); len(p) > len(dataDir) && strings.HasPrefix(p, dataDir); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			return err
		}
	}
	return nil
}

// Start runs a task. It returns once the command has started (a command
// that cannot be started is an ErrStartFailed error). Start is idempotent
// for a task that is already running with the same spec: it returns its
// handle, even one left by an earlier daemon. A different spec in the same
// allocation is ErrAlreadyRunning; an allocation whose task already ran is
// ErrTaskExited (a restart is a new generation).
func (d *Driver) Start(ctx context.Context, spec TaskSpec) (*Handle, error) {
	spec, allocDir, err := d.resolve(spec)
	if err != nil {
		return nil, err
	}
	hash := specHash(spec)
	d.startMu.Lock()
	defer d.startMu.Unlock()
	if d.isShutdown() {
		return nil, ErrShutdown
	}
	if h, ok := d.Get(spec.ID); ok {
		return d.existing(h, hash)
	}
	stateDir := stateDirOf(allocDir)
	// The allocation directory and those above it are traversable, so that
	// a task running as another user (TaskSpec.User) reaches its own; the
	// state directory is the driver's alone.
	if err := os.MkdirAll(allocDir, 0o755); err != nil {
		return nil, fmt.Errorf("%w: task %s: create %s: %v", ErrInvalidSpec, spec.ID, allocDir, err)
	}
	if err := traverseOnly(d.cfg.DataDir, allocDir); err != nil {
		return nil, fmt.Errorf("%w: task %s: %v", ErrInvalidSpec, spec.ID, err)
	}
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		return nil, fmt.Errorf("%w: task %s: create %s: %v", ErrInvalidSpec, spec.ID, stateDir, err)
	}
	lock, err := os.OpenFile(filepath.Join(stateDir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%w: task %s: %v", ErrSupervisor, spec.ID, err)
	}
	defer lock.Close()
	free, err := flockTry(lock)
	if err != nil {
		return nil, fmt.Errorf("%w: task %s: lock: %v", ErrSupervisor, spec.ID, err)
	}
	if !free || exists(filepath.Join(stateDir, specFileName)) {
		// A supervisor runs it (left by an earlier daemon) or it ran before.
		if free {
			_ = unix.Flock(int(lock.Fd()), unix.LOCK_UN)
		}
		h, err := d.recoverDir(ctx, stateDir)
		if err != nil {
			return nil, err
		}
		d.track(h)
		return d.existing(h, hash)
	}

	sf := specFile{Version: stateVersion, AllocDir: allocDir, Spec: spec, Hash: hash}
	if err := writeJSONAtomic(filepath.Join(stateDir, specFileName), sf, ephemeral); err != nil {
		return nil, fmt.Errorf("%w: task %s: write spec: %v", ErrSupervisor, spec.ID, err)
	}
	h, err := d.spawn(ctx, stateDir, sf, lock)
	if err != nil {
		return nil, err
	}
	d.track(h)
	return h, nil
}

// existing answers Start for a task the driver already has.
func (d *Driver) existing(h *Handle, hash string) (*Handle, error) {
	if _, done := h.Result(); done {
		res, _ := h.Result()
		return nil, fmt.Errorf("%w: task %s in %s (%s); start it again as a new generation", ErrTaskExited, h.id, h.allocDir, res)
	}
	if h.specHash != hash {
		return nil, fmt.Errorf("%w: task %s runs with a different spec in %s; stop it first", ErrAlreadyRunning, h.id, h.allocDir)
	}
	return h, nil
}

func (d *Driver) isShutdown() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.shutdown
}

func (d *Driver) track(h *Handle) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, ok := d.tasks[h.id]; !ok {
		d.tasks[h.id] = h
	}
}

// spawn starts the supervisor for a task whose spec.json is written and
// whose lock we hold, and waits for its report.
func (d *Driver) spawn(ctx context.Context, stateDir string, sf specFile, lock *os.File) (*Handle, error) {
	id := sf.Spec.ID
	forget := func() { _ = os.Remove(filepath.Join(stateDir, specFileName)) }
	logF, err := os.OpenFile(filepath.Join(stateDir, supLogFileName), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		forget()
		return nil, fmt.Errorf("%w: task %s: %v", ErrSupervisor, id, err)
	}
	defer logF.Close()
	readyR, readyW, err := os.Pipe()
	if err != nil {
		forget()
		return nil, fmt.Errorf("%w: task %s: %v", ErrSupervisor, id, err)
	}
	defer readyR.Close()
	args := append(slices.Clone(d.cfg.SupervisorArgs), "--dir", stateDir, "--lock-fd", "3", "--ready-fd", "4",
		"--dir-check", d.cfg.DirCheckInterval.String())
	if d.cfg.StopWithDaemon {
		if ps, err := readProcStat(os.Getpid()); err == nil {
			args = append(args, "--daemon-pid", strconv.Itoa(os.Getpid()), "--daemon-start", strconv.FormatUint(ps.Start, 10))
		}
	}
	cmd := &exec.Cmd{
		Path:       d.cfg.SupervisorPath,
		Args:       append([]string{d.cfg.SupervisorPath}, args...),
		Dir:        stateDir,
		Stdout:     logF,
		Stderr:     logF,
		ExtraFiles: []*os.File{lock, readyW},
		// A session of its own: no signal aimed at the daemon's process
		// group or terminal reaches it, so it outlives the daemon.
		SysProcAttr: &syscall.SysProcAttr{Setsid: true},
	}
	err = cmd.Start()
	_ = readyW.Close()
	if err != nil {
		forget()
		return nil, fmt.Errorf("%w: task %s: start %s: %v (is SupervisorPath the gpumesh binary?)", ErrSupervisor, id, d.cfg.SupervisorPath, err)
	}
	// The supervisor holds the lock through its inherited descriptor now.
	_ = lock.Close()
	proc := &supProc{pid: cmd.Process.Pid, cmd: cmd}
	if ps, err := readProcStat(proc.pid); err == nil {
		proc.start = ps.Start
	}
	if f, err := pidfdOpen(proc.pid); err == nil {
		proc.pidfd = f
	}

	deadline := time.Now().Add(d.cfg.StartTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = readyR.SetReadDeadline(deadline)
	stopRead := context.AfterFunc(ctx, func() { _ = readyR.SetReadDeadline(time.Now()) })
	var msg readyMsg
	derr := json.NewDecoder(readyR).Decode(&msg)
	stopRead()

	h := d.newHandle(stateDir, sf)
	if derr != nil || !msg.OK {
		if derr != nil {
			// No word from the supervisor: kill it (its task dies with it)
			// and record the task as lost.
			_ = proc.signal(unix.SIGKILL)
		}
		_ = cmd.Wait()
		proc.close()
		// finishLost keeps the supervisor's own exit.json when there is one.
		res, _ := d.finishLost(h, "the supervisor did not report the start: "+errString(derr, msg.Error))
		h.setResult(res)
		if derr != nil {
			return nil, fmt.Errorf("%w: task %s: %v (see %s)", ErrSupervisor, id, derr, filepath.Join(stateDir, supLogFileName))
		}
		return nil, fmt.Errorf("%w: task %s: %s", ErrStartFailed, id, msg.Error)
	}
	var st taskState
	if err := readJSON(filepath.Join(stateDir, stateFileName), &st); err != nil {
		d.logger.Warn("task started but its state file is unreadable", "task", id, "error", err)
	}
	h.state = st
	h.proc = proc
	d.logger.Info("task started", "task", id, "pid", st.TaskPid, "supervisor_pid", proc.pid)
	d.goFunc(func() { d.watch(h) })
	return h, nil
}

func errString(err error, s string) string {
	if err != nil {
		return err.Error()
	}
	return s
}

func (d *Driver) newHandle(stateDir string, sf specFile) *Handle {
	return &Handle{
		d:        d,
		id:       sf.Spec.ID,
		spec:     sf.Spec,
		specHash: sf.Hash,
		allocDir: sf.AllocDir,
		stateDir: stateDir,
		done:     make(chan struct{}),
	}
}

// watch waits for the supervisor to exit and publishes the task's result.
func (d *Driver) watch(h *Handle) {
	defer h.proc.close()
	if !h.proc.wait(d.shutdownCh, d.cfg.PollInterval) {
		return // shut down: the task runs on for the next daemon
	}
	h.proc.reap()
	res := h.readExit()
	if res == nil {
		r, err := d.finishLost(h, "the supervisor exited without recording the task's exit (killed?)")
		if err != nil {
			d.logger.Error("cannot record lost task", "task", h.id, "error", err)
		}
		res = &r
	}
	d.logger.Info("task exited", "task", h.id, "result", res.String())
	h.setResult(*res)
}

// finishLost records a task whose supervisor is gone without an exit
// status: kill what is left of its process group, write exit.json, mark its
// logs complete.
func (d *Driver) finishLost(h *Handle, why string) (ExitResult, error) {
	if r := h.readExit(); r != nil {
		return *r, nil
	}
	var st taskState
	if readJSON(filepath.Join(h.stateDir, stateFileName), &st) == nil && st.BootID == bootID() && st.TaskPgid > 0 {
		if killGroupIfOurs(st.TaskPgid, st.SupervisorPid) {
			d.logger.Warn("killed the orphaned process group of a lost task", "task", h.id, "pgid", st.TaskPgid)
		}
	}
	res := ExitResult{ExitCode: -1, Lost: true, Error: why, StartedAt: st.StartedAt, FinishedAt: time.Now()}
	err := writeJSONAtomic(filepath.Join(h.stateDir, exitFileName), res, durable)
	_ = markLogClosed(h.spec.LogDir, Stdout)
	_ = markLogClosed(h.spec.LogDir, Stderr)
	return res, err
}

// Recover finds the tasks under the data directory: those still running
// (their supervisor alive, checked by its lock, PID and start time) are
// watched again; those that ended while no daemon watched come back with
// their recorded result (or as lost, if their supervisor died too). It
// returns every task found, sorted; errors name the directories it could not
// read and do not stop the others.
func (d *Driver) Recover(ctx context.Context) ([]*Handle, error) {
	d.startMu.Lock()
	defer d.startMu.Unlock()
	if d.isShutdown() {
		return nil, ErrShutdown
	}
	specs, err := filepath.Glob(filepath.Join(d.cfg.DataDir, "alloc", "*", "*", "*", StateDirName, specFileName))
	if err != nil {
		return nil, err
	}
	var errs []error
	var hs []*Handle
	for _, p := range specs {
		stateDir := filepath.Dir(p)
		h, err := d.recoverDir(ctx, stateDir)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		d.mu.Lock()
		if old, ok := d.tasks[h.id]; ok {
			h = old // already known: keep one watcher per task
		} else {
			d.tasks[h.id] = h
		}
		d.mu.Unlock()
		hs = append(hs, h)
	}
	sortHandles(hs)
	return hs, errors.Join(errs...)
}

// recoverDir builds the handle of the task in stateDir.
func (d *Driver) recoverDir(ctx context.Context, stateDir string) (*Handle, error) {
	var sf specFile
	if err := readJSON(filepath.Join(stateDir, specFileName), &sf); err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrNotFound, stateDir, err)
	}
	if sf.Version != stateVersion {
		return nil, fmt.Errorf("%w: %s: state version %d, this binary speaks %d", ErrNotFound, stateDir, sf.Version, stateVersion)
	}
	if h, ok := d.Get(sf.Spec.ID); ok {
		return h, nil
	}
	h := d.newHandle(stateDir, sf)
	if r := h.readExit(); r != nil {
		reapExited(stateDir)
		h.setResult(*r)
		return h, nil
	}
	lock, err := os.OpenFile(filepath.Join(stateDir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %v", ErrSupervisor, stateDir, err)
	}
	free, err := flockTry(lock)
	if err != nil {
		_ = lock.Close()
		return nil, fmt.Errorf("%w: %s: lock: %v", ErrSupervisor, stateDir, err)
	}
	if free {
		// No supervisor: it ended (exit.json may have appeared since we
		// looked) or died. Holding the lock, nothing can start meanwhile.
		res, err := d.finishLost(h, "the supervisor is gone and recorded no exit (killed, or the machine restarted)")
		_ = lock.Close()
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrSupervisor, stateDir, err)
		}
		h.setResult(res)
		return h, nil
	}
	_ = lock.Close()

	// A supervisor is alive. It writes state.json just after the start;
	// wait for it (or for the exit) if we came in between.
	var st taskState
	deadline := time.Now().Add(d.cfg.StartTimeout)
	for {
		if r := h.readExit(); r != nil {
			h.setResult(*r)
			return h, nil
		}
		err := readJSON(filepath.Join(stateDir, stateFileName), &st)
		if err == nil {
			break
		}
		if !errors.Is(err, fs.ErrNotExist) || time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %s: a supervisor holds the lock but its state is not readable: %v", ErrSupervisor, stateDir, err)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-d.shutdownCh:
			return nil, ErrShutdown
		case <-time.After(d.cfg.PollInterval):
		}
	}
	if st.BootID != bootID() {
		return nil, fmt.Errorf("%w: %s: state from another boot, yet its lock is held", ErrSupervisor, stateDir)
	}
	h.state = st
	proc := &supProc{pid: st.SupervisorPid, start: st.SupervisorStart}
	if f, err := pidfdOpen(proc.pid); err == nil {
		proc.pidfd = f
	}
	// Check the identity after opening the pidfd: if it matches now, the
	// pidfd is the supervisor we recorded, not a process that got its PID.
	if !sameProcess(proc.pid, proc.start) {
		proc.close()
		// The lock was held a moment ago, so the supervisor is exiting
		// now: wait for its exit file or for the lock to drop. Never
		// declare a task lost while its lock is held.
		return d.awaitEnd(ctx, h)
	}
	h.proc = proc
	d.logger.Info("reattached to running task", "task", h.id, "pid", st.TaskPid, "supervisor_pid", proc.pid)
	d.goFunc(func() { d.watch(h) })
	return h, nil
}

// awaitEnd waits for a task whose supervisor is going away: its exit file,
// or a free lock (then it is lost), within StartTimeout.
func (d *Driver) awaitEnd(ctx context.Context, h *Handle) (*Handle, error) {
	deadline := time.Now().Add(d.cfg.StartTimeout)
	for {
		if r := h.readExit(); r != nil {
			reapExited(h.stateDir)
			h.setResult(*r)
			return h, nil
		}
		lock, err := os.OpenFile(filepath.Join(h.stateDir, lockFileName), os.O_CREATE|os.O_RDWR, 0o600)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %v", ErrSupervisor, h.stateDir, err)
		}
		free, err := flockTry(lock)
		if err == nil && free {
			res, lerr := d.finishLost(h, "the supervisor is gone and recorded no exit")
			_ = lock.Close()
			if lerr != nil {
				return nil, fmt.Errorf("%w: %s: %v", ErrSupervisor, h.stateDir, lerr)
			}
			h.setResult(res)
			return h, nil
		}
		_ = lock.Close()
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%w: %s: its lock is held but the recorded supervisor (pid %d) is not running; another process holds the lock", ErrSupervisor, h.stateDir, h.state.SupervisorPid)
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-d.shutdownCh:
			return nil, ErrShutdown
		case <-time.After(d.cfg.PollInterval):
		}
	}
}

// Remove deletes the allocation directory of a task that has ended (its
// logs go with it). It refuses a running task.
func (d *Driver) Remove(id TaskID) error {
	if err := id.Validate(); err != nil {
		return err
	}
	d.startMu.Lock()
	defer d.startMu.Unlock()
	allocDir := AllocDir(d.cfg.DataDir, id)
	if h, ok := d.Get(id); ok {
		if _, done := h.Result(); !done {
			return fmt.Errorf("%w: task %s; stop it before removing it", ErrStillRunning, id)
		}
	} else if exists(filepath.Join(stateDirOf(allocDir), specFileName)) &&
		!exists(filepath.Join(stateDirOf(allocDir), exitFileName)) {
		return fmt.Errorf("%w: task %s has no exit status; Recover it first", ErrStillRunning, id)
	}
	if err := os.RemoveAll(allocDir); err != nil {
		return err
	}
	d.mu.Lock()
	delete(d.tasks, id)
	d.mu.Unlock()
	return nil
}

// Logs opens a stream of a task's logs by ID, for any generation still on
// disk (see the package function Logs).
func (d *Driver) Logs(ctx context.Context, id TaskID, stream string, follow bool, offset int64) (*LogReader, error) {
	if err := id.Validate(); err != nil {
		return nil, err
	}
	logDir := filepath.Join(AllocDir(d.cfg.DataDir, id), LogDirName)
	var sf specFile
	if err := readJSON(filepath.Join(stateDirOf(AllocDir(d.cfg.DataDir, id)), specFileName), &sf); err == nil {
		logDir = sf.Spec.LogDir
	} else if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: task %s has no allocation on this node", ErrNotFound, id)
	}
	return Logs(ctx, logDir, stream, follow, offset)
}

// Handle is a started or recovered task.
type Handle struct {
	d        *Driver
	id       TaskID
	spec     TaskSpec
	specHash string
	allocDir string
	stateDir string
	state    taskState // zero if the task never ran or had ended when found
	proc     *supProc  // nil when the task had ended when found

	stopMu sync.Mutex // serializes RequestStop

	done     chan struct{}
	mu       sync.Mutex
	result   ExitResult
	finished bool
}

// ID is the task's ID.
func (h *Handle) ID() TaskID { return h.id }

// Spec is the task's resolved spec (defaults and absolute paths filled).
func (h *Handle) Spec() TaskSpec { return h.spec }

// AllocDir is the task's allocation directory.
func (h *Handle) AllocDir() string { return h.allocDir }

// Pid is the task's process ID (also its process group ID); 0 if it never
// ran or had ended when found.
func (h *Handle) Pid() int { return h.state.TaskPid }

// SupervisorPid is the supervisor's process ID; 0 as for Pid.
func (h *Handle) SupervisorPid() int { return h.state.SupervisorPid }

// StartedAt is when the command started.
func (h *Handle) StartedAt() time.Time { return h.state.StartedAt }

// Done is closed once the task has exited and Result is set.
func (h *Handle) Done() <-chan struct{} { return h.done }

// Result is the task's exit result; ok is false while it runs.
func (h *Handle) Result() (res ExitResult, ok bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.result, h.finished
}

// Wait blocks until the task exits or ctx is done.
func (h *Handle) Wait(ctx context.Context) (ExitResult, error) {
	select {
	case <-h.done:
		res, _ := h.Result()
		return res, nil
	case <-ctx.Done():
		return ExitResult{}, ctx.Err()
	}
}

func (h *Handle) setResult(r ExitResult) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.finished {
		return
	}
	h.result, h.finished = r, true
	close(h.done)
}

func (h *Handle) readExit() *ExitResult {
	var r ExitResult
	if err := readJSON(filepath.Join(h.stateDir, exitFileName), &r); err != nil {
		return nil
	}
	return &r
}

// RequestStop asks the task to stop and returns at once: the stop request
// is recorded in the allocation, and the supervisor sends SIGTERM to the
// task's process group, writes the SIGKILL time (Unix seconds) to
// GPUMESH_PREEMPT_DEADLINE_FILE, and sends SIGKILL to the group at that
// time if it still runs. The supervisor does the timing, so a stop finishes
// even if the daemon dies meanwhile. A later request can only bring the
// SIGKILL earlier.
func (h *Handle) RequestStop(opts StopOptions) error {
	if _, done := h.Result(); done {
		return nil
	}
	if h.proc == nil {
		return fmt.Errorf("%w: task %s", ErrNotFound, h.id)
	}
	if h.d.isShutdown() {
		return fmt.Errorf("%w: task %s: recover it with a new driver to stop it", ErrShutdown, h.id)
	}
	now := time.Now()
	req := stopRequest{Force: opts.Force, Reason: opts.Reason, RequestedAt: now}
	switch {
	case opts.Force:
		req.KillAt = now
	case !opts.Deadline.IsZero():
		req.KillAt = opts.Deadline
	case opts.Timeout > 0:
		req.KillAt = now.Add(opts.Timeout)
	default:
		req.KillAt = now.Add(h.spec.KillTimeout)
	}
	// Signals do not queue: two quick requests may reach the supervisor as
	// one SIGTERM, and it reads only the newest stop.json. So the file
	// keeps the earliest kill time asked for, and the first reason.
	h.stopMu.Lock()
	defer h.stopMu.Unlock()
	var prev stopRequest
	if readJSON(filepath.Join(h.stateDir, stopFileName), &prev) == nil {
		if prev.Reason != "" {
			req.Reason = prev.Reason
		}
		req.Force = req.Force || prev.Force
		if !prev.KillAt.IsZero() && prev.KillAt.Before(req.KillAt) {
			req.KillAt = prev.KillAt
		}
	}
	if err := writeJSONAtomic(filepath.Join(h.stateDir, stopFileName), req, ephemeral); err != nil {
		return fmt.Errorf("task %s: record stop request: %w", h.id, err)
	}
	if err := h.proc.signal(unix.SIGTERM); err != nil && !errors.Is(err, unix.ESRCH) {
		return fmt.Errorf("task %s: signal supervisor %d: %w", h.id, h.proc.pid, err)
	}
	return nil
}

// Stop asks the task to stop (see RequestStop) and waits for its exit or
// for ctx.
func (h *Handle) Stop(ctx context.Context, opts StopOptions) (ExitResult, error) {
	if err := h.RequestStop(opts); err != nil {
		return ExitResult{}, err
	}
	return h.Wait(ctx)
}

// Logs opens one of the task's log streams (see the package function Logs).
func (h *Handle) Logs(ctx context.Context, stream string, follow bool, offset int64) (*LogReader, error) {
	return Logs(ctx, h.spec.LogDir, stream, follow, offset)
}

// reapExited reaps the recorded supervisor of an ended task if it is an
// unreaped child of this process (a driver of this process that was shut
// down started it, or this process adopted it as a subreaper). Elsewhere
// init reaps it.
func reapExited(stateDir string) {
	var st taskState
	if readJSON(filepath.Join(stateDir, stateFileName), &st) != nil || st.BootID != bootID() || st.SupervisorPid <= 0 {
		return
	}
	ps, err := readProcStat(st.SupervisorPid)
	if err != nil || ps.State != 'Z' || ps.Start != st.SupervisorStart {
		return
	}
	if f, err := pidfdOpen(st.SupervisorPid); err == nil {
		pidfdReap(f)
		_ = f.Close()
	}
}

// supProc is a task's supervisor process.
type supProc struct {
	pid   int
	start uint64
	pidfd *os.File  // nil where pidfd_open is missing
	cmd   *exec.Cmd // set when this process started it (so must reap it)
	once  sync.Once
}

func (p *supProc) signal(sig syscall.Signal) error {
	if p.pidfd != nil {
		return pidfdSignal(p.pidfd, sig)
	}
	if p.cmd != nil {
		return p.cmd.Process.Signal(sig)
	}
	if !sameProcess(p.pid, p.start) {
		return unix.ESRCH
	}
	return unix.Kill(p.pid, sig)
}

// wait blocks until the supervisor exits (true) or cancel closes (false).
func (p *supProc) wait(cancel <-chan struct{}, poll time.Duration) bool {
	if p.pidfd != nil {
		err := pidfdWait(p.pidfd, cancel)
		if err == nil {
			return true
		}
		if !errors.Is(err, errNotPollable) {
			return false
		}
	}
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		if !sameProcess(p.pid, p.start) {
			return true
		}
		select {
		case <-cancel:
			return false
		case <-t.C:
		}
	}
}

// reap collects the exited supervisor's status if it is our child.
func (p *supProc) reap() {
	switch {
	case p.cmd != nil:
		_ = p.cmd.Wait()
	case p.pidfd != nil:
		pidfdReap(p.pidfd)
	}
}

func (p *supProc) close() {
	p.once.Do(func() {
		if p.pidfd != nil {
			_ = p.pidfd.Close()
		}
	})
}

// StopAll stops every running task the driver knows (with opts; Force for
// SIGKILL at once) and waits for them, or for ctx. It is for agents that
// stop their tasks on exit (a dev cluster) and for tests.
func (d *Driver) StopAll(ctx context.Context, opts StopOptions) error {
	var errs []error
	hs := d.List()
	for _, h := range hs {
		if _, done := h.Result(); done {
			continue
		}
		if err := h.RequestStop(opts); err != nil {
			errs = append(errs, err)
		}
	}
	for _, h := range hs {
		if _, err := h.Wait(ctx); err != nil {
			errs = append(errs, fmt.Errorf("task %s: %w", h.id, err))
		}
	}
	return errors.Join(errs...)
}

// KillAll finds every task under a data directory, running or left by
// daemons that are gone, and kills them with SIGKILL, waiting until they have
// exited. Tests that kill agents call it so that no task outlives them.
func KillAll(ctx context.Context, dataDir string) error {
	d, err := New(Config{DataDir: dataDir})
	if err != nil {
		return err
	}
	defer d.Shutdown()
	_, rerr := d.Recover(ctx)
	return errors.Join(rerr, d.StopAll(ctx, StopOptions{Force: true, Reason: "killed"}))
}
