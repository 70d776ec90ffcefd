package consensus

import (
	"context"
	"fmt"
	"sort"
	"sync"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Job status values.
const (
	JobPending  = "pending"
	JobRunning  = "running"
	JobComplete = "complete"
	JobFailed   = "failed"
	JobStopped  = "stopped"
)

// Allocation desired and client status values.
const (
	DesiredRun  = "run"
	DesiredStop = "stop"

	AllocPending  = "pending"
	AllocRunning  = "running"
	AllocComplete = "complete"
	AllocFailed   = "failed"
	AllocStopped  = "stopped"
	AllocLost     = "lost"
)

// JobStatuses and AllocStatuses list every status, in lifecycle order.
var (
	JobStatuses   = []string{JobPending, JobRunning, JobComplete, JobFailed, JobStopped}
	AllocStatuses = []string{AllocPending, AllocRunning, AllocComplete, AllocFailed, AllocStopped, AllocLost}
)

// JobTerminal reports whether a job status is final.
func JobTerminal(status string) bool {
	return status == JobComplete || status == JobFailed || status == JobStopped
}

// AllocTerminal reports whether an allocation's client status is final (the
// rank no longer runs and holds no resources).
func AllocTerminal(status string) bool {
	return status == AllocComplete || status == AllocFailed || status == AllocStopped || status == AllocLost
}

// StateStore is the replicated cluster state as applied by the FSM: nodes,
// jobs and allocations. It is safe for concurrent use. Only the FSM writes
// it.
//
// Every object it returns is shared and immutable: the FSM never modifies
// an object it has stored, it stores a modified copy. Callers must not
// modify returned objects either (proto.Clone them first). They may be
// serialised or kept without copying.
type StateStore struct {
	mu           sync.RWMutex
	index        uint64
	nodes        map[string]*controlpb.Node
	nodeByName   map[string]string
	jobs         map[string]*controlpb.Job
	allocs       map[string]*controlpb.Allocation
	allocsByJob  map[string]map[string]*controlpb.Allocation
	allocsByNode map[string]map[string]*controlpb.Allocation
	// resVersion moves whenever resources may have been freed or nodes
	// changed (not when allocations are added): the scheduler keeps its
	// planner view across batches while it stays the same.
	resVersion uint64
	// notify is closed and replaced whenever index moves.
	notify chan struct{}
	// changed holds the views (see viewKey) that the entries being
	// applied modify; setIndexLocked publishes them to views.
	changed map[viewKey]struct{}
	// views is what WaitNode and WaitServices wait on; it has its own
	// lock so that waiters never take mu for writing.
	views viewIndex
}

// viewKey names one view that a watcher can wait on: a node's (its record,
// its allocations and their jobs) or the services' (live service jobs and
// their allocations).
type viewKey string

// servicesView is the key of the services' view; node views are keyed by
// the node ID, which is never empty.
const servicesView viewKey = ""

// viewIndex records, for each view, the index of the last change to it,
// and wakes the waiters of a view when it changes.
type viewIndex struct {
	mu sync.Mutex
	// mod is the index of the last change to each view; restored (the
	// index of the last snapshot restore) counts as a change to all.
	mod      map[viewKey]uint64
	restored uint64
	// waiters holds a channel per view with waiters, closed (and removed)
	// when the view changes.
	waiters map[viewKey]chan struct{}
}

// NewStateStore returns an empty store.
func NewStateStore() *StateStore {
	return &StateStore{
		nodes:        map[string]*controlpb.Node{},
		nodeByName:   map[string]string{},
		jobs:         map[string]*controlpb.Job{},
		allocs:       map[string]*controlpb.Allocation{},
		allocsByJob:  map[string]map[string]*controlpb.Allocation{},
		allocsByNode: map[string]map[string]*controlpb.Allocation{},
		notify:       make(chan struct{}),
		changed:      map[viewKey]struct{}{},
		views:        viewIndex{mod: map[viewKey]uint64{}, waiters: map[viewKey]chan struct{}{}},
	}
}

// Index returns the Raft index of the last applied change.
func (st *StateStore) Index() uint64 {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.index
}

// WaitIndex blocks until Index() > after, and returns the new index, or
// until ctx is done (returning ctx's error and the current index).
func (st *StateStore) WaitIndex(ctx context.Context, after uint64) (uint64, error) {
	for {
		st.mu.RLock()
		idx, ch := st.index, st.notify
		st.mu.RUnlock()
		if idx > after {
			return idx, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return idx, ctx.Err()
		}
	}
}

// WaitNode blocks until the view of one node changes after index after:
// its own record, an allocation placed on it, or a job with an
// allocation on it. It returns the index of that change (the state may
// already be further), or ctx's error. Unlike WaitIndex it does not wake
// for changes elsewhere in the cluster, so a server can hold a watcher
// per node without waking them all on every entry.
func (st *StateStore) WaitNode(ctx context.Context, nodeID string, after uint64) (uint64, error) {
	if nodeID == "" {
		return 0, fmt.Errorf("%w: wait for a node's view: no node ID", ErrInvalidArgument)
	}
	return st.views.wait(ctx, viewKey(nodeID), after)
}

// WaitServices blocks until a service job (one that has not ended, or one
// that just did) or one of its allocations changes after index after, and
// returns the index of that change, or ctx's error.
func (st *StateStore) WaitServices(ctx context.Context, after uint64) (uint64, error) {
	return st.views.wait(ctx, servicesView, after)
}

func (v *viewIndex) wait(ctx context.Context, key viewKey, after uint64) (uint64, error) {
	for {
		v.mu.Lock()
		mod := max(v.mod[key], v.restored)
		if mod > after {
			v.mu.Unlock()
			return mod, nil
		}
		ch := v.waiters[key]
		if ch == nil {
			ch = make(chan struct{})
			v.waiters[key] = ch
		}
		v.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return mod, ctx.Err()
		}
	}
}

// Nodes returns all nodes sorted by name (then ID).
func (st *StateStore) Nodes() []*controlpb.Node {
	st.mu.RLock()
	out := make([]*controlpb.Node, 0, len(st.nodes))
	for _, n := range st.nodes {
		out = append(out, n)
	}
	st.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool {
		if out[i].Name != out[j].Name {
			return out[i].Name < out[j].Name
		}
		return out[i].Id < out[j].Id
	})
	return out
}

// Node returns the node with this ID, or nil.
func (st *StateStore) Node(id string) *controlpb.Node {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.nodes[id]
}

// NodeByName returns the node with this name, or nil.
func (st *StateStore) NodeByName(name string) *controlpb.Node {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.nodes[st.nodeByName[name]]
}

// Jobs returns all jobs sorted by ID.
func (st *StateStore) Jobs() []*controlpb.Job {
	st.mu.RLock()
	out := make([]*controlpb.Job, 0, len(st.jobs))
	for _, j := range st.jobs {
		out = append(out, j)
	}
	st.mu.RUnlock()
	sort.Slice(out, func(i, j int) bool { return out[i].Id < out[j].Id })
	return out
}

// Job returns the job with this ID, or nil.
func (st *StateStore) Job(id string) *controlpb.Job {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.jobs[id]
}

// Allocations returns the allocations of a job, of every generation that
// garbage collection kept (gc.go), sorted by generation then rank.
func (st *StateStore) Allocations(jobID string) []*controlpb.Allocation {
	st.mu.RLock()
	out := collect(st.allocsByJob[jobID])
	st.mu.RUnlock()
	sortAllocs(out)
	return out
}

// AllocationsByNode returns the allocations placed on a node (all jobs and
// generations), sorted by job, generation and rank.
func (st *StateStore) AllocationsByNode(nodeID string) []*controlpb.Allocation {
	st.mu.RLock()
	out := collect(st.allocsByNode[nodeID])
	st.mu.RUnlock()
	sortAllocs(out)
	return out
}

// Allocation returns one allocation by ID, or nil.
func (st *StateStore) Allocation(id string) *controlpb.Allocation {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.allocs[id]
}

func collect(m map[string]*controlpb.Allocation) []*controlpb.Allocation {
	out := make([]*controlpb.Allocation, 0, len(m))
	for _, a := range m {
		out = append(out, a)
	}
	return out
}

func sortAllocs(a []*controlpb.Allocation) {
	sort.Slice(a, func(i, j int) bool {
		x, y := a[i], a[j]
		if x.JobId != y.JobId {
			return x.JobId < y.JobId
		}
		if x.Generation != y.Generation {
			return x.Generation < y.Generation
		}
		return x.Rank < y.Rank
	})
}

// ---- writers (FSM only; callers hold st.mu for writing) ----

// changedLocked marks a view as modified by the entries being applied.
func (st *StateStore) changedLocked(k viewKey) { st.changed[k] = struct{}{} }

// jobChangedLocked marks the views that show a job: those of the nodes
// holding its allocations, and the services' view for a service.
func (st *StateStore) jobChangedLocked(j *controlpb.Job) {
	for _, a := range st.allocsByJob[j.Id] {
		st.changedLocked(viewKey(a.NodeId))
	}
	if isService(j) {
		st.changedLocked(servicesView)
	}
}

func isService(j *controlpb.Job) bool {
	return j != nil && j.Spec.GetType() == jobspec.TypeService
}

// putJobLocked stores a new or modified job.
func (st *StateStore) putJobLocked(j *controlpb.Job) {
	st.jobs[j.Id] = j
	st.jobChangedLocked(j)
}

func (st *StateStore) putNodeLocked(n *controlpb.Node) {
	st.changedLocked(viewKey(n.Id))
	if old := st.nodes[n.Id]; old != nil && old.Name != n.Name && st.nodeByName[old.Name] == n.Id {
		delete(st.nodeByName, old.Name)
	}
	st.nodes[n.Id] = n
	if n.Name != "" {
		st.nodeByName[n.Name] = n.Id
	}
}

func (st *StateStore) putAllocLocked(a *controlpb.Allocation) {
	st.allocs[a.Id] = a
	bj := st.allocsByJob[a.JobId]
	if bj == nil {
		bj = map[string]*controlpb.Allocation{}
		st.allocsByJob[a.JobId] = bj
	}
	bj[a.Id] = a
	bn := st.allocsByNode[a.NodeId]
	if bn == nil {
		bn = map[string]*controlpb.Allocation{}
		st.allocsByNode[a.NodeId] = bn
	}
	bn[a.Id] = a
	st.changedLocked(viewKey(a.NodeId))
	if isService(st.jobs[a.JobId]) {
		st.changedLocked(servicesView)
	}
}

// removeAllocLocked removes an allocation from the store and its indexes
// (allocation garbage collection).
func (st *StateStore) removeAllocLocked(a *controlpb.Allocation) {
	delete(st.allocs, a.Id)
	if bj := st.allocsByJob[a.JobId]; bj != nil {
		delete(bj, a.Id)
		if len(bj) == 0 {
			delete(st.allocsByJob, a.JobId)
		}
	}
	if bn := st.allocsByNode[a.NodeId]; bn != nil {
		delete(bn, a.Id)
		if len(bn) == 0 {
			delete(st.allocsByNode, a.NodeId)
		}
	}
	st.changedLocked(viewKey(a.NodeId))
	if isService(st.jobs[a.JobId]) {
		st.changedLocked(servicesView)
	}
}

// setIndexLocked moves the index and wakes WaitIndex callers, and the
// WaitNode and WaitServices callers of the views that changed.
func (st *StateStore) setIndexLocked(idx uint64) {
	if idx > st.index {
		st.index = idx
		close(st.notify)
		st.notify = make(chan struct{})
	}
	if len(st.changed) == 0 {
		return
	}
	v := &st.views
	v.mu.Lock()
	for k := range st.changed {
		v.mod[k] = st.index
		if ch := v.waiters[k]; ch != nil {
			close(ch)
			delete(v.waiters, k)
		}
	}
	v.mu.Unlock()
	clear(st.changed)
}

// resetLocked replaces the whole content (snapshot restore).
func (st *StateStore) resetLocked(idx uint64, nodes []*controlpb.Node, jobs []*controlpb.Job, allocs []*controlpb.Allocation) {
	st.nodes = make(map[string]*controlpb.Node, len(nodes))
	st.nodeByName = make(map[string]string, len(nodes))
	st.jobs = make(map[string]*controlpb.Job, len(jobs))
	st.allocs = make(map[string]*controlpb.Allocation, len(allocs))
	st.allocsByJob = map[string]map[string]*controlpb.Allocation{}
	st.allocsByNode = map[string]map[string]*controlpb.Allocation{}
	for _, n := range nodes {
		st.putNodeLocked(n)
	}
	for _, j := range jobs {
		st.jobs[j.Id] = j
	}
	for _, a := range allocs {
		st.putAllocLocked(a)
	}
	st.index = idx
	st.resVersion++
	close(st.notify)
	st.notify = make(chan struct{})
	// Every view may have changed.
	clear(st.changed)
	v := &st.views
	v.mu.Lock()
	v.restored = idx
	for k, ch := range v.waiters {
		close(ch)
		delete(v.waiters, k)
	}
	v.mu.Unlock()
}

// snapshotLocked returns shallow copies of the content; the objects are
// immutable so sharing them with a snapshot is safe.
func (st *StateStore) snapshotLocked() (uint64, []*controlpb.Node, []*controlpb.Job, []*controlpb.Allocation) {
	nodes := make([]*controlpb.Node, 0, len(st.nodes))
	for _, n := range st.nodes {
		nodes = append(nodes, n)
	}
	jobs := make([]*controlpb.Job, 0, len(st.jobs))
	for _, j := range st.jobs {
		jobs = append(jobs, j)
	}
	allocs := collect(st.allocs)
	sort.Slice(nodes, func(i, j int) bool { return nodes[i].Id < nodes[j].Id })
	sort.Slice(jobs, func(i, j int) bool { return jobs[i].Id < jobs[j].Id })
	sort.Slice(allocs, func(i, j int) bool { return allocs[i].Id < allocs[j].Id })
	return st.index, nodes, jobs, allocs
}

// ClusterView returns the nodes and the allocations that hold resources
// (not terminal), for an Evaluator. Lagging is left nil.
func (st *StateStore) ClusterView() ClusterView {
	st.mu.RLock()
	defer st.mu.RUnlock()
	v := ClusterView{Nodes: make([]*controlpb.Node, 0, len(st.nodes))}
	for _, n := range st.nodes {
		v.Nodes = append(v.Nodes, n)
	}
	for _, a := range st.allocs {
		if !AllocTerminal(a.ClientStatus) {
			v.Allocations = append(v.Allocations, a)
		}
	}
	return v
}

// resourceVersion moves whenever resources may have been freed or nodes
// changed (not when allocations are added by plans).
func (st *StateStore) resourceVersion() uint64 {
	st.mu.RLock()
	defer st.mu.RUnlock()
	return st.resVersion
}
