package consensus

import (
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// FSM applies Raft log entries (fsmpb.Command) to a StateStore. Apply is
// deterministic: ids and times come from the command, never from the clock
// or a random source.
type FSM struct {
	state  *StateStore
	events *eventSink
	logger hclog.Logger
	// configApplied, when set, is called after a batch holding a Raft
	// configuration entry and after a restore (Server.RoleChanged).
	configApplied func()
}

var (
	_ raft.FSM         = (*FSM)(nil)
	_ raft.BatchingFSM = (*FSM)(nil)
)

// NewFSM returns an FSM over an empty StateStore.
func NewFSM(logger hclog.Logger) *FSM {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	return &FSM{state: NewStateStore(), events: newEventSink(), logger: logger}
}

// State returns the FSM's store.
func (f *FSM) State() *StateStore { return f.state }

// PlansResult is the FSM response to an ApplyPlans command.
type PlansResult struct {
	// Applied counts plans applied; Skipped lists jobs whose plan was
	// dropped because the job changed since it was computed.
	Applied int
	Skipped []string
}

// Apply applies one log entry. The response is nil, an error, or for
// RegisterJob the job ID, for ApplyPlans a *PlansResult, for PurgeJobs and
// PurgeAllocations the number of jobs or allocations removed.
func (f *FSM) Apply(l *raft.Log) any {
	return f.ApplyBatch([]*raft.Log{l})[0]
}

// ApplyBatch applies several committed entries under one lock.
func (f *FSM) ApplyBatch(logs []*raft.Log) []any {
	out := make([]any, len(logs))
	st := f.state
	st.mu.Lock()
	var last uint64
	conf := false
	for i, l := range logs {
		last = l.Index
		if l.Type != raft.LogCommand {
			conf = conf || l.Type == raft.LogConfiguration
			continue
		}
		out[i] = f.applyLocked(l.Index, l.Data)
	}
	st.setIndexLocked(last)
	st.mu.Unlock()
	f.events.signal()
	if conf && f.configApplied != nil {
		f.configApplied()
	}
	return out
}

func (f *FSM) applyLocked(idx uint64, data []byte) any {
	var cmd fsmpb.Command
	if err := proto.Unmarshal(data, &cmd); err != nil {
		f.logger.Error("cannot decode log entry", "index", idx, "error", err)
		return fmt.Errorf("%w: index %d: %v", ErrInvalidCommand, idx, err)
	}
	now := cmd.GetTime()
	switch c := cmd.Cmd.(type) {
	case *fsmpb.Command_RegisterJob:
		spec, err := twin[controlpb.JobSpec](c.RegisterJob.GetSpec())
		if err != nil {
			return fmt.Errorf("%w: index %d: job spec: %v", ErrInvalidCommand, idx, err)
		}
		if c.RegisterJob.GetUniqueService() {
			if other := f.liveServiceNamed(spec, c.RegisterJob.GetId()); other != "" {
				return &ServiceExistsError{Name: spec.GetName(), ID: other}
			}
		}
		return f.registerJob(idx, now, c.RegisterJob.GetId(), spec)
	case *fsmpb.Command_UpdateJob:
		spec, err := twin[controlpb.JobSpec](c.UpdateJob.GetSpec())
		if err != nil {
			return fmt.Errorf("%w: index %d: job spec: %v", ErrInvalidCommand, idx, err)
		}
		return f.updateJob(idx, now, c.UpdateJob.GetId(), spec, c.UpdateJob.GetKeepGeneration())
	case *fsmpb.Command_StopJob:
		return f.stopJob(idx, now, c.StopJob.GetId())
	case *fsmpb.Command_UpsertNodes:
		nodes, err := twins[controlpb.Node](c.UpsertNodes.GetNodes())
		if err != nil {
			return fmt.Errorf("%w: index %d: nodes: %v", ErrInvalidCommand, idx, err)
		}
		return f.upsertNodes(idx, now, nodes)
	case *fsmpb.Command_DrainNode:
		return f.drainNode(idx, now, c.DrainNode)
	case *fsmpb.Command_NodeEligibility:
		return f.nodeEligibility(idx, now, c.NodeEligibility)
	case *fsmpb.Command_UpdateAllocations:
		return f.updateAllocations(idx, now, c.UpdateAllocations.GetAllocations())
	case *fsmpb.Command_ApplyPlans:
		return f.applyPlans(idx, now, c.ApplyPlans.GetPlans())
	case *fsmpb.Command_PurgeJobs:
		return f.purgeJobs(idx, c.PurgeJobs.GetIds())
	case *fsmpb.Command_PurgeAllocations:
		return f.purgeAllocations(c.PurgeAllocations.GetIds())
	default:
		f.logger.Error("unknown command in log entry", "index", idx)
		return fmt.Errorf("%w: index %d: unknown command type %T; is this server older than the leader?", ErrInvalidCommand, idx, cmd.Cmd)
	}
}

func (f *FSM) registerJob(idx uint64, now *timestamppb.Timestamp, id string, spec *controlpb.JobSpec) any {
	st := f.state
	if id == "" || spec == nil {
		return fmt.Errorf("%w: register job: id and spec are required", ErrInvalidArgument)
	}
	if _, ok := st.jobs[id]; ok {
		return fmt.Errorf("%w: %s", ErrJobExists, id)
	}
	st.putJobLocked(&controlpb.Job{
		Id:          id,
		Spec:        spec,
		Status:      JobPending,
		SubmitTime:  now,
		StatusTime:  now,
		CreateIndex: idx,
		ModifyIndex: idx,
	})
	f.events.job(id)
	return id
}

// liveServiceNamed returns the ID of a live service (not ended, not
// stopping) other than id named like spec, the lowest such ID; "" when spec
// is no service or there is none.
func (f *FSM) liveServiceNamed(spec *controlpb.JobSpec, id string) string {
	if spec.GetType() != jobspec.TypeService {
		return ""
	}
	other := ""
	for jid, j := range f.state.jobs {
		if jid != id && (other == "" || jid < other) && j.Spec.GetType() == jobspec.TypeService && j.Spec.GetName() == spec.GetName() && !j.StopRequested && !JobTerminal(j.Status) {
			other = jid
		}
	}
	return other
}

func (f *FSM) stopJob(idx uint64, now *timestamppb.Timestamp, id string) any {
	st := f.state
	j := st.jobs[id]
	if j == nil {
		return fmt.Errorf("%w: %s", ErrJobNotFound, id)
	}
	if j.StopRequested && JobTerminal(j.Status) {
		return nil
	}
	nj := proto.Clone(j).(*controlpb.Job)
	nj.StopRequested = true
	if !JobTerminal(nj.Status) {
		nj.Status = JobStopped
		nj.StatusReason = "stopped on request"
		nj.StatusTime = now
	}
	nj.ModifyIndex = idx
	st.putJobLocked(nj)
	for _, a := range st.allocsByJob[id] {
		if a.DesiredStatus != DesiredStop {
			na := proto.Clone(a).(*controlpb.Allocation)
			na.DesiredStatus = DesiredStop
			na.ModifyIndex = idx
			st.putAllocLocked(na)
		}
	}
	return nil
}

func (f *FSM) upsertNodes(idx uint64, now *timestamppb.Timestamp, nodes []*controlpb.Node) any {
	st := f.state
	for _, n := range nodes {
		if n.GetId() == "" {
			return fmt.Errorf("%w: upsert node: id is empty", ErrInvalidArgument)
		}
	}
	for _, nn := range nodes { // fresh objects, decoded from the entry
		if nn.Status == "" {
			nn.Status = NodeReady
		}
		old := st.nodes[nn.Id]
		if old != nil {
			nn.CreateIndex = old.CreateIndex
			if old.Status == nn.Status && nn.StatusTime == nil {
				nn.StatusTime = old.StatusTime
			}
			if nn.Status == NodeDraining && nn.DrainDeadline == nil {
				nn.DrainDeadline = old.DrainDeadline
			}
		} else {
			nn.CreateIndex = idx
		}
		if nn.StatusTime == nil {
			nn.StatusTime = now
		}
		nn.ModifyIndex = idx
		st.putNodeLocked(nn)
		st.resVersion++
		f.nodeEvents(old, nn)
	}
	return nil
}

// nodeEvents queues scheduler work for a node change: jobs with live
// allocations on a node that can no longer hold them or that came back,
// and a capacity re-check when a node can take new work.
func (f *FSM) nodeEvents(old, n *controlpb.Node) {
	usable := nodeSchedulable(n)
	if old == nil || !nodeSchedulable(old) || len(old.Gpus) != len(n.Gpus) || old.MaxRanks != n.MaxRanks {
		if usable {
			f.events.capacity()
		}
	}
	// A node that comes back matters too: its ranks were suspected (the
	// node loss grace) and their jobs say so until evaluated again.
	if !usable || (old != nil && nodeAlive(old) != nodeAlive(n)) {
		for _, a := range f.state.allocsByNode[n.Id] {
			if !AllocTerminal(a.ClientStatus) || a.DesiredStatus == DesiredRun {
				f.events.job(a.JobId)
			}
		}
	}
}

func nodeAlive(n *controlpb.Node) bool { return n.Status == NodeReady || n.Status == NodeDraining }

func nodeSchedulable(n *controlpb.Node) bool { return n.Status == NodeReady && !n.Ineligible }

func (f *FSM) drainNode(idx uint64, now *timestamppb.Timestamp, c *fsmpb.DrainNode) any {
	st := f.state
	old := st.nodes[c.GetNodeId()]
	if old == nil {
		return fmt.Errorf("%w: %s", ErrNodeNotFound, c.GetNodeId())
	}
	n := proto.Clone(old).(*controlpb.Node)
	if n.Status == NodeReady {
		n.Status = NodeDraining
		n.StatusTime = now
	}
	n.DrainDeadline = c.Deadline
	n.StatusReason = c.Reason
	n.ModifyIndex = idx
	st.putNodeLocked(n)
	st.resVersion++
	f.nodeEvents(old, n)
	return nil
}

// nodeEligibility turns a node's eligibility on (which also ends a drain:
// the node is ready again) or off (it keeps its work but gets no more).
func (f *FSM) nodeEligibility(idx uint64, now *timestamppb.Timestamp, c *fsmpb.NodeEligibility) any {
	st := f.state
	old := st.nodes[c.GetNodeId()]
	if old == nil {
		return fmt.Errorf("%w: %s", ErrNodeNotFound, c.GetNodeId())
	}
	n := proto.Clone(old).(*controlpb.Node)
	n.Ineligible = !c.GetEligible()
	if c.GetEligible() && n.Status == NodeDraining {
		n.Status, n.StatusReason, n.StatusTime, n.DrainDeadline = NodeReady, "", now, nil
	}
	n.ModifyIndex = idx
	st.putNodeLocked(n)
	st.resVersion++
	f.nodeEvents(old, n)
	return nil
}

func (f *FSM) updateAllocations(idx uint64, now *timestamppb.Timestamp, ups []*fsmpb.Allocation) any {
	st := f.state
	for _, u := range ups {
		a := st.allocs[u.GetId()]
		if a == nil || AllocTerminal(a.ClientStatus) {
			continue // unknown or already final: late or duplicate report
		}
		na := proto.Clone(a).(*controlpb.Allocation)
		if u.ClientStatus != "" {
			na.ClientStatus = u.ClientStatus
		}
		na.ExitCode = u.ExitCode
		if u.Message != "" {
			na.Message = u.Message
		}
		if u.StartTime != nil {
			na.StartTime = u.StartTime
		}
		if u.FinishTime != nil {
			na.FinishTime = u.FinishTime
		} else if AllocTerminal(na.ClientStatus) && na.FinishTime == nil {
			na.FinishTime = now
		}
		if u.Result != nil {
			na.Result = u.Result
		}
		if len(u.Ports) != 0 {
			na.Ports = u.Ports
		}
		if u.StartFailure != "" {
			na.StartFailure = u.StartFailure
		}
		healthChanged := u.Health != "" && u.Health != na.Health
		if healthChanged {
			na.Health = u.Health
			if na.Health == HealthHealthy && na.HealthyTime == nil {
				na.HealthyTime = now // the crash-loop back-off's reset (service_backoff.go)
			}
		}
		na.ModifyIndex = idx
		st.putAllocLocked(na)
		if AllocTerminal(na.ClientStatus) {
			st.resVersion++
			f.events.job(na.JobId)
			f.events.capacity()
		}
		if healthChanged {
			// A service's scheduler waits for replacements to be healthy.
			f.events.job(na.JobId)
		}
	}
	return nil
}

func (f *FSM) applyPlans(idx uint64, now *timestamppb.Timestamp, plans []*fsmpb.JobPlan) any {
	st := f.state
	res := &PlansResult{}
	for _, p := range plans {
		j := st.jobs[p.GetJobId()]
		if j == nil || j.ModifyIndex != p.ExpectModifyIndex || j.StopRequested || JobTerminal(j.Status) {
			res.Skipped = append(res.Skipped, p.GetJobId())
			continue
		}
		nj := proto.Clone(j).(*controlpb.Job)
		if nj.Status != p.Status {
			nj.StatusTime = now
		}
		nj.Status = p.Status
		nj.StatusReason = p.StatusReason
		nj.Generation = p.Generation
		nj.Restarts = p.Restarts
		nj.WorldSize = p.WorldSize
		nj.NextAttemptTime = p.NextAttemptTime
		nj.EndCause = p.EndCause
		nj.ModifyIndex = idx
		st.putJobLocked(nj)
		for _, id := range p.StopAllocIds {
			if a := st.allocs[id]; a != nil && a.DesiredStatus != DesiredStop {
				na := proto.Clone(a).(*controlpb.Allocation)
				na.DesiredStatus = DesiredStop
				na.ModifyIndex = idx
				st.putAllocLocked(na)
			}
		}
		for _, id := range p.LostAllocIds {
			if a := st.allocs[id]; a != nil {
				na := proto.Clone(a).(*controlpb.Allocation)
				na.DesiredStatus = DesiredStop
				if !AllocTerminal(na.ClientStatus) {
					st.resVersion++
					na.ClientStatus = AllocLost
					na.Message = p.LostMessage
					if na.Message == "" {
						na.Message = "lost: its node is gone or never reported it stopped"
					}
					na.FinishTime = now
				}
				na.ModifyIndex = idx
				st.putAllocLocked(na)
			}
		}
		for _, a := range p.Allocations {
			na := allocFromLog(a)
			if na.DesiredStatus == "" {
				na.DesiredStatus = DesiredRun
			}
			if na.ClientStatus == "" {
				na.ClientStatus = AllocPending
			}
			na.CreateIndex = idx
			na.ModifyIndex = idx
			st.putAllocLocked(na)
		}
		res.Applied++
	}
	return res
}

// Snapshot captures the state; the objects are immutable, so this is cheap
// and Persist runs concurrently with further applies.
func (f *FSM) Snapshot() (raft.FSMSnapshot, error) {
	f.state.mu.RLock()
	idx, nodes, jobs, allocs := f.state.snapshotLocked()
	f.state.mu.RUnlock()
	return &fsmSnapshot{idx: idx, nodes: nodes, jobs: jobs, allocs: allocs}, nil
}

// Restore replaces the state with a snapshot.
func (f *FSM) Restore(rc io.ReadCloser) error {
	defer rc.Close()
	data, err := io.ReadAll(rc)
	if err != nil {
		return fmt.Errorf("restore snapshot: read: %w", err)
	}
	var s fsmpb.Snapshot
	if err := proto.Unmarshal(data, &s); err != nil {
		return fmt.Errorf("restore snapshot: decode: %w", err)
	}
	nodes, err := twins[controlpb.Node](s.Nodes)
	if err != nil {
		return fmt.Errorf("restore snapshot: nodes: %w", err)
	}
	jobs, err := twins[controlpb.Job](s.Jobs)
	if err != nil {
		return fmt.Errorf("restore snapshot: jobs: %w", err)
	}
	allocs, err := twins[controlpb.Allocation](s.Allocations)
	if err != nil {
		return fmt.Errorf("restore snapshot: allocations: %w", err)
	}
	f.state.mu.Lock()
	f.state.resetLocked(s.Index, nodes, jobs, allocs)
	f.state.mu.Unlock()
	f.events.all()
	if f.configApplied != nil {
		// Raft sets the snapshot's configuration after Restore returns, in
		// its main loop; Server.Role reads it through that loop, so it sees
		// the new one.
		f.configApplied()
	}
	return nil
}

// fsmSnapshot holds the state's immutable objects; Persist converts them
// to the log's messages, off the FSM's goroutine.
type fsmSnapshot struct {
	idx    uint64
	nodes  []*controlpb.Node
	jobs   []*controlpb.Job
	allocs []*controlpb.Allocation
}

func (s *fsmSnapshot) Persist(sink raft.SnapshotSink) error {
	snap := &fsmpb.Snapshot{Index: s.idx}
	nodes, err := twins[fsmpb.Node](s.nodes)
	if err == nil {
		snap.Nodes = nodes
		snap.Jobs, err = twins[fsmpb.Job](s.jobs)
	}
	if err == nil {
		snap.Allocations, err = twins[fsmpb.Allocation](s.allocs)
	}
	var data []byte
	if err == nil {
		data, err = proto.Marshal(snap)
	}
	if err == nil {
		_, err = sink.Write(data)
	}
	if err != nil {
		_ = sink.Cancel()
		return fmt.Errorf("persist snapshot: %w", err)
	}
	return sink.Close()
}

func (s *fsmSnapshot) Release() {}

// eventSink collects what the scheduler must look at after applies. It
// never blocks the FSM. Only the leader's scheduler consumes it.
type eventSink struct {
	mu       sync.Mutex
	enabled  bool
	jobs     map[string]struct{}
	cap      bool
	everyJob bool
	ch       chan struct{}
}

func newEventSink() *eventSink {
	return &eventSink{jobs: map[string]struct{}{}, ch: make(chan struct{}, 1)}
}

func (e *eventSink) enable(on bool) {
	e.mu.Lock()
	e.enabled = on
	e.jobs = map[string]struct{}{}
	e.cap, e.everyJob = false, false
	e.mu.Unlock()
}

func (e *eventSink) job(id string) {
	e.mu.Lock()
	if e.enabled {
		e.jobs[id] = struct{}{}
	}
	e.mu.Unlock()
}

func (e *eventSink) capacity() {
	e.mu.Lock()
	if e.enabled {
		e.cap = true
	}
	e.mu.Unlock()
}

func (e *eventSink) all() {
	e.mu.Lock()
	if e.enabled {
		e.everyJob = true
	}
	e.mu.Unlock()
	e.signal()
}

func (e *eventSink) signal() {
	select {
	case e.ch <- struct{}{}:
	default:
	}
}

// take returns and clears the pending events.
func (e *eventSink) take() (jobs []string, capacity, every bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for id := range e.jobs {
		jobs = append(jobs, id)
	}
	e.jobs = map[string]struct{}{}
	capacity, every = e.cap, e.everyJob
	e.cap, e.everyJob = false, false
	return
}

// encodeCommand marshals a command stamped with t.
func encodeCommand(t time.Time, c *fsmpb.Command) ([]byte, error) {
	c.Time = timestamppb.New(t)
	return proto.Marshal(c)
}
