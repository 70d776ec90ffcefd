package driver

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
)

// SupervisorCommand is the hidden subcommand of the gpumesh binary that runs
// SupervisorMain. The driver starts every task as
// "<SupervisorPath> task-supervise --dir <task state dir>".
const SupervisorCommand = "task-supervise"

// Defaults.
const (
	DefaultKillTimeout  = 30 * time.Second
	DefaultMaxFileBytes = 10 << 20
	DefaultMaxFiles     = 10
	DefaultStartTimeout = 30 * time.Second
	DefaultPollInterval = 200 * time.Millisecond
	// DefaultDirCheckInterval is how often a supervisor checks that its
	// allocation directory is still there (see Config.DirCheckInterval).
	DefaultDirCheckInterval = 2 * time.Second
)

// Names inside an allocation directory.
const (
	// StateDirName is the driver's private directory inside an allocation
	// directory: spec, state, exit status, supervisor lock and log.
	StateDirName = ".gpumesh"
	// LogDirName is the default log directory inside an allocation directory.
	LogDirName = "logs"
	// DeadlineFileName is the file, in the allocation directory, that appears
	// when the task is asked to stop: it holds the Unix time (seconds) at
	// which the task's process group gets SIGKILL.
	DeadlineFileName = "preempt_deadline"
	// ErrorFileName is where torch.distributed.elastic's @record writes an
	// uncaught exception (TORCHELASTIC_ERROR_FILE).
	ErrorFileName = "error.json"
)

// Log stream names.
const (
	Stdout = "stdout"
	Stderr = "stderr"
)

// LogConfig is the size-based rotation of one task's stdout and stderr.
type LogConfig struct {
	// MaxFileBytes is the size in bytes at which a log file is closed and the
	// next one begun. Files are cut at exactly this size.
	MaxFileBytes int64 `json:"max_file_bytes"`
	// MaxFiles is how many files of each stream are kept; older ones are
	// deleted. At most MaxFiles*MaxFileBytes bytes per stream stay on disk.
	MaxFiles int `json:"max_files"`
}

// DefaultLogConfig keeps 10 files of 10 MiB per stream (Nomad's defaults).
func DefaultLogConfig() LogConfig {
	return LogConfig{MaxFileBytes: DefaultMaxFileBytes, MaxFiles: DefaultMaxFiles}
}

// Validate checks the rotation settings.
func (c LogConfig) Validate() error {
	if c.MaxFileBytes < 1 {
		return fmt.Errorf("%w: logs: max_file_bytes must be >= 1, got %d", ErrInvalidConfig, c.MaxFileBytes)
	}
	if c.MaxFiles < 1 {
		return fmt.Errorf("%w: logs: max_files must be >= 1, got %d", ErrInvalidConfig, c.MaxFiles)
	}
	return nil
}

// Config configures a Driver.
type Config struct {
	// DataDir is the node's data directory; allocations live under
	// <DataDir>/alloc/<job>/<generation>/<rank>/. Required.
	DataDir string
	// SupervisorPath is the binary started as each task's supervisor; it
	// must run SupervisorMain for SupervisorArgs. Default: this executable.
	SupervisorPath string
	// SupervisorArgs come before "--dir DIR" on the supervisor's command
	// line. Default: []string{SupervisorCommand}.
	SupervisorArgs []string
	// KillTimeout is the default time between SIGTERM and SIGKILL when a
	// task is stopped and its spec sets none. Default 30 s.
	KillTimeout time.Duration
	// Logs is the default log rotation of tasks whose spec sets none.
	Logs LogConfig
	// StartTimeout bounds how long Start waits for the supervisor to report
	// that the command started. Default 30 s.
	StartTimeout time.Duration
	// PollInterval is how often liveness is polled where pidfd is missing,
	// and how often a following log reader looks for new data. Default 200 ms.
	PollInterval time.Duration
	// DirCheckInterval is how often each task's supervisor checks that its
	// lock file (<alloc dir>/.gpumesh/supervisor.lock) is still the one it
	// holds; when it is gone or replaced (the data directory was deleted),
	// no daemon can find the task again, so the supervisor stops the task
	// and exits. Default 2 s.
	DirCheckInterval time.Duration
	// StopWithDaemon makes each supervisor stop its task (as a plain stop
	// does) when the process that started it has exited, checked every
	// DirCheckInterval: for dev clusters and tests, whose tasks must not
	// outlive them however they end. Default false: tasks outlive the
	// daemon, whose next start finds them again.
	StopWithDaemon bool
	// Logger receives the driver's logs. Default: a null logger.
	Logger hclog.Logger
}

// DefaultConfig returns a Config with every default filled except DataDir.
func DefaultConfig() Config {
	exe, _ := os.Executable()
	return Config{
		SupervisorPath:   exe,
		SupervisorArgs:   []string{SupervisorCommand},
		KillTimeout:      DefaultKillTimeout,
		Logs:             DefaultLogConfig(),
		StartTimeout:     DefaultStartTimeout,
		PollInterval:     DefaultPollInterval,
		DirCheckInterval: DefaultDirCheckInterval,
		Logger:           hclog.NewNullLogger(),
	}
}

// withDefaults fills zero fields from DefaultConfig.
func (c Config) withDefaults() Config {
	d := DefaultConfig()
	if c.SupervisorPath == "" {
		c.SupervisorPath = d.SupervisorPath
	}
	if c.SupervisorArgs == nil {
		c.SupervisorArgs = d.SupervisorArgs
	}
	if c.KillTimeout == 0 {
		c.KillTimeout = d.KillTimeout
	}
	if c.Logs == (LogConfig{}) {
		c.Logs = d.Logs
	}
	if c.StartTimeout == 0 {
		c.StartTimeout = d.StartTimeout
	}
	if c.PollInterval == 0 {
		c.PollInterval = d.PollInterval
	}
	if c.DirCheckInterval == 0 {
		c.DirCheckInterval = d.DirCheckInterval
	}
	if c.Logger == nil {
		c.Logger = d.Logger
	}
	return c
}

// Validate checks the configuration.
func (c Config) Validate() error {
	if c.DataDir == "" {
		return fmt.Errorf("%w: data_dir is required (the node's data directory)", ErrInvalidConfig)
	}
	if !filepath.IsAbs(c.DataDir) {
		return fmt.Errorf("%w: data_dir must be an absolute path, got %q", ErrInvalidConfig, c.DataDir)
	}
	if c.SupervisorPath == "" {
		return fmt.Errorf("%w: supervisor_path is required (the gpumesh binary)", ErrInvalidConfig)
	}
	if c.KillTimeout < 0 {
		return fmt.Errorf("%w: kill_timeout must be >= 0, got %s", ErrInvalidConfig, c.KillTimeout)
	}
	if c.StartTimeout <= 0 {
		return fmt.Errorf("%w: start_timeout must be > 0, got %s", ErrInvalidConfig, c.StartTimeout)
	}
	if c.PollInterval <= 0 {
		return fmt.Errorf("%w: poll_interval must be > 0, got %s", ErrInvalidConfig, c.PollInterval)
	}
	if c.DirCheckInterval <= 0 {
		return fmt.Errorf("%w: dir_check_interval must be > 0, got %s", ErrInvalidConfig, c.DirCheckInterval)
	}
	return c.Logs.Validate()
}

// TaskID names one rank of one generation of a job: the key of an
// allocation directory.
type TaskID struct {
	JobID      string `json:"job_id"`
	Generation uint64 `json:"generation"`
	Rank       int    `json:"rank"`
}

func (id TaskID) String() string {
	return id.JobID + "/" + strconv.FormatUint(id.Generation, 10) + "/" + strconv.Itoa(id.Rank)
}

var jobIDRe = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// Validate checks that the ID makes a safe directory path.
func (id TaskID) Validate() error {
	if !jobIDRe.MatchString(id.JobID) {
		return fmt.Errorf("%w: job ID %q must be 1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit", ErrInvalidSpec, id.JobID)
	}
	if id.Rank < 0 {
		return fmt.Errorf("%w: rank must be >= 0, got %d", ErrInvalidSpec, id.Rank)
	}
	return nil
}

// AllocDir is the allocation directory of a task under a node's data
// directory: <dataDir>/alloc/<job>/<generation>/<rank>.
func AllocDir(dataDir string, id TaskID) string {
	return filepath.Join(dataDir, "alloc", id.JobID, strconv.FormatUint(id.Generation, 10), strconv.Itoa(id.Rank))
}

// DeadlineFile is the path of the stop deadline file of an allocation
// directory (GPUMESH_PREEMPT_DEADLINE_FILE).
func DeadlineFile(allocDir string) string { return filepath.Join(allocDir, DeadlineFileName) }

// TaskSpec is what Start runs.
type TaskSpec struct {
	// ID names the task and its allocation directory.
	ID TaskID `json:"id"`
	// AllocID is an optional opaque allocation ID, kept and returned.
	AllocID string `json:"alloc_id,omitempty"`
	// Command is the argv; Command[0] is looked up in the PATH of Env.
	Command []string `json:"command"`
	// Env is the task's complete environment ("KEY=VALUE"), usually from
	// BuildEnv. Nil means the supervisor's environment (the daemon's).
	Env []string `json:"env"`
	// Dir is the working directory. Empty means the allocation directory; a
	// relative path is taken inside the allocation directory. Created if
	// missing.
	Dir string `json:"dir,omitempty"`
	// LogDir holds stdout.N and stderr.N. Empty means <alloc dir>/logs.
	LogDir string `json:"log_dir,omitempty"`
	// KillTimeout is the time between SIGTERM and SIGKILL on Stop. Zero
	// means the driver's KillTimeout.
	KillTimeout time.Duration `json:"kill_timeout"`
	// Logs is the rotation of stdout and stderr. Zero means the driver's.
	Logs LogConfig `json:"logs"`
	// User runs the command as another account (LookupUser). Nil means the
	// daemon's own user. The allocation directory is made writable by the
	// user's group and the working directory the user's.
	User *TaskUser `json:"user,omitempty"`
}

// StopOptions tune Handle.Stop.
type StopOptions struct {
	// Timeout is the grace between SIGTERM and SIGKILL. Zero means the
	// task's KillTimeout.
	Timeout time.Duration
	// Deadline, when set, is when SIGKILL comes (a spot notice's time minus
	// a margin); it overrides Timeout. A past deadline kills at once.
	Deadline time.Time
	// Force skips SIGTERM: SIGKILL at once.
	Force bool
	// Reason is recorded in the exit result ("preempted", "job stopped").
	Reason string
}

// ExitResult is how a task ended.
type ExitResult struct {
	// ExitCode is the process's exit status, or -1 if a signal ended it or it
	// never started or its end was not seen.
	ExitCode int `json:"exit_code"`
	// Signal is the signal that ended the process, 0 if none.
	Signal int `json:"signal,omitempty"`
	// StartedAt and FinishedAt bound the task's life (zero if it never
	// started).
	StartedAt  time.Time `json:"started_at,omitzero"`
	FinishedAt time.Time `json:"finished_at,omitzero"`
	// Stopped is true when the task ended after a stop request.
	Stopped bool `json:"stopped,omitempty"`
	// StopReason is StopOptions.Reason of the first stop request.
	StopReason string `json:"stop_reason,omitempty"`
	// Killed is true when the kill timeout ran out and SIGKILL was sent.
	Killed bool `json:"killed,omitempty"`
	// Error is set when the task could not be started, or its supervisor
	// vanished so the real exit status is unknown ("lost"), or the task
	// wrote a torchelastic error file (its message).
	Error string `json:"error,omitempty"`
	// Lost is true when the supervisor died without recording the exit.
	Lost bool `json:"lost,omitempty"`
}

// Success reports whether the task exited 0.
func (r ExitResult) Success() bool {
	return r.ExitCode == 0 && r.Signal == 0 && !r.Lost && r.Error == ""
}

func (r ExitResult) String() string {
	switch {
	case r.Lost:
		return "lost: " + r.Error
	case r.ExitCode == -1 && r.Signal == 0 && r.Error != "":
		return "failed: " + r.Error
	case r.Signal != 0:
		return fmt.Sprintf("killed by signal %d", r.Signal)
	case r.Error != "":
		return fmt.Sprintf("exit code %d: %s", r.ExitCode, r.Error)
	default:
		return fmt.Sprintf("exit code %d", r.ExitCode)
	}
}
