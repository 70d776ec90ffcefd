package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/checkpoint"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/driver"
	"github.com/gpumesh/gpumesh/node/localapi"
)

// ckptService serves the checkpoint requests of this node's ranks over the
// local API (localapi.Checkpointer): a rank writes its part once, into a
// file the agent hands it, and the agent stores it; at start it is handed
// the copy the agent prefetched when the rank's process started.
type ckptService struct {
	a   *Agent
	log hclog.Logger

	mu    sync.Mutex
	tasks map[localapi.RankID]*ckptTask
}

var _ localapi.Checkpointer = (*ckptService)(nil)

func newCkptService(a *Agent) *ckptService {
	return &ckptService{a: a, log: a.logger.Named("checkpoint"), tasks: map[localapi.RankID]*ckptTask{}}
}

// ckptTask is one rank's checkpoint state.
type ckptTask struct {
	uri      string
	keep     int
	owner    checkpoint.Owner // the job, checked against the newest checkpoint
	env      []string         // the task's environment (S3 settings, credentials)
	cacheDir string           // prefetched copies and S3 spool files
	log      hclog.Logger

	open  sync.Once
	store *checkpoint.Checkpoints
	err   error

	// The owner check (verify): done once it decided. refused holds its
	// refusal (checkpoint.ErrOtherJob), warning its warning about a
	// checkpoint that names no job; both are read without vmu.
	vmu      sync.Mutex
	verified bool
	refused  atomic.Pointer[error]
	warning  atomic.Pointer[string]

	// prefetched is closed once the prefetch ended; pre is set before.
	prefetched chan struct{}
	pre        prefetchResult
	fmu        sync.Mutex // guards pre.f against close while it is duplicated
	closed     bool
}

// prefetchResult is what a rank's prefetch got.
type prefetchResult struct {
	m    checkpoint.Manifest
	part int
	f    *os.File // nil when nothing was fetched
	rec  PrefetchRecord
}

// checkpoints opens the job's store on first use and checks, before the
// rank may read or write anything in it, that its newest checkpoint is the
// job's own (verify).
func (t *ckptTask) checkpoints(ctx context.Context) (*checkpoint.Checkpoints, error) {
	t.open.Do(func() {
		st, err := checkpoint.Open(ctx, t.uri, s3ConfigFromEnv(t.env))
		if err != nil {
			t.err = err
			return
		}
		t.store, t.err = checkpoint.New(st, checkpoint.Config{Keep: t.keep, Logger: t.log})
	})
	if t.err != nil {
		return nil, t.err
	}
	if err := t.verify(ctx); err != nil {
		return nil, err
	}
	return t.store, nil
}

// verify checks once whether the job may use the checkpoints under its
// URI: a store whose newest checkpoint another job wrote is refused for
// good (the rank's requests fail with the refusal, and the rank's start
// fails: startPrefetch); one that names no job is used with a warning. A
// store that cannot be read is tried again at the next request.
func (t *ckptTask) verify(ctx context.Context) error {
	t.vmu.Lock()
	defer t.vmu.Unlock()
	if t.verified {
		return t.refusal()
	}
	m, err := t.store.Latest(ctx)
	switch {
	case errors.Is(err, checkpoint.ErrNoCheckpoint):
	case err != nil:
		return err
	default:
		v, err := t.owner.Check(m)
		switch {
		case err != nil:
			err = fmt.Errorf("checkpoint.uri %s: %w", t.uri, err)
			t.refused.Store(&err)
			t.log.Error("refusing another job's checkpoints", "step", m.Step, "their_job", m.JobName, "their_id", m.Job, "error", err)
		case v == checkpoint.Unowned:
			w := fmt.Sprintf("resuming from the checkpoint of step %d under %s, which names no job (written before job names were recorded, or outside a job); "+
				"if it is not this job's, give the job a checkpoint.uri of its own", m.Step, t.uri)
			t.warning.Store(&w)
			t.log.Warn(w, "their_id", m.Job)
		case m.JobName != t.owner.Name && m.JobName != "":
			t.log.Info("continuing from another job's checkpoints, as checkpoint.resume_from asks", "step", m.Step, "their_job", m.JobName, "their_id", m.Job)
		}
	}
	t.verified = true
	return t.refusal()
}

// refusal is verify's refusal of the store, or nil.
func (t *ckptTask) refusal() error {
	if p := t.refused.Load(); p != nil {
		return *p
	}
	return nil
}

// add registers a starting rank of a job with a checkpoint block.
func (s *ckptService) add(r localapi.RankID, spec *pb.JobSpec, env []string, allocDir string) *ckptTask {
	t := s.newTask(r, spec, env, allocDir)
	t.prefetched = make(chan struct{})
	s.mu.Lock()
	if old := s.tasks[r]; old != nil {
		old.close()
	}
	s.tasks[r] = t
	s.mu.Unlock()
	return t
}

func (s *ckptService) newTask(r localapi.RankID, spec *pb.JobSpec, env []string, allocDir string) *ckptTask {
	return &ckptTask{
		uri: spec.GetCheckpoint().GetUri(), keep: int(spec.GetCheckpoint().GetKeep()), env: env,
		owner:    checkpoint.Owner{Name: spec.GetName(), ID: r.Job, ResumeFrom: spec.GetCheckpoint().GetResumeFrom()},
		cacheDir: checkpointCacheDir(allocDir),
		log:      s.log.With("job", r.Job, "generation", r.Generation, "rank", r.Rank),
	}
}

// remove forgets a rank whose process ended.
func (s *ckptService) remove(r localapi.RankID, t *ckptTask) {
	s.mu.Lock()
	if s.tasks[r] == t {
		delete(s.tasks, r)
	}
	s.mu.Unlock()
	t.close()
}

// close releases the prefetched copy once the prefetch has ended.
func (t *ckptTask) close() {
	if t.prefetched == nil {
		return
	}
	go func() {
		<-t.prefetched
		t.fmu.Lock()
		defer t.fmu.Unlock()
		t.closed = true
		if t.pre.f != nil {
			t.pre.f.Close()
		}
	}()
}

// task finds a rank's state. A rank this agent did not start (it outlived
// an agent restart) gets one from its job's spec and the agent's
// environment, without a prefetch.
func (s *ckptService) task(ctx context.Context, r localapi.RankID) (*ckptTask, error) {
	s.mu.Lock()
	t := s.tasks[r]
	s.mu.Unlock()
	if t != nil {
		return t, nil
	}
	cs := &controlServer{a: s.a}
	resp, err := cs.GetJob(ctx, &pb.GetJobRequest{Id: r.Job, Query: &pb.QueryOptions{Stale: true}})
	if err != nil {
		return nil, err
	}
	spec := resp.GetJob().GetSpec()
	if spec.GetCheckpoint().GetUri() == "" {
		return nil, fmt.Errorf("%w: job %s has no checkpoint block; add checkpoint: {uri: s3://bucket/prefix} to its spec", checkpoint.ErrInvalidConfig, r.Job)
	}
	env := os.Environ()
	for k, v := range spec.GetExec().GetEnv() {
		env = append(env, k+"="+v)
	}
	allocDir := driver.AllocDir(mustAbs(s.a.cfg.DataDir), driver.TaskID{JobID: r.Job, Generation: r.Generation, Rank: r.Rank})
	t = s.newTask(r, spec, env, allocDir)
	s.mu.Lock()
	if old := s.tasks[r]; old != nil {
		t = old
	} else {
		s.tasks[r] = t
	}
	s.mu.Unlock()
	return t, nil
}

func (s *ckptService) checkpoints(ctx context.Context, r localapi.RankID) (*ckptTask, *checkpoint.Checkpoints, error) {
	t, err := s.task(ctx, r)
	if err != nil {
		return nil, nil, err
	}
	c, err := t.checkpoints(ctx)
	return t, c, err
}

// CreatePart implements localapi.Checkpointer.
func (s *ckptService) CreatePart(ctx context.Context, r localapi.RankID, step int64) (localapi.CheckpointPart, error) {
	t, c, err := s.checkpoints(ctx, r)
	if err != nil {
		return nil, err
	}
	return c.CreatePart(step, r.Rank, t.cacheDir)
}

// Commit implements localapi.Checkpointer.
func (s *ckptService) Commit(ctx context.Context, r localapi.RankID, m checkpoint.Manifest) error {
	t, c, err := s.checkpoints(ctx, r)
	if err != nil {
		return err
	}
	m.Job, m.Generation, m.JobName = r.Job, r.Generation, t.owner.Name
	return c.Commit(ctx, m)
}

// Latest implements localapi.Checkpointer.
func (s *ckptService) Latest(ctx context.Context, r localapi.RankID) (checkpoint.Manifest, error) {
	_, c, err := s.checkpoints(ctx, r)
	if err != nil {
		return checkpoint.Manifest{}, err
	}
	return c.Latest(ctx)
}

// List implements localapi.Checkpointer.
func (s *ckptService) List(ctx context.Context, r localapi.RankID) ([]checkpoint.Manifest, error) {
	_, c, err := s.checkpoints(ctx, r)
	if err != nil {
		return nil, err
	}
	return c.List(ctx)
}

// loadPart is the part a rank of a world loads from m when it asks for
// none: its own of a sharded checkpoint saved by the same world size, else
// rank 0's.
func loadPart(m checkpoint.Manifest, rank, world int) int {
	if len(m.Parts) > 1 && m.WorldSize == world {
		return rank
	}
	return 0
}

// Open implements localapi.Checkpointer: the prefetched copy when it is of
// the step and part asked for, else the part fetched now.
func (s *ckptService) Open(ctx context.Context, r localapi.RankID, step int64, part, world int) (localapi.OpenedPart, error) {
	start := time.Now()
	t, c, err := s.checkpoints(ctx, r)
	if err != nil {
		return localapi.OpenedPart{}, err
	}
	var m checkpoint.Manifest
	if step < 0 {
		m, err = c.Latest(ctx)
	} else {
		m, err = c.Manifest(ctx, step)
	}
	if err != nil {
		return localapi.OpenedPart{}, err
	}
	if part < 0 {
		part = loadPart(m, r.Rank, world)
	}
	out := localapi.OpenedPart{Manifest: m, Part: part}
	if t.prefetched != nil {
		select {
		case <-t.prefetched:
		case <-ctx.Done():
			return localapi.OpenedPart{}, ctx.Err()
		}
		out.PrefetchSeconds = t.pre.rec.Seconds
		if f := t.prefetchedFile(m.Step, part); f != nil {
			out.File, out.Prefetched = f, true
			out.WaitSeconds = time.Since(start).Seconds()
			return out, nil
		}
	}
	if out.File, err = c.OpenPart(ctx, m, part, t.cacheDir); err != nil {
		return localapi.OpenedPart{}, err
	}
	out.WaitSeconds = time.Since(start).Seconds()
	return out, nil
}

// prefetchedFile returns a duplicate of the prefetched copy of (step,
// part), or nil; call it once the prefetch ended.
func (t *ckptTask) prefetchedFile(step int64, part int) *os.File {
	t.fmu.Lock()
	defer t.fmu.Unlock()
	p := t.pre
	if t.closed || p.f == nil || p.m.Step != step || p.part != part {
		return nil
	}
	fd, err := unix.Dup(int(p.f.Fd()))
	if err != nil {
		return nil
	}
	return os.NewFile(uintptr(fd), p.f.Name())
}

// prefetch fetches the part of the newest checkpoint the rank will load
// (its own of a sharded checkpoint of the same world size, else rank 0's)
// while the rank's process starts, and records how it went. It never fails
// the rank: errors are recorded and logged, and the rank's OPEN fetches the
// part itself.
func (t *ckptTask) prefetch(ctx context.Context, rank, world int) PrefetchRecord {
	defer close(t.prefetched)
	start := time.Now()
	res, err := t.fetchNewest(ctx, rank, world)
	res.rec.Seconds = time.Since(start).Seconds()
	if w := t.warning.Load(); w != nil {
		res.rec.Warning = *w
	}
	if err != nil {
		res = prefetchResult{rec: PrefetchRecord{Error: err.Error(), Seconds: res.rec.Seconds, Warning: res.rec.Warning}}
		t.log.Warn("checkpoint prefetch failed; the rank will fetch it when it loads", "error", err)
	} else if res.rec.Found {
		t.log.Info("checkpoint prefetched", "step", res.rec.Step, "part", res.rec.Part, "bytes", res.rec.Bytes, "seconds", res.rec.Seconds)
	}
	t.pre = res
	return res.rec
}

func (t *ckptTask) fetchNewest(ctx context.Context, rank, world int) (prefetchResult, error) {
	c, err := t.checkpoints(ctx)
	if err != nil {
		return prefetchResult{}, err
	}
	m, err := c.Latest(ctx)
	if err != nil {
		if errors.Is(err, checkpoint.ErrNoCheckpoint) {
			return prefetchResult{}, nil
		}
		return prefetchResult{}, err
	}
	part := loadPart(m, rank, world)
	f, err := c.OpenPart(ctx, m, part, t.cacheDir)
	if err != nil {
		return prefetchResult{}, err
	}
	p, _ := m.Part(part)
	return prefetchResult{m: m, part: part, f: f,
		rec: PrefetchRecord{Found: true, Step: m.Step, Part: part, Bytes: p.Size}}, nil
}
