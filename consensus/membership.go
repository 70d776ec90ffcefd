package consensus

import (
	"sort"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

// Member states, as the gossip layer reports them.
const (
	MemberAlive   = "alive"
	MemberSuspect = "suspect"
	MemberDead    = "dead"
	MemberLeft    = "left"
)

// Node status values stored in the FSM.
const (
	NodeReady    = "ready"
	NodeDraining = "draining"
	NodeDown     = "down"
	NodeLeft     = "left"
)

// MemberStates and NodeStatuses list every member state and node status.
var (
	MemberStates = []string{MemberAlive, MemberSuspect, MemberDead, MemberLeft}
	NodeStatuses = []string{NodeReady, NodeDraining, NodeDown, NodeLeft}
)

// Lifecycle values of a member's capacity.
const (
	LifecycleOnDemand = sharding.LifecycleOnDemand
	LifecycleSpot     = sharding.LifecycleSpot
)

// Membership is what consensus needs from gossip.
//
// Members is called from several goroutines (bootstrap, leader loop,
// autopilot) and must be safe for concurrent use, must not block, and must
// include the local node. The returned slice and its members are treated as
// read-only.
type Membership interface {
	Members() []Member
}

// Member mirrors one gossip member.
type Member struct {
	// ID is the node's unique ID (its Raft server ID); Name its human name.
	ID, Name string
	// RaftAddr is the member's Raft host:port, RPCAddr its gRPC host:port.
	RaftAddr, RPCAddr string
	// Server is true when the member may hold a Raft seat.
	Server bool
	// State is MemberAlive, MemberSuspect, MemberDead or MemberLeft.
	State string
	// AZ is the availability zone; Lifecycle is "spot", "on-demand" or
	// "unknown".
	AZ, Lifecycle string
	// Draining is set when the node got an interruption notice or a drain;
	// Ineligible when it should receive no new work.
	Draining, Ineligible bool
	// Bootstrapped is true when the member already holds Raft state (it
	// is, or was, part of a cluster). A node that sees such a member never
	// bootstraps a new cluster; it waits for the leader to add it. The node
	// gossips its own Server.Bootstrapped() here.
	Bootstrapped bool
	// Node is the full gossiped record (GPUs, addresses, ...); may be nil.
	Node *controlpb.Node
}

// usable reports whether the gossip layer considers the member up.
// Suspect members count as up: suspicion alone must not churn Raft.
func (m *Member) usable() bool { return m.State == MemberAlive || m.State == MemberSuspect }

// lifecycleRank orders on-demand before unknown before spot.
func lifecycleRank(l string) int {
	switch l {
	case LifecycleOnDemand:
		return 0
	case LifecycleSpot:
		return 2
	default:
		return 1
	}
}

// BootstrapSet returns the members that bootstrap the cluster, in order:
// the first n of the usable server-eligible, non-draining members sorted
// on-demand before spot, then by node ID. It returns nil while fewer than n
// such members are known. Every node computes it the same way from the same
// view, which is what makes bootstrap symmetric.
func BootstrapSet(members []Member, n int) []Member {
	var c []Member
	for _, m := range members {
		if m.Server && m.usable() && !m.Draining && m.RaftAddr != "" {
			c = append(c, m)
		}
	}
	if len(c) < n {
		return nil
	}
	sortCandidates(c)
	return c[:n]
}

func sortCandidates(c []Member) {
	sort.SliceStable(c, func(i, j int) bool {
		li, lj := lifecycleRank(c[i].Lifecycle), lifecycleRank(c[j].Lifecycle)
		if li != lj {
			return li < lj
		}
		return c[i].ID < c[j].ID
	})
}
