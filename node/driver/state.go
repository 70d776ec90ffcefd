package driver

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"path/filepath"
	"time"
)

// Files in a task's state directory (<alloc dir>/.gpumesh). All are written
// atomically (temporary file, rename); exit.json is also fsynced.
const (
	specFileName   = "spec.json"       // by the driver, before the supervisor starts
	stateFileName  = "state.json"      // by the supervisor, once the task runs
	exitFileName   = "exit.json"       // by the supervisor when the task ended (or the driver: lost)
	stopFileName   = "stop.json"       // by the driver, then SIGTERM to the supervisor
	lockFileName   = "supervisor.lock" // flock held for the supervisor's whole life
	supLogFileName = "supervisor.log"  // the supervisor's own stdout and stderr
)

// stateVersion is bumped on incompatible changes of these files.
const stateVersion = 1

// specFile is spec.json: the resolved spec (absolute directories, defaults
// filled) and its hash.
type specFile struct {
	Version  int      `json:"version"`
	AllocDir string   `json:"alloc_dir"`
	Spec     TaskSpec `json:"spec"`
	Hash     string   `json:"hash"`
}

// taskState is state.json: the identity of the running processes.
type taskState struct {
	Version         int       `json:"version"`
	BootID          string    `json:"boot_id"`
	SupervisorPid   int       `json:"supervisor_pid"`
	SupervisorStart uint64    `json:"supervisor_start_ticks"`
	TaskPid         int       `json:"task_pid"`
	TaskPgid        int       `json:"task_pgid"`
	TaskStart       uint64    `json:"task_start_ticks"`
	SpecHash        string    `json:"spec_hash"`
	StartedAt       time.Time `json:"started_at"`
}

// stopRequest is stop.json.
type stopRequest struct {
	KillAt      time.Time `json:"kill_at,omitzero"`
	Force       bool      `json:"force,omitempty"`
	Reason      string    `json:"reason,omitempty"`
	RequestedAt time.Time `json:"requested_at"`
}

// readyMsg is the line the supervisor writes on its ready pipe.
type readyMsg struct {
	OK      bool   `json:"ok"`
	Error   string `json:"error,omitempty"`
	TaskPid int    `json:"task_pid,omitempty"`
}

func specHash(s TaskSpec) string {
	b, _ := json.Marshal(s)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func stateDirOf(allocDir string) string { return filepath.Join(allocDir, StateDirName) }
