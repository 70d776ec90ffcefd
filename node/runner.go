package node

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/node/driver"
)

// task is one running rank, whatever its driver.
type task interface {
	// Done is closed when the task has ended; Result is valid then.
	Done() <-chan struct{}
	Result() taskResult
	// Stop asks the task to end (SIGTERM, then SIGKILL after its kill
	// timeout, for processes) and returns at once.
	Stop(reason string, preemptDeadline time.Time)
}

// taskResult is how a task ended.
type taskResult struct {
	ExitCode int
	Failed   bool
	Message  string
	// Report is the driver's structured result (JSON-like), or nil.
	Report map[string]any
	// StartFailure is the Allocation.start_failure of a task that could
	// not start for a typed cause (consensus.StartCheckpointOtherJob), or
	// empty.
	StartFailure string
}

// adoptWait is how long a task adopted after a restart may be missing from
// this node's view before it is stopped as no longer placed here.
const adoptWait = 2 * time.Minute

// driverFunc starts the task of one allocation.
type driverFunc func(ctx context.Context, r *runner, alloc *pb.Allocation, job *pb.Job) (task, error)

// runner runs this node's allocations: it learns them from the local state
// (servers) or a watch stream (clients), starts and stops tasks through the
// drivers, and reports their state to the leader.
type runner struct {
	a      *Agent
	logger hclog.Logger

	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu      sync.Mutex
	tasks   map[string]*runningTask // by allocation ID
	pending map[string]*pb.Allocation
	// finished holds allocations that ended here until this node's view
	// shows them terminal: the leader may have committed the final status
	// (so it left pending) before this node's replica or watch stream has
	// it, and a reconcile in between must not start them again.
	finished map[string]bool
	// started holds allocations this agent process started (or adopted).
	started map[string]bool
	// unseen holds allocations whose tasks recover adopted and that no view
	// has shown yet: a restarted server's replica replays its log only as
	// the leader's commit index reaches it, so a view without them says
	// nothing for a while. They are not stopped as "no longer placed here"
	// before adoptWait has passed since the agent started.
	unseen    map[string]bool
	startedAt time.Time
	// placed holds this node's allocations in the last view (with their
	// task IDs); one that leaves the view (its job was purged) has its
	// ended task and its allocation directory removed.
	placed map[string]driver.TaskID
	kick   chan struct{}

	drivers map[string]driverFunc
	exec    execState // drivers.go

	uids *uidPool // dynamic task users (--task-user=dynamic), taskuids.go
}

type runningTask struct {
	alloc   *pb.Allocation
	task    task
	stopped bool
}

func newRunner(a *Agent) *runner {
	r := &runner{
		a:       a,
		logger:  a.logger.Named("runner"),
		tasks:   map[string]*runningTask{},
		pending: map[string]*pb.Allocation{},
		kick:    make(chan struct{}, 1),

		finished: map[string]bool{},
		started:  map[string]bool{},
		unseen:   map[string]bool{},
		placed:   map[string]driver.TaskID{},
		drivers:  map[string]driverFunc{},
	}
	rg := a.cfg.TaskUIDs
	if rg == (UIDRange{}) {
		rg = DefaultTaskUIDs
	}
	r.uids = newUIDPool(mustAbs(a.cfg.DataDir), rg) // reads the disk on first use
	r.ctx, r.cancel = context.WithCancel(a.ctx)
	r.startedAt = time.Now()
	registerDrivers(r)
	return r
}

func (r *runner) goFunc(f func()) {
	r.wg.Add(1)
	go func() { defer r.wg.Done(); f() }()
}

// run is the runner's main loop.
func (r *runner) run() {
	r.recover()
	r.goFunc(r.reportLoop)
	r.a.followState(r.ctx, r.logger, "allocation", r.watchLocal, r.watchRemote)
}

// watchLocal follows the local replica while this node holds one.
func (r *runner) watchLocal() error {
	var after uint64
	for r.a.raft.HasState() {
		st := r.a.raft.State()
		idx := st.Index()
		r.reconcile(watchEvent(st, r.a.nodeID))
		after = idx
		waitCtx, cancel := context.WithTimeout(r.ctx, 2*time.Second)
		_, err := st.WaitNode(waitCtx, r.a.nodeID, after)
		cancel()
		if r.ctx.Err() != nil {
			return r.ctx.Err()
		}
		if err != nil && err != context.DeadlineExceeded && waitCtx.Err() == nil {
			return err
		}
	}
	return nil
}

// watchRemote follows a server's watch stream for this node.
func (r *runner) watchRemote() error {
	addr := r.a.pickServer()
	if addr == "" {
		return ErrNoLeader
	}
	c, err := r.a.conns.client(addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(r.ctx)
	defer cancel()
	stream, err := c.Watch(ctx, &pb.WatchRequest{NodeId: r.a.nodeID})
	if err != nil {
		return err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		r.reconcile(ev)
		if r.a.raft != nil && r.a.raft.HasState() {
			return nil // switch to the local replica
		}
	}
}

// reconcile starts what should run here and stops what should not.
func (r *runner) reconcile(ev *pb.WatchEvent) {
	r.a.followRecord(ev.Nodes)
	jobs := map[string]*pb.Job{}
	for _, j := range ev.Jobs {
		jobs[j.Id] = j
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	want := map[string]bool{}
	placed := map[string]driver.TaskID{}
	for _, al := range ev.Allocations {
		if al.NodeId != r.a.nodeID {
			continue
		}
		placed[al.Id] = taskID(al)
		delete(r.unseen, al.Id)
		rt := r.tasks[al.Id]
		reported := r.pending[al.Id]
		if al.DesiredStatus == consensus.DesiredStop {
			switch {
			case rt != nil && !rt.stopped:
				rt.stopped = true
				r.logger.Info("stopping rank", "job", al.JobId, "generation", al.Generation, "rank", al.Rank)
				rt.task.Stop("stopped by the scheduler", r.a.drainDeadline())
			case rt == nil && !r.finished[al.Id] && !consensus.AllocTerminal(al.ClientStatus) && (reported == nil || !consensus.AllocTerminal(reported.ClientStatus)):
				// Never started here (or gone with an earlier agent process):
				// say so, so that the next generation need not wait for it.
				r.reportLocked(al, consensus.AllocStopped, 0, "stopped before it ran on this node", nil)
			}
			continue
		}
		want[al.Id] = true
		if consensus.AllocTerminal(al.ClientStatus) {
			delete(r.finished, al.Id)
			continue
		}
		if rt != nil || r.finished[al.Id] {
			continue
		}
		if reported != nil && consensus.AllocTerminal(reported.ClientStatus) {
			continue // finished here already; its final state is on its way
		}
		if al.ClientStatus == consensus.AllocRunning && !r.started[al.Id] {
			// It ran under an earlier agent process and did not survive the
			// restart (built-in ranks live inside the agent; exec ranks
			// would have been adopted by recover): report it lost rather
			// than start it a second time.
			r.reportLocked(al, consensus.AllocLost, -1, "the agent restarted and the rank's task is gone", nil)
			continue
		}
		job := jobs[al.JobId]
		if job == nil {
			continue
		}
		r.startLocked(al, job)
	}
	for id := range r.finished {
		if !want[id] {
			delete(r.finished, id)
		}
	}
	for id := range r.started {
		if !want[id] && r.tasks[id] == nil {
			delete(r.started, id)
		}
	}
	// Allocations that were in the last view and are gone from this one
	// were purged, with their job or as ended allocations of a live job
	// (consensus/gc.go): the exec driver forgets their ended tasks and
	// removes their allocation directories (logs included), built-in
	// ranks' directories (their log) go too, and so do the job's and
	// generation's directories once empty, so neither memory nor disk
	// grows with every job or restart. Only a departure seen here counts: a view that
	// is still catching up after a restart has never held them.
	gone := map[string]driver.TaskID{}
	for id, tid := range r.placed {
		if _, still := placed[id]; !still && r.tasks[id] == nil {
			gone[id] = tid
		}
	}
	r.placed = placed
	if len(gone) > 0 {
		r.removePurgedLocked(gone)
	}
	// Anything running that the cluster no longer wants (job purged) stops;
	// an adopted task only once the view had time to catch up.
	for id, rt := range r.tasks {
		if r.unseen[id] && time.Since(r.startedAt) < adoptWait {
			continue
		}
		if !want[id] && !rt.stopped {
			rt.stopped = true
			rt.task.Stop("no longer placed here", r.a.drainDeadline())
		}
	}
}

// removePurgedLocked removes what purged allocations left on this node:
// ended exec tasks (through the driver) and built-in ranks' directories,
// then the emptied generation and job directories.
func (r *runner) removePurgedLocked(gone map[string]driver.TaskID) {
	d := r.createdExecDriver()
	byAlloc := map[string]*driver.Handle{}
	if d != nil {
		for _, h := range d.List() {
			byAlloc[h.Spec().AllocID] = h
		}
	}
	root := mustAbs(r.a.cfg.DataDir)
	for id, tid := range gone {
		dir := driver.AllocDir(root, tid)
		if h := byAlloc[id]; h != nil {
			if _, done := h.Result(); !done {
				continue
			}
			if err := d.Remove(h.ID()); err != nil {
				r.logger.Warn("removing a purged allocation's task", "task", h.ID(), "error", err)
				continue
			}
		} else if _, err := os.Stat(filepath.Join(dir, builtinLogName)); err == nil {
			if err := os.RemoveAll(dir); err != nil {
				r.logger.Warn("removing a purged built-in rank's directory", "dir", dir, "error", err)
				continue
			}
		}
		// The generation's and the job's directories, if nothing else is
		// left in them (os.Remove refuses a directory that is not empty).
		gen := filepath.Dir(dir)
		if os.Remove(gen) == nil {
			_ = os.Remove(filepath.Dir(gen))
		}
	}
}

func (r *runner) startLocked(al *pb.Allocation, job *pb.Job) {
	drv := r.drivers[job.Spec.GetType()]
	if drv == nil {
		r.reportLocked(al, consensus.AllocFailed, -1, fmt.Sprintf("this node has no %q driver", job.Spec.GetType()), nil)
		return
	}
	if err := masterPortFree(job.Spec.GetType(), al); err != nil {
		r.logger.Warn("rank not started: its MASTER_PORT is taken", "job", al.JobId, "generation", al.Generation, "rank", al.Rank, "port", al.MasterPort, "error", err)
		r.reportLocked(al, consensus.AllocFailed, -1, fmt.Sprintf("MASTER_PORT %d is in use on this host by a process outside gpumesh (%v)", al.MasterPort, err), nil)
		r.pending[al.Id].StartFailure = consensus.StartMasterPortBusy
		return
	}
	t, err := drv(r.ctx, r, proto.Clone(al).(*pb.Allocation), job)
	if err != nil {
		r.logger.Error("rank failed to start", "job", al.JobId, "rank", al.Rank, "error", err)
		r.reportLocked(al, consensus.AllocFailed, -1, "failed to start: "+err.Error(), nil)
		return
	}
	r.started[al.Id] = true
	r.logger.Info("rank started", "job", al.JobId, "generation", al.Generation, "rank", al.Rank, "world", al.WorldSize)
	rt := &runningTask{alloc: al, task: t}
	r.tasks[al.Id] = rt
	r.reportLocked(al, consensus.AllocRunning, 0, "", nil)
	if ports := portsOf(t); ports != nil {
		r.pending[al.Id].Ports = ports
	}
	r.goFunc(func() { r.waitTask(rt) })
}

// masterPortFree checks, for rank 0 of an exec job and for a service's
// replica (each its own torchrun world of one), that its MASTER_PORT can be
// listened on here: the torchrun environment's rendezvous store listens
// there, and the scheduler reserves ports only against its own jobs, so a
// process outside gpumesh holding the port would fail the rank (and count
// as the job's failure, or the replica's). A busy port is reported as a
// start failure the scheduler places again with another port. The probe
// closes the port before the rank starts; a process taking it in between
// still fails the rank, as before.
func masterPortFree(jobType string, al *pb.Allocation) error {
	if al.MasterPort <= 0 || !(jobType == "exec" && al.Rank == 0 || jobType == jobspec.TypeService) {
		return nil
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(int(al.MasterPort))))
	if err != nil {
		if errors.Is(err, syscall.EADDRINUSE) {
			return err
		}
		return nil // not a busy port (no IPv6, say): let the rank try
	}
	ln.Close()
	return nil
}

func (r *runner) waitTask(rt *runningTask) {
	select {
	case <-rt.task.Done():
	case <-r.ctx.Done():
		return // shutting down: the task is left to the next start (exec) or lost
	}
	res := rt.task.Result()
	if res.Report == nil {
		res.Report = r.a.clientCollectivesReport(rt.alloc) // the PyTorch backend's collectives
	}
	r.mu.Lock() // rt.stopped is reconcile's, under r.mu
	st := consensus.AllocComplete
	switch {
	case res.StartFailure != "":
		st = consensus.AllocFailed
	case rt.stopped:
		st = consensus.AllocStopped
	case res.Failed || res.ExitCode != 0:
		st = consensus.AllocFailed
	}
	r.logger.Info("rank ended", "job", rt.alloc.JobId, "generation", rt.alloc.Generation, "rank", rt.alloc.Rank, "status", st, "exit_code", res.ExitCode, "message", res.Message)
	delete(r.tasks, rt.alloc.Id)
	r.finished[rt.alloc.Id] = true
	r.reportLocked(rt.alloc, st, res.ExitCode, res.Message, res.Report)
	if res.StartFailure != "" {
		r.pending[rt.alloc.Id].StartFailure = res.StartFailure
	}
	r.mu.Unlock()
}

// reportLocked queues a status update for the leader.
func (r *runner) reportLocked(al *pb.Allocation, status string, exit int, msg string, report map[string]any) {
	up := &pb.Allocation{
		Id:           al.Id,
		JobId:        al.JobId,
		Generation:   al.Generation,
		Rank:         al.Rank,
		NodeId:       al.NodeId,
		ClientStatus: status,
		ExitCode:     int32(exit),
		Message:      msg,
	}
	now := timestamppb.Now()
	if status == consensus.AllocRunning {
		up.StartTime = now
	} else {
		up.FinishTime = now
	}
	if report != nil {
		if s, err := structpb.NewStruct(report); err == nil {
			up.Result = s
		} else {
			r.logger.Warn("driver report is not JSON-like", "error", err)
		}
	}
	if prev, ok := r.pending[al.Id]; ok && prev.StartTime != nil && up.StartTime == nil {
		up.StartTime = prev.StartTime
	}
	r.pending[al.Id] = up
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

// reportLoop sends queued updates to the leader in batches, retrying
// until they are committed.
func (r *runner) reportLoop() {
	cs := &controlServer{a: r.a}
	for {
		select {
		case <-r.ctx.Done():
			return
		case <-r.kick:
		}
		for {
			r.mu.Lock()
			batch := make([]*pb.Allocation, 0, len(r.pending))
			for _, up := range r.pending {
				batch = append(batch, up)
			}
			r.mu.Unlock()
			if len(batch) == 0 {
				break
			}
			ctx, cancel := context.WithTimeout(r.ctx, 15*time.Second)
			_, err := cs.UpdateAllocations(ctx, &pb.UpdateAllocationsRequest{Allocations: batch})
			cancel()
			if r.ctx.Err() != nil {
				return
			}
			if err != nil {
				r.logger.Warn("could not report allocation status; retrying", "error", err)
				select {
				case <-r.ctx.Done():
					return
				case <-time.After(500 * time.Millisecond):
				}
				continue
			}
			r.mu.Lock()
			for _, up := range batch {
				if cur := r.pending[up.Id]; cur == up {
					delete(r.pending, up.Id)
				}
			}
			r.mu.Unlock()
		}
	}
}

// stopAll stops every task (drain), with the preemption deadline.
func (r *runner) stopAll(reason string, deadline time.Time) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rt := range r.tasks {
		if !rt.stopped {
			rt.stopped = true
			rt.task.Stop(reason, deadline)
		}
	}
}

func (r *runner) shutdown() {
	if r.a.cfg.Dev {
		// A dev cluster's tasks do not outlive it.
		r.stopAll("dev cluster stopping", time.Now().Add(3*time.Second))
		deadline := time.After(5 * time.Second)
		r.mu.Lock()
		var waits []<-chan struct{}
		for _, rt := range r.tasks {
			waits = append(waits, rt.task.Done())
		}
		r.mu.Unlock()
		for _, w := range waits {
			select {
			case <-w:
			case <-deadline:
			}
		}
	}
	r.cancel()
	r.wg.Wait()
	r.closeDrivers()
}

// openLogs opens a local rank's log for streaming.
func (r *runner) openLogs(ctx context.Context, req *pb.LogsRequest) (logStream, error) {
	return openTaskLogs(ctx, r, req)
}
