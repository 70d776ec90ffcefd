package node

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sort"
	"strconv"
	"strings"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// Errors of the node package.
var (
	// ErrNoLeader means no Raft leader is known yet (or no server is reachable).
	ErrNoLeader = errors.New("no cluster leader")
	// errNotLeader is what a raftServer returns for a write on a follower.
	errNotLeader = errors.New("not the leader")
)

const (
	// hopsKey counts how many agents a forwarded call has passed through.
	hopsKey = "x-gpumesh-hops"
	// notAfterKey carries a forwarded call's deadline as wall-clock Unix
	// nanoseconds. gRPC sends a deadline as the time left, which the
	// receiver counts from when the call reaches it: a call held up in a
	// partition (TCP delivers it once the partition heals) would start
	// there with its whole budget again, and a write the caller saw time
	// out would commit after all. Agents' clocks are kept in step (NTP), so
	// an absolute deadline is what ends the call.
	notAfterKey = "x-gpumesh-not-after"
	// maxHops bounds forwarding (client → server → leader, plus one spare).
	maxHops = 3
	// defaultWriteTimeout bounds a write that has no deadline of its own,
	// retries through leader elections included.
	defaultWriteTimeout = 20 * time.Second
)

// controlServer implements gpumesh.v1.Control for one agent.
type controlServer struct {
	pb.UnimplementedControlServer
	a *Agent
}

var _ pb.ControlServer = (*controlServer)(nil)

func hops(ctx context.Context) int {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get(hopsKey); len(v) > 0 {
		n, _ := strconv.Atoi(v[0])
		return n
	}
	return 0
}

func outgoing(ctx context.Context) context.Context {
	n := hops(ctx) + 1
	md, _ := metadata.FromIncomingContext(ctx)
	md = md.Copy()
	md.Set(hopsKey, strconv.Itoa(n))
	if dl, ok := ctx.Deadline(); ok {
		md.Set(notAfterKey, strconv.FormatInt(dl.UnixNano(), 10))
	}
	// Keep the caller's token and deadline; drop transport headers.
	for _, k := range []string{":authority", "content-type", "user-agent", "grpc-timeout"} {
		md.Delete(k)
	}
	return metadata.NewOutgoingContext(ctx, md)
}

// toStatus maps our errors to gRPC status codes with stable messages.
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	switch {
	case errors.Is(err, jobspec.ErrInvalid), errors.Is(err, errInvalidArgument):
		return status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, jobspec.ErrTooLarge):
		return status.Error(codes.ResourceExhausted, err.Error())
	case errors.Is(err, errNotFound):
		return status.Error(codes.NotFound, err.Error())
	case errors.Is(err, ErrNoLeader), errors.Is(err, errNotLeader):
		return status.Error(codes.Unavailable, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

var (
	errNotFound        = errors.New("not found")
	errInvalidArgument = errors.New("invalid argument")
)

func retryable(err error) bool {
	if errors.Is(err, errNotLeader) || errors.Is(err, ErrNoLeader) {
		return true
	}
	if s, ok := status.FromError(err); ok {
		return s.Code() == codes.Unavailable
	}
	return false
}

// withLeader runs local on this agent when it leads, and remote against the
// leader otherwise. The agent a caller asked (hops 0) retries through
// elections and lost connections until ctx ends; an agent that received a
// forwarded call tries once, forwarding only to the leader it knows, so a
// call never bounces between agents whose views of the leader differ.
// Writes are made idempotent by their callers.
func (s *controlServer) withLeader(ctx context.Context, local func(ctx context.Context) error, remote func(ctx context.Context, c pb.ControlClient) error) error {
	h := hops(ctx)
	if h >= maxHops {
		return fmt.Errorf("%w: the call was forwarded %d times without reaching one", ErrNoLeader, h)
	}
	if h > 0 {
		ctx, cancel, err := forwardedDeadline(ctx)
		if err != nil {
			return err
		}
		defer cancel()
		return s.tryLeader(ctx, h, local, remote)
	}
	if _, ok := ctx.Deadline(); !ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, defaultWriteTimeout)
		defer cancel()
	}
	backoff := 20 * time.Millisecond
	var lastErr error
	for {
		err := s.tryLeader(ctx, 0, local, remote)
		if err == nil || !retryable(err) {
			return err
		}
		lastErr = err
		s.a.logger.Debug("retrying call on the leader", "error", err, "backoff", backoff)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return fmt.Errorf("%w: %v (last error: %v)", ErrNoLeader, ctx.Err(), lastErr)
		case <-t.C:
		}
		if backoff < 500*time.Millisecond {
			backoff *= 2
		}
	}
}

// errForwardedLate refuses a forwarded call that arrived after its caller's
// deadline.
var errForwardedLate = fmt.Errorf("%w: the forwarded call arrived after its caller's deadline", context.DeadlineExceeded)

// forwardedDeadline bounds a forwarded call by the deadline its first agent
// sent (notAfterKey), and refuses it when that has passed.
func forwardedDeadline(ctx context.Context) (context.Context, context.CancelFunc, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(notAfterKey)
	if len(v) == 0 {
		return ctx, func() {}, nil
	}
	ns, err := strconv.ParseInt(v[0], 10, 64)
	if err != nil {
		return nil, nil, fmt.Errorf("%w: bad %s %q", errInvalidArgument, notAfterKey, v[0])
	}
	dl := time.Unix(0, ns)
	if !time.Now().Before(dl) {
		return nil, nil, errForwardedLate
	}
	ctx, cancel := context.WithDeadline(ctx, dl)
	return ctx, cancel, nil
}

// tryLeader makes one attempt. A call that arrived forwarded (h > 0) goes on
// only to the leader this agent knows, never to a random server.
func (s *controlServer) tryLeader(ctx context.Context, h int, local func(ctx context.Context) error, remote func(ctx context.Context, c pb.ControlClient) error) error {
	a := s.a
	if a.raft != nil && a.raft.IsLeader() {
		return local(ctx)
	}
	addr := ""
	if a.raft != nil {
		_, addr = a.raft.Leader()
		if addr == a.rpcAddr {
			addr = "" // a stale view of ourselves
		}
	}
	if addr == "" {
		if h > 0 {
			return fmt.Errorf("%w: this agent knows no leader yet", ErrNoLeader)
		}
		// A client, or a server that knows no leader: ask a server.
		addr = a.pickServer()
	}
	if addr == "" {
		return fmt.Errorf("%w: no server is known yet", ErrNoLeader)
	}
	c, err := a.conns.client(addr)
	if err != nil {
		return status.Error(codes.Unavailable, err.Error())
	}
	callCtx, cancel := context.WithTimeout(outgoing(ctx), 5*time.Second)
	defer cancel()
	err = remote(callCtx, c)
	if err != nil && callCtx.Err() != nil && ctx.Err() == nil {
		// The hop timed out, not the caller: let the caller's agent retry.
		return status.Error(codes.Unavailable, "forwarded call timed out: "+err.Error())
	}
	return err
}

// readLocal says whether a read may be served from this agent's replica.
func (s *controlServer) readLocal(q *pb.QueryOptions) bool {
	a := s.a
	if a.raft == nil || !a.raft.HasState() {
		return false
	}
	return a.raft.IsLeader() || (q != nil && q.Stale)
}

func (s *controlServer) SubmitJob(ctx context.Context, req *pb.SubmitJobRequest) (*pb.SubmitJobResponse, error) {
	if req.Spec == nil {
		return nil, toStatus(&jobspec.Error{Msg: "no spec given"})
	}
	spec := proto.Clone(req.Spec).(*pb.JobSpec)
	jobspec.ApplyDefaults(spec)
	if err := jobspec.Validate(spec); err != nil {
		return nil, toStatus(err)
	}
	id := req.Id
	if id == "" {
		id = consensus.NewJobID(spec.Name)
	}
	var resp *pb.SubmitJobResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		// A service spec named like a running service updates it (a
		// rolling update) rather than starting a second service that
		// routers would mix with the first. The running service's own id
		// is a retried submission: RegisterJob answers it.
		if spec.Type == jobspec.TypeService {
			if j := consensus.RunningService(s.a.raft.State().Jobs(), spec.Name); j != nil && j.Id != id {
				outcome, idx, err := s.a.raft.UpdateService(ctx, j.Id, spec)
				if err == nil {
					resp = &pb.SubmitJobResponse{Id: j.Id, Index: idx, Outcome: outcome}
				}
				return err
			}
		}
		jid, idx, err := s.a.raft.RegisterJob(ctx, id, spec)
		var exists *consensus.ServiceExistsError
		if errors.As(err, &exists) {
			// Another submission of this name was committed first.
			var outcome string
			if outcome, idx, err = s.a.raft.UpdateService(ctx, exists.ID, spec); err == nil {
				resp = &pb.SubmitJobResponse{Id: exists.ID, Index: idx, Outcome: outcome}
			}
			return err
		}
		if err == nil {
			resp = &pb.SubmitJobResponse{Id: jid, Index: idx, Outcome: consensus.SubmitRegistered}
		}
		return err
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec, Id: id})
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) StopJob(ctx context.Context, req *pb.StopJobRequest) (*pb.StopJobResponse, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "stop: a job id is required")
	}
	var resp *pb.StopJobResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		st := s.a.raft.State()
		if st.Job(req.Id) == nil {
			if ids := jobIDsWithPrefix(st, req.Id); len(ids) > 0 {
				// Other commands take a prefix; stop wants the whole id.
				return fmt.Errorf("job %q: %w: stop takes a whole job id; did you mean %s? (see `gpumesh job list`)", req.Id, errNotFound, listIDs(ids))
			}
			return fmt.Errorf("job %q: %w (see `gpumesh job list`)", req.Id, errNotFound)
		}
		idx, err := s.a.raft.StopJob(ctx, req.Id)
		resp = &pb.StopJobResponse{Index: idx}
		return err
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.StopJob(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) GetJob(ctx context.Context, req *pb.GetJobRequest) (*pb.GetJobResponse, error) {
	if req.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "a job id is required")
	}
	var resp *pb.GetJobResponse
	local := func(context.Context) error {
		st := s.a.raft.State()
		j := st.Job(req.Id)
		if j == nil {
			// Allow a unique prefix of an id, as people type them.
			switch ids := jobIDsWithPrefix(st, req.Id); len(ids) {
			case 0:
			case 1:
				j = st.Job(ids[0])
			default:
				return fmt.Errorf("%w: job id prefix %q matches %d jobs (%s): give more of the id", errInvalidArgument, req.Id, len(ids), listIDs(ids))
			}
		}
		if j == nil {
			return fmt.Errorf("job %q: %w (see `gpumesh job list`)", req.Id, errNotFound)
		}
		allocs := st.Allocations(j.Id)
		sort.Slice(allocs, func(i, k int) bool {
			if allocs[i].Generation != allocs[k].Generation {
				return allocs[i].Generation > allocs[k].Generation
			}
			return allocs[i].Rank < allocs[k].Rank
		})
		resp = &pb.GetJobResponse{Job: j, Allocations: allocs, Index: st.Index()}
		return nil
	}
	if s.readLocal(req.Query) {
		return resp, toStatus(local(ctx))
	}
	err := s.withLeader(ctx, local, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.GetJob(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

// jobIDsWithPrefix returns the ids of the jobs in st that begin with
// prefix, sorted.
func jobIDsWithPrefix(st stateReader, prefix string) []string {
	var ids []string
	for _, j := range st.Jobs() {
		if strings.HasPrefix(j.Id, prefix) {
			ids = append(ids, j.Id)
		}
	}
	sort.Strings(ids)
	return ids
}

// listIDs names up to four ids, and how many more there are.
func listIDs(ids []string) string {
	const most = 4
	if len(ids) <= most {
		return strings.Join(ids, ", ")
	}
	return fmt.Sprintf("%s and %d more", strings.Join(ids[:most], ", "), len(ids)-most)
}

func (s *controlServer) ListJobs(ctx context.Context, req *pb.ListJobsRequest) (*pb.ListJobsResponse, error) {
	var resp *pb.ListJobsResponse
	local := func(context.Context) error {
		st := s.a.raft.State()
		jobs := st.Jobs()
		sort.Slice(jobs, func(i, k int) bool { return jobs[i].CreateIndex < jobs[k].CreateIndex })
		resp = &pb.ListJobsResponse{Jobs: jobs, Index: st.Index()}
		return nil
	}
	if s.readLocal(req.Query) {
		return resp, toStatus(local(ctx))
	}
	err := s.withLeader(ctx, local, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.ListJobs(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) ListNodes(ctx context.Context, req *pb.ListNodesRequest) (*pb.ListNodesResponse, error) {
	var resp *pb.ListNodesResponse
	local := func(context.Context) error {
		st := s.a.raft.State()
		nodes := st.Nodes()
		sort.Slice(nodes, func(i, k int) bool { return nodes[i].Name < nodes[k].Name })
		resp = &pb.ListNodesResponse{Nodes: nodes, Index: st.Index()}
		return nil
	}
	if s.readLocal(req.Query) {
		return resp, toStatus(local(ctx))
	}
	err := s.withLeader(ctx, local, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.ListNodes(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) Members(ctx context.Context, req *pb.MembersRequest) (*pb.MembersResponse, error) {
	ms := s.a.mesh.Members()
	out := make([]*pb.Member, 0, len(ms))
	for _, m := range ms {
		out = append(out, &pb.Member{Name: m.Name, Addr: m.Addr, State: m.State, Meta: m.Node})
	}
	sort.Slice(out, func(i, k int) bool { return out[i].Name < out[k].Name })
	return &pb.MembersResponse{Members: out}, nil
}

func (s *controlServer) RaftPeers(ctx context.Context, req *pb.RaftPeersRequest) (*pb.RaftPeersResponse, error) {
	var resp *pb.RaftPeersResponse
	err := s.withLeader(ctx, func(context.Context) error {
		peers, err := s.a.raft.Peers()
		if err != nil {
			return err
		}
		resp = &pb.RaftPeersResponse{Peers: peers, Index: s.a.raft.State().Index()}
		return nil
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.RaftPeers(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) DrainNode(ctx context.Context, req *pb.DrainNodeRequest) (*pb.DrainNodeResponse, error) {
	target := req.NodeId
	if req.Self || target == "" {
		if !req.Self {
			return nil, status.Error(codes.InvalidArgument, "drain: name a node (id or name) or ask for --self")
		}
		target = s.a.nodeID
	}
	deadline := time.Now().Add(2 * time.Minute)
	if req.Deadline != nil {
		deadline = time.Now().Add(req.Deadline.AsDuration())
	}
	if req.Self && target == s.a.nodeID {
		// Mark ourselves draining in gossip at once; the leader records it in Raft.
		_ = s.a.mesh.UpdateSelf(func(n *pb.Node) { n.Status = consensus.NodeDraining })
	}
	var resp *pb.DrainNodeResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		st := s.a.raft.State()
		n := st.Node(target)
		if n == nil {
			n = st.NodeByName(target)
		}
		if n == nil {
			return fmt.Errorf("node %q: %w (see `gpumesh nodes`)", target, errNotFound)
		}
		idx, err := s.a.raft.DrainNode(ctx, n.Id, deadline, req.Reason)
		resp = &pb.DrainNodeResponse{Index: idx, NodeId: n.Id}
		return err
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		fwd := proto.Clone(req).(*pb.DrainNodeRequest)
		fwd.NodeId, fwd.Self = target, false
		resp, err = c.DrainNode(ctx, fwd)
		return err
	})
	return resp, toStatus(err)
}

func (s *controlServer) AgentInfo(ctx context.Context, req *pb.AgentInfoRequest) (*pb.AgentInfoResponse, error) {
	a := s.a
	resp := &pb.AgentInfoResponse{Node: a.selfNode(), Role: "client", Version: Version, FleetStatus: a.lastScale()}
	if a.raft != nil {
		resp.Role = a.raft.Role()
		if resp.Role == "none" {
			resp.Role = "client"
		}
		resp.LeaderId, resp.LeaderRpcAddr = a.raft.Leader()
		if a.raft.HasState() {
			resp.AppliedIndex = a.raft.State().Index()
		}
	}
	return resp, nil
}

func (s *controlServer) UpdateAllocations(ctx context.Context, req *pb.UpdateAllocationsRequest) (*pb.UpdateAllocationsResponse, error) {
	var resp *pb.UpdateAllocationsResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		idx, err := s.a.raft.UpdateAllocations(ctx, req.Allocations)
		resp = &pb.UpdateAllocationsResponse{Index: idx}
		return err
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.UpdateAllocations(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

// ReportLoad hands a router's load to the leader (services scaled by load).
func (s *controlServer) ReportLoad(ctx context.Context, req *pb.ReportLoadRequest) (*pb.ReportLoadResponse, error) {
	if req.NodeId == "" {
		return nil, status.Error(codes.InvalidArgument, "report load: a node id is required")
	}
	err := s.withLeader(ctx, func(context.Context) error {
		m := make(map[string]float64, len(req.Services))
		for _, l := range req.Services {
			m[l.JobId] = l.InFlight
		}
		return s.a.raft.ReportLoad(req.NodeId, m)
	}, func(ctx context.Context, c pb.ControlClient) error {
		_, err := c.ReportLoad(ctx, req)
		return err
	})
	return &pb.ReportLoadResponse{}, toStatus(err)
}

func (s *controlServer) RegisterNode(ctx context.Context, req *pb.RegisterNodeRequest) (*pb.RegisterNodeResponse, error) {
	if req.Node == nil || req.Node.Id == "" {
		return nil, status.Error(codes.InvalidArgument, "register: a node with an id is required")
	}
	var resp *pb.RegisterNodeResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		idx, err := s.a.raft.UpsertNode(ctx, req.Node)
		resp = &pb.RegisterNodeResponse{Index: idx}
		return err
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.RegisterNode(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

// Watch streams the allocations of one node and their jobs: everything
// current first, then a new full view of that node after every change to
// it, and again after watchRefresh without one. Only changes to the
// node's own view wake its stream (consensus.StateStore.WaitNode), so a
// server holding a watcher per node does not wake them all on every
// entry; a stream that falls behind gets the latest view, not each one in
// between. With no node, every allocation (or, with Services, only the
// services') is sent after each change to it.
func (s *controlServer) Watch(req *pb.WatchRequest, stream grpc.ServerStreamingServer[pb.WatchEvent]) error {
	ctx := stream.Context()
	a := s.a
	if a.raft == nil || !a.raft.HasState() {
		// Relay from a server that holds the state.
		addr := a.pickServer()
		if addr == "" {
			return toStatus(fmt.Errorf("%w: no server to watch", ErrNoLeader))
		}
		if hops(ctx) >= maxHops {
			return toStatus(fmt.Errorf("%w: watch forwarded too often", ErrNoLeader))
		}
		c, err := a.conns.client(addr)
		if err != nil {
			return status.Error(codes.Unavailable, err.Error())
		}
		up, err := c.Watch(outgoing(ctx), req)
		if err != nil {
			return err
		}
		for {
			ev, err := up.Recv()
			if err != nil {
				return err
			}
			if err := stream.Send(ev); err != nil {
				return err
			}
		}
	}
	return toStatus(watchState(ctx, a.raft.State(), req, watchRefresh, stream.Send))
}

// watchRefresh is how long a node's watch stream goes without a view: a
// view is sent again after it even if nothing changed, so that what its
// agent decides with time (a rank adopted after a restart and still
// missing from the view is stopped after adoptWait) happens without a
// change to wake it.
const watchRefresh = 30 * time.Second

// watchState sends views of st as the Watch request asks until ctx ends or
// send fails: the first at once (unless req.AfterIndex says the watcher
// has seen the current one), then one after each change to the view,
// and, for a node's view, after refresh without one.
func watchState(ctx context.Context, st stateReader, req *pb.WatchRequest, refresh time.Duration, send func(*pb.WatchEvent) error) error {
	wait := st.WaitIndex
	view := func() *pb.WatchEvent { return watchEvent(st, req.NodeId) }
	switch {
	case req.NodeId != "":
		wait = func(ctx context.Context, after uint64) (uint64, error) { return st.WaitNode(ctx, req.NodeId, after) }
	case req.Services:
		wait, view, refresh = st.WaitServices, func() *pb.WatchEvent { return servicesEvent(st) }, 0
	default:
		refresh = 0
	}
	after, first := req.AfterIndex, req.AfterIndex == 0
	for {
		if !first {
			wctx, cancel := ctx, context.CancelFunc(func() {})
			if refresh > 0 {
				wctx, cancel = context.WithTimeout(ctx, refresh)
			}
			_, err := wait(wctx, after)
			cancel()
			if ctx.Err() != nil {
				return ctx.Err()
			}
			if err != nil && wctx.Err() == nil {
				return err
			}
		}
		// The index is read before the view: a change after it wakes
		// the next wait, so none is missed.
		idx := st.Index()
		ev := view()
		ev.Index = idx
		if err := send(ev); err != nil {
			return err
		}
		after, first = idx, false
	}
}

// servicesEvent is the view of a service router: service jobs that have
// not ended, their allocations, and the nodes of the live ones (the routers
// rank replicas by their node's zone).
func servicesEvent(st stateReader) *pb.WatchEvent {
	ev := &pb.WatchEvent{Snapshot: true}
	nodes := map[string]bool{}
	for _, j := range st.Jobs() {
		if j.Spec.GetType() != jobspec.TypeService || consensus.JobTerminal(j.Status) {
			continue
		}
		ev.Jobs = append(ev.Jobs, j)
		for _, al := range st.Allocations(j.Id) {
			ev.Allocations = append(ev.Allocations, al)
			if !nodes[al.NodeId] && al.DesiredStatus == consensus.DesiredRun && !consensus.AllocTerminal(al.ClientStatus) {
				nodes[al.NodeId] = true
				if n := st.Node(al.NodeId); n != nil {
					ev.Nodes = append(ev.Nodes, n)
				}
			}
		}
	}
	return ev
}

// watchEvent is the full current view of one node's allocations and the
// jobs they belong to, with the node's own record; for an empty nodeID,
// every allocation, their jobs, and the nodes of the live ones.
func watchEvent(st stateReader, nodeID string) *pb.WatchEvent {
	ev := &pb.WatchEvent{Snapshot: true}
	var allocs []*pb.Allocation
	if nodeID == "" {
		for _, j := range st.Jobs() {
			allocs = append(allocs, st.Allocations(j.Id)...)
		}
	} else {
		allocs = st.AllocationsByNode(nodeID)
	}
	if nodeID != "" {
		if n := st.Node(nodeID); n != nil {
			ev.Nodes = append(ev.Nodes, n) // the node's own record (drain.go followRecord)
		}
	}
	seen := map[string]bool{}
	var nodes map[string]bool // every node: those of live allocations
	if nodeID == "" {
		nodes = map[string]bool{}
	}
	for _, al := range allocs {
		ev.Allocations = append(ev.Allocations, al)
		if !seen[al.JobId] {
			seen[al.JobId] = true
			if j := st.Job(al.JobId); j != nil {
				ev.Jobs = append(ev.Jobs, j)
			}
		}
		if nodes != nil && !nodes[al.NodeId] && al.DesiredStatus == consensus.DesiredRun && !consensus.AllocTerminal(al.ClientStatus) {
			// The routers rank replicas by their node's zone.
			nodes[al.NodeId] = true
			if n := st.Node(al.NodeId); n != nil {
				ev.Nodes = append(ev.Nodes, n)
			}
		}
	}
	return ev
}

// Logs streams one rank's stdout or stderr from whichever node holds it.
func (s *controlServer) Logs(req *pb.LogsRequest, stream grpc.ServerStreamingServer[pb.LogChunk]) error {
	ctx := stream.Context()
	a := s.a
	if req.Local {
		r, err := a.runner.openLogs(ctx, req)
		if err != nil {
			return toStatus(err)
		}
		defer r.Close()
		return toStatus(sendLogs(r, req.Timestamps, stream))
	}
	job, err := s.GetJob(ctx, &pb.GetJobRequest{Id: req.JobId, Query: &pb.QueryOptions{Stale: true}})
	if err != nil {
		return err
	}
	gen := req.Generation
	var alloc *pb.Allocation
	if gen == 0 && job.Job.Spec.GetType() == jobspec.TypeService {
		// A service replaces its replicas one at a time, each in a
		// generation of its own: a replica's logs are its newest.
		for _, al := range job.Allocations {
			if al.Rank == req.Rank && (alloc == nil || al.Generation > alloc.Generation) {
				alloc = al
			}
		}
		if alloc == nil {
			return status.Errorf(codes.NotFound, "service %s has no replica %d (see `gpumesh service status %s`)", job.Job.Id, req.Rank, job.Job.Spec.GetName())
		}
		gen = alloc.Generation
	}
	if alloc == nil {
		if gen == 0 {
			gen = job.Job.Generation
		}
		for _, al := range job.Allocations {
			if al.Generation == gen && al.Rank == req.Rank {
				alloc = al
			}
		}
	}
	if alloc == nil {
		return status.Errorf(codes.NotFound, "job %s has no rank %d in generation %d (see `gpumesh job status %s`)", job.Job.Id, req.Rank, gen, job.Job.Id)
	}
	fwd := proto.Clone(req).(*pb.LogsRequest)
	fwd.JobId, fwd.Generation, fwd.Local = job.Job.Id, gen, true
	if alloc.NodeId == a.nodeID {
		return s.Logs(fwd, stream)
	}
	addr := a.rpcAddrOf(alloc.NodeId)
	if addr == "" {
		return logsNodeDown(alloc, nil)
	}
	c, err := a.conns.client(addr)
	if err != nil {
		return logsNodeDown(alloc, err)
	}
	up, err := c.Logs(outgoing(ctx), fwd)
	if err != nil {
		return logsNodeDown(alloc, err)
	}
	for {
		ch, err := up.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return logsNodeDown(alloc, err)
		}
		if err := stream.Send(ch); err != nil {
			return err
		}
	}
}

func (s *controlServer) TransferLeadership(ctx context.Context, req *pb.TransferLeadershipRequest) (*pb.TransferLeadershipResponse, error) {
	var resp *pb.TransferLeadershipResponse
	err := s.withLeader(ctx, func(ctx context.Context) error {
		target := req.To
		if target != "" {
			st := s.a.raft.State()
			if n := st.Node(target); n == nil {
				if n = st.NodeByName(target); n == nil {
					return fmt.Errorf("node %q: %w (see `gpumesh raft peers`)", target, errNotFound)
				}
				target = n.Id
			}
			if target == s.a.nodeID {
				return fmt.Errorf("%w: node %s (%s) is the leader already: nothing to transfer (name another voter, or leave out --to to let Raft pick one)", errInvalidArgument, s.a.Name(), target)
			}
		}
		if err := s.a.raft.TransferLeadershipTo(target); err != nil {
			return err
		}
		id, _ := s.a.raft.Leader()
		resp = &pb.TransferLeadershipResponse{LeaderId: id}
		return nil
	}, func(ctx context.Context, c pb.ControlClient) (err error) {
		resp, err = c.TransferLeadership(ctx, req)
		return err
	})
	return resp, toStatus(err)
}

// ReasonNodeDown is the ErrorInfo reason of a call that needs a node that
// does not answer (a rank's logs live on the node that ran it).
const ReasonNodeDown = "NODE_DOWN"

// logsNodeDown turns a failure to reach the node holding a rank's logs into
// an error that names the node. Errors other than "unavailable" pass
// through (a rank with no logs yet is NotFound on that node).
func logsNodeDown(al *pb.Allocation, err error) error {
	if err != nil {
		if st, ok := status.FromError(err); ok && st.Code() != codes.Unavailable {
			return err
		}
	}
	st := status.Newf(codes.Unavailable,
		"node %s (%s), which ran rank %d of job %s, is down: its logs are kept on that node and come back with it (see `gpumesh members`)",
		al.NodeName, al.NodeId, al.Rank, al.JobId)
	if d, derr := st.WithDetails(&errdetails.ErrorInfo{Reason: ReasonNodeDown, Domain: "gpumesh",
		Metadata: map[string]string{"node": al.NodeName, "node_id": al.NodeId}}); derr == nil {
		st = d
	}
	return st.Err()
}

// NodeEligibility turns a node's eligibility for new work on or off; on
// also ends a drain. The node's own agent carries it out (its gossip record
// first, then the leader records it), so that gossip and the cluster state
// agree; a node whose agent cannot be reached has it recorded by the leader
// alone.
func (s *controlServer) NodeEligibility(ctx context.Context, req *pb.NodeEligibilityRequest) (*pb.NodeEligibilityResponse, error) {
	a := s.a
	if req.RecordOnly {
		var resp *pb.NodeEligibilityResponse
		err := s.withLeader(ctx, func(ctx context.Context) error {
			if req.Eligible {
				if err := a.waitGossipAvailable(ctx, req.NodeId); err != nil {
					return err
				}
			}
			idx, err := a.raft.SetNodeEligibility(ctx, req.NodeId, req.Eligible)
			resp = &pb.NodeEligibilityResponse{Index: idx, NodeId: req.NodeId}
			return err
		}, func(ctx context.Context, c pb.ControlClient) (err error) {
			resp, err = c.NodeEligibility(ctx, req)
			return err
		})
		return resp, toStatus(err)
	}
	target := req.NodeId
	if req.Self {
		target = a.nodeID
	} else if target == "" {
		return nil, status.Error(codes.InvalidArgument, "eligibility: name a node (id or name) or ask for --self")
	}
	id, name, addr := a.findNode(target)
	if id == "" {
		return nil, toStatus(fmt.Errorf("node %q: %w (see `gpumesh nodes`)", target, errNotFound))
	}
	record := &pb.NodeEligibilityRequest{NodeId: id, Eligible: req.Eligible, RecordOnly: true}
	if id != a.nodeID {
		if addr != "" && hops(ctx) < maxHops-1 {
			resp, err := s.onNode(ctx, addr, &pb.NodeEligibilityRequest{Self: true, Eligible: req.Eligible})
			if err == nil || status.Code(err) != codes.Unavailable {
				return resp, err
			}
			a.logger.Warn("node unreachable: its eligibility is recorded by the leader alone", "node", name, "error", err)
		}
		resp, err := s.NodeEligibility(ctx, record)
		if resp != nil {
			resp.NodeName = name
		}
		return resp, err
	}
	a.elig.begin()
	var idx uint64
	defer func() { a.elig.end(idx) }()
	if err := a.mesh.UpdateSelf(func(n *pb.Node) {
		n.Ineligible = !req.Eligible
		if req.Eligible && n.Status == "draining" {
			n.Status = "ready"
		}
	}); err != nil {
		return nil, toStatus(err)
	}
	a.logger.Info("eligibility changed", "eligible", req.Eligible)
	resp, err := s.NodeEligibility(ctx, record)
	if resp != nil {
		idx, resp.NodeName = resp.Index, name
	}
	return resp, err
}

// onNode passes a NodeEligibility call to the agent at addr.
func (s *controlServer) onNode(ctx context.Context, addr string, req *pb.NodeEligibilityRequest) (*pb.NodeEligibilityResponse, error) {
	c, err := s.a.conns.client(addr)
	if err != nil {
		return nil, status.Error(codes.Unavailable, err.Error())
	}
	ctx, cancel := context.WithTimeout(outgoing(ctx), 10*time.Second)
	defer cancel()
	resp, err := c.NodeEligibility(ctx, req)
	if status.Code(err) == codes.DeadlineExceeded {
		err = status.Error(codes.Unavailable, err.Error())
	}
	return resp, err
}
