package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/driver"
)

// registerDrivers installs the task drivers of this node.
func registerDrivers(r *runner) {
	r.drivers["exec"] = startExec
	r.drivers["service"] = startService
	registerBuiltinDrivers(r)
}

// execState is the exec driver of a runner, created on first use (it
// needs the data dir to exist).
type execState struct {
	mu      sync.Mutex
	created bool
	d       *driver.Driver
	err     error
}

// execDriver returns the runner's exec driver, creating it on first use.
func (r *runner) execDriver() (*driver.Driver, error) {
	es := &r.exec
	es.mu.Lock()
	defer es.mu.Unlock()
	if !es.created {
		es.created = true
		es.d, es.err = newExecDriver(r)
	}
	return es.d, es.err
}

// createdExecDriver returns the exec driver if it was created, else nil.
func (r *runner) createdExecDriver() *driver.Driver {
	r.exec.mu.Lock()
	defer r.exec.mu.Unlock()
	return r.exec.d
}

func newExecDriver(r *runner) (*driver.Driver, error) {
	cfg := driver.DefaultConfig()
	dir, err := filepath.Abs(r.a.cfg.DataDir)
	if err != nil {
		return nil, err
	}
	cfg.DataDir = dir
	cfg.Logger = r.logger.Named("exec")
	// A dev cluster's tasks do not outlive it, even when its process is
	// killed (a test run killed by its timeout) and its data dir stays.
	cfg.StopWithDaemon = r.a.cfg.Dev
	if SupervisorPath != "" {
		cfg.SupervisorPath = SupervisorPath
	}
	return driver.New(cfg)
}

// SupervisorPath, when set, is the binary that runs exec tasks' supervisors
// (`gpumesh task-supervise`); by default the running executable. Tests that
// run agents inside a test binary point it at a built gpumesh.
var SupervisorPath string

func (r *runner) closeDrivers() {
	es := &r.exec
	es.mu.Lock()
	defer es.mu.Unlock()
	if es.d != nil {
		// Tasks keep running under their supervisors; the next agent
		// start recovers them.
		_ = es.d.Shutdown()
	}
	es.created, es.d, es.err = false, nil, nil
}

func taskID(al *pb.Allocation) driver.TaskID {
	return driver.TaskID{JobID: al.JobId, Generation: al.Generation, Rank: int(al.Rank)}
}

// execTask adapts a driver handle to task.
type execTask struct {
	h *driver.Handle
	// prefetch is the checkpoint prefetch's record once it is done.
	prefetch atomic.Pointer[PrefetchRecord]
	// allocDir holds the rank's checkpoint progress (jobs with a
	// checkpoint block only; empty otherwise).
	allocDir string
	// ckpt is the rank's checkpoint state (nil without a checkpoint block
	// or local API), set before the rank can end: a refusal of another
	// job's checkpoints makes the rank's end a start failure.
	ckpt *ckptTask
}

func (t *execTask) Done() <-chan struct{} { return t.h.Done() }

func (t *execTask) Result() taskResult {
	res, _ := t.h.Result()
	tr := taskResult{ExitCode: res.ExitCode, Failed: !res.Success()}
	switch {
	case res.Lost:
		tr.Message = "lost: " + res.Error
	case res.Error != "":
		tr.Message = res.Error
	case res.Signal != 0:
		tr.Message = fmt.Sprintf("killed by signal %d", res.Signal)
	}
	if res.Stopped && res.StopReason != "" && tr.Message == "" {
		tr.Message = res.StopReason
	}
	if t.ckpt != nil {
		if err := t.ckpt.refusal(); err != nil {
			tr.Failed, tr.Message, tr.StartFailure = true, err.Error(), consensus.StartCheckpointOtherJob
		}
	}
	if p := t.prefetch.Load(); p != nil {
		tr.Report = map[string]any{"checkpoint_prefetch": p.report()}
	}
	if prog := readCheckpointProgress(t.allocDir); prog != nil {
		if tr.Report == nil {
			tr.Report = map[string]any{}
		}
		tr.Report["checkpoint"] = prog
	}
	return tr
}

func (t *execTask) Stop(reason string, deadline time.Time) {
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Hour)
		defer cancel()
		_, _ = t.h.Stop(ctx, driver.StopOptions{Reason: reason, Deadline: deadline})
	}()
}

func startExec(ctx context.Context, r *runner, al *pb.Allocation, job *pb.Job) (task, error) {
	d, err := r.execDriver()
	if err != nil {
		return nil, err
	}
	spec := job.Spec
	id := taskID(al)
	gpus := intsOf(al.Gpus) // ranks sharing a GPU (ranks_per_gpu) see the same one
	allocDir := driver.AllocDir(mustAbs(r.a.cfg.DataDir), id)
	user, err := r.taskUser(spec.GetExec().GetUser(), al.JobId)
	if err != nil {
		return nil, err
	}
	env, err := driver.BuildEnv(driver.RankEnv{
		JobID:          al.JobId,
		Generation:     al.Generation,
		RestartCount:   int(al.RestartCount),
		MaxRestarts:    int(spec.GetRestart().GetAttempts()),
		Rank:           int(al.Rank),
		WorldSize:      int(al.WorldSize),
		LocalRank:      int(al.LocalRank),
		LocalWorldSize: int(al.LocalWorldSize),
		GroupRank:      int(al.GroupRank),
		GroupWorldSize: int(al.GroupWorldSize),
		MasterAddr:     al.MasterAddr,
		MasterPort:     int(al.MasterPort),
		GPUs:           gpus,
		NodeAddr:       r.a.rpcAddr,
		AllocDir:       allocDir,
	}, userEnv(os.Environ(), user, allocDir), spec.GetExec().GetEnv())
	if err != nil {
		return nil, err
	}
	env = withEnv(env, r.a.localAPIEnv(al)) // the PyTorch backend's way to its agent
	ts := driver.TaskSpec{
		ID:      id,
		AllocID: al.Id,
		Command: spec.GetExec().GetCommand(),
		Env:     append(env, checkpointEnv(spec, env)...),
		User:    user,
	}
	if kt := spec.GetKillTimeout(); kt != nil {
		ts.KillTimeout = kt.AsDuration()
	}
	h, err := d.Start(ctx, ts)
	if err != nil {
		return nil, err
	}
	t := &execTask{h: h}
	if spec.GetCheckpoint() != nil {
		t.allocDir = allocDir
		r.startPrefetch(t, spec, ts.Env, al, allocDir)
	}
	return t, nil
}

// ErrTaskUser means a job names an account this agent does not run tasks as.
var ErrTaskUser = errors.New("task user")

// taskUser is the account an exec task of job runs as: the job's exec.user
// when the agent allows it, else the agent's TaskUser; nil (the agent's own
// user) when neither names one or the agent is not root. "dynamic" is an
// account of the job's own (DynamicTaskUser).
func (r *runner) taskUser(asked, job string) (*driver.TaskUser, error) {
	cfg := r.a.cfg
	name := cfg.TaskUser
	if asked != "" && asked != name {
		if !slices.Contains(cfg.TaskUsersAllowed, asked) {
			allowed := append([]string{orDefault(cfg.TaskUser, "the agent's user")}, cfg.TaskUsersAllowed...)
			return nil, fmt.Errorf("%w: the job asks to run as %q, which this agent does not allow (allowed: %s); name one of those in exec.user, or start the agents with --task-users-allowed=%s",
				ErrTaskUser, asked, strings.Join(allowed, ", "), asked)
		}
		name = asked
	}
	if os.Geteuid() != 0 {
		if asked != "" {
			if self, err := driver.CurrentUser(); err == nil && self.Name == asked {
				return nil, nil
			}
			return nil, fmt.Errorf("%w: the job asks to run as %q, but this agent is not root and runs tasks as its own user", ErrTaskUser, asked)
		}
		return nil, nil
	}
	if name == "" {
		return nil, nil
	}
	if name == DynamicTaskUser {
		return r.uids.user(job)
	}
	u, err := driver.LookupUser(name)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrTaskUser, err)
	}
	return u, nil
}

// userEnv is the base environment of a task run as u: HOME and TMPDIR
// (its allocation directory, since service accounts have no home), USER
// and LOGNAME name u. The job's own env may still set them.
func userEnv(base []string, u *driver.TaskUser, allocDir string) []string {
	if u == nil {
		return base
	}
	out := make([]string, 0, len(base)+3)
	for _, kv := range base {
		k, _, _ := strings.Cut(kv, "=")
		if k != "HOME" && k != "USER" && k != "LOGNAME" && k != "TMPDIR" {
			out = append(out, kv)
		}
	}
	// TMPDIR too: files a task leaves in a shared /tmp would be readable by
	// the next job that runs as the same account.
	return append(out, "HOME="+allocDir, "USER="+u.Name, "LOGNAME="+u.Name, "TMPDIR="+allocDir)
}

func orDefault(s, def string) string {
	if s == "" {
		return def
	}
	return s
}

func mustAbs(p string) string {
	if a, err := filepath.Abs(p); err == nil {
		return a
	}
	return p
}

// recover adopts exec tasks that outlived a previous agent process, so a
// daemon restart neither orphans nor duplicates them.
func (r *runner) recover() {
	d, err := r.execDriver()
	if err != nil {
		r.logger.Error("exec driver unavailable", "error", err)
		return
	}
	ctx, cancel := context.WithTimeout(r.ctx, 30*time.Second)
	defer cancel()
	hs, err := d.Recover(ctx)
	if err != nil {
		r.logger.Warn("recovering tasks", "error", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, h := range hs {
		id := h.ID()
		allocID := h.Spec().AllocID
		if allocID == "" {
			continue
		}
		al := &pb.Allocation{Id: allocID, JobId: id.JobID, Generation: id.Generation, Rank: int32(id.Rank), NodeId: r.a.nodeID}
		rt := &runningTask{alloc: al, task: &execTask{h: h}}
		r.tasks[allocID] = rt
		r.started[allocID] = true
		r.unseen[allocID] = true
		if _, done := h.Result(); !done {
			r.logger.Info("recovered a running task", "job", id.JobID, "generation", id.Generation, "rank", id.Rank, "pid", h.Pid())
		}
		r.goFunc(func() { r.waitTask(rt) })
	}
}

// openTaskLogs opens a local rank's stdout or stderr.
func openTaskLogs(ctx context.Context, r *runner, req *pb.LogsRequest) (logStream, error) {
	id := driver.TaskID{JobID: req.JobId, Generation: req.Generation, Rank: int(req.Rank)}
	stream := "stdout"
	if req.Stderr {
		stream = "stderr"
	}
	if ls, ok := openBuiltinLogs(r, id, stream, req.Offset); ok {
		return ls, nil
	}
	d, err := r.execDriver()
	if err != nil {
		return nil, err
	}
	lr, err := d.Logs(ctx, id, stream, req.Follow, req.Offset)
	if err != nil {
		return nil, fmt.Errorf("logs of %s: %w", id, errNotFoundWrap(err))
	}
	return lr, nil
}

func errNotFoundWrap(err error) error {
	if os.IsNotExist(err) || errors.Is(err, driver.ErrNotFound) || errors.Is(err, driver.ErrNoLogs) {
		return fmt.Errorf("%w: %v", errNotFound, err)
	}
	return err
}

// drainDeadline is when this node's tasks must be gone, if it drains.
func (a *Agent) drainDeadline() time.Time {
	if a.raft != nil && a.raft.HasState() {
		if n := a.raft.State().Node(a.nodeID); n != nil && n.DrainDeadline != nil {
			return n.DrainDeadline.AsTime()
		}
	}
	return time.Time{}
}
