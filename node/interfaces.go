package node

import (
	"context"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// member is one gossip member as the agent sees it.
type member struct {
	Name  string
	Addr  string // gossip host:port
	State string // alive, suspect, dead, left
	Node  *pb.Node
	// bootstrapped: the member holds Raft state already.
	bootstrapped bool
	// role is the duty the member last gossiped (voter, standby, client;
	// "unknown" before it said): a display hint for when no leader answers.
	role string
}

// membership is what the agent needs of gossip (package mesh, adapted in
// mesh_adapter.go). Methods are safe for concurrent use.
type membership interface {
	// Members returns every known member, including failed ones.
	Members() []member
	// Join contacts the given addresses until one answers or ctx ends.
	Join(ctx context.Context, addrs []string) error
	// UpdateSelf changes the local record and gossips it.
	UpdateSelf(func(n *pb.Node)) error
	// Changed receives a value (never blocking the sender) after any
	// membership change.
	Changed() <-chan struct{}
	// SetRole gossips this node's consensus duty (leader, voter, standby
	// or none), for display.
	SetRole(role string)
	// SetBootstrapped gossips whether this node holds Raft state.
	SetBootstrapped(bool)
	// Leave announces a graceful departure.
	Leave(timeout time.Duration) error
	Shutdown() error
}

// stateReader is the read side of the replicated state.
type stateReader interface {
	Nodes() []*pb.Node
	Node(id string) *pb.Node
	NodeByName(name string) *pb.Node
	Jobs() []*pb.Job
	Job(id string) *pb.Job
	Allocations(jobID string) []*pb.Allocation
	AllocationsByNode(nodeID string) []*pb.Allocation
	Index() uint64
	WaitIndex(ctx context.Context, after uint64) (uint64, error)
	// WaitNode waits for a change to one node's view (its record, its
	// allocations, their jobs) after index after.
	WaitNode(ctx context.Context, nodeID string, after uint64) (uint64, error)
	// WaitServices waits for a change to a service job or its
	// allocations after index after.
	WaitServices(ctx context.Context, after uint64) (uint64, error)
}

// raftServer is what the agent needs of package consensus (adapted in
// consensus_adapter.go). Writes return an error matching errNotLeader on
// followers; they return after the entry is committed and applied.
type raftServer interface {
	IsLeader() bool
	// Leader returns the leader's node ID and RPC address, "" if unknown.
	Leader() (id, rpcAddr string)
	// Role is leader, voter, standby or none.
	Role() string
	// HasState says whether the local state is a replica worth reading
	// (the node is in the Raft configuration).
	HasState() bool
	// Bootstrapped says whether this server holds Raft state.
	Bootstrapped() bool
	// RoleChanged receives a value after Role or Bootstrapped may have
	// changed (at most one pending; never blocks the sender).
	RoleChanged() <-chan struct{}
	// Stats is a snapshot of the Raft counters, for metrics.
	Stats() consensus.RaftStats
	// CountLeaderChanges starts counting leader changes (Close it).
	CountLeaderChanges() *consensus.LeaderChangeCounter
	State() stateReader
	Peers() ([]*pb.RaftPeer, error)

	RegisterJob(ctx context.Context, id string, spec *pb.JobSpec) (string, uint64, error)
	// UpdateService gives the running service id a new spec (a rolling
	// update, or a new replica count alone); it returns
	// consensus.SubmitUpdated, SubmitScaled or SubmitUnchanged.
	UpdateService(ctx context.Context, id string, spec *pb.JobSpec) (string, uint64, error)
	StopJob(ctx context.Context, id string) (uint64, error)
	DrainNode(ctx context.Context, nodeID string, deadline time.Time, reason string) (uint64, error)
	SetNodeEligibility(ctx context.Context, nodeID string, eligible bool) (uint64, error)
	UpdateAllocations(ctx context.Context, updates []*pb.Allocation) (uint64, error)
	UpsertNode(ctx context.Context, n *pb.Node) (uint64, error)
	// ReportLoad records a router's load (requests in flight per service
	// job ID) in the leader's memory, for scaling services by load.
	ReportLoad(nodeID string, inFlight map[string]float64) error

	TransferLeadership() error
	TransferLeadershipTo(id string) error
	MembershipChanged()
	Shutdown() error
}
