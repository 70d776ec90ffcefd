package node

import (
	"context"
	"fmt"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Drain takes this node out of service before deadline, as a spot
// interruption notice demands: it is marked draining in gossip at once and
// in Raft through the leader, which moves leadership and the voter seat away
// if this node holds them and places its ranks elsewhere as a new
// generation; its tasks get SIGTERM with the deadline to checkpoint by.
func (a *Agent) Drain(ctx context.Context, deadline time.Time, reason string) error {
	d := time.Until(deadline)
	if d < 0 {
		d = 0
	}
	a.logger.Warn("draining this node", "reason", reason, "deadline", deadline.UTC().Format(time.RFC3339), "in", d.Round(time.Second))
	if a.raft != nil && a.raft.IsLeader() {
		// Hand over first, so the cluster keeps a leader that stays.
		if err := a.raft.TransferLeadership(); err != nil {
			a.logger.Warn("leadership transfer failed; the drain goes on", "error", err)
		}
	}
	cs := &controlServer{a: a}
	_, err := cs.DrainNode(ctx, &pb.DrainNodeRequest{Self: true, Deadline: durationpb.New(d), Reason: reason})
	if err != nil {
		return fmt.Errorf("drain: %w", err)
	}
	return nil
}

// MarkIneligible keeps new work off this node (an EC2 rebalance
// recommendation): running work stays.
func (a *Agent) MarkIneligible(reason string) error {
	a.logger.Warn("this node takes no new work", "reason", reason)
	return a.mesh.UpdateSelf(func(n *pb.Node) { n.Ineligible = true })
}

// DrainByName drains another node, named by name or ID, with a two-minute
// deadline (the fleet autoscaler's scale-in).
func (a *Agent) DrainByName(ctx context.Context, name, reason string) error {
	cs := &controlServer{a: a}
	_, err := cs.DrainNode(ctx, &pb.DrainNodeRequest{NodeId: name, Deadline: durationpb.New(2 * time.Minute), Reason: reason})
	return err
}

// eligibilityGuard keeps followRecord from undoing an eligibility change
// this agent is making: while it is under way, and for records older than
// the index it was recorded at.
type eligibilityGuard struct {
	mu      sync.Mutex
	pending bool
	index   uint64
}

func (g *eligibilityGuard) begin() {
	g.mu.Lock()
	g.pending = true
	g.mu.Unlock()
}

func (g *eligibilityGuard) end(index uint64) {
	g.mu.Lock()
	g.pending = false
	g.index = max(g.index, index)
	g.mu.Unlock()
}

// stale reports whether a record of this node modified at index must not
// be followed.
func (g *eligibilityGuard) stale(index uint64) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.pending || index < g.index
}

// followRecord brings this node's gossip record in line with its record in
// the cluster state when someone drained it or made it ineligible from
// another agent, so that every member's view (`gpumesh members`, the
// dashboard) says so. It only ever adds "draining" or "ineligible": this
// agent's own drain or rebalance notice reaches gossip before the state, and
// an operator ends them through SetEligibility.
func (a *Agent) followRecord(nodes []*pb.Node) {
	for _, n := range nodes {
		if n.Id != a.nodeID || a.elig.stale(n.ModifyIndex) {
			continue
		}
		draining, ineligible := n.Status == "draining", n.Ineligible
		if !draining && !ineligible {
			continue
		}
		cur := a.gossipSelf()
		if cur == nil || (draining && cur.Status != "draining") || (ineligible && !cur.Ineligible) {
			a.logger.Info("following this node's record in the cluster state", "status", n.Status, "ineligible", ineligible, "reason", n.StatusReason)
			_ = a.mesh.UpdateSelf(func(s *pb.Node) {
				if draining {
					s.Status = "draining"
				}
				s.Ineligible = s.Ineligible || ineligible
			})
		}
	}
}

// gossipSelf is this node's record as gossip carries it.
func (a *Agent) gossipSelf() *pb.Node {
	for _, m := range a.mesh.Members() {
		if m.Node != nil && m.Node.Id == a.nodeID {
			return m.Node
		}
	}
	return nil
}

// SetEligibility turns this node's eligibility for new work on or off
// (Nomad's `node eligibility`). On also ends a drain: the node is ready
// again. The change goes into gossip first and then through the leader into
// the cluster state.
func (a *Agent) SetEligibility(ctx context.Context, eligible bool) error {
	cs := &controlServer{a: a}
	_, err := cs.NodeEligibility(ctx, &pb.NodeEligibilityRequest{Self: true, Eligible: eligible})
	return err
}

// findNode resolves a node ID or name to its ID, name and RPC address, from
// the local replica, else from gossip; id is "" when no node matches.
func (a *Agent) findNode(idOrName string) (id, name, rpcAddr string) {
	if a.raft != nil && a.raft.HasState() {
		st := a.raft.State()
		n := st.Node(idOrName)
		if n == nil {
			n = st.NodeByName(idOrName)
		}
		if n != nil {
			return n.Id, n.Name, a.rpcAddrOf(n.Id)
		}
	}
	for _, m := range a.mesh.Members() {
		if m.Node != nil && (m.Node.Id == idOrName || m.Node.Name == idOrName) {
			addr := m.Node.RpcAddr
			if m.State == "dead" || m.State == "left" {
				addr = ""
			}
			return m.Node.Id, m.Node.Name, addr
		}
	}
	return "", "", ""
}

// gossipAgreesTimeout bounds how long the leader waits for a node's gossip
// record to drop "draining" and "ineligible" before it records the node
// eligible (shorter than a forwarded call's 5 s).
const gossipAgreesTimeout = 3 * time.Second

// waitGossipAvailable waits until gossip no longer says that node id is
// draining or ineligible (or no longer carries it alive), so that the
// leader's next reconcile does not take the node out again.
func (a *Agent) waitGossipAvailable(ctx context.Context, id string) error {
	ctx, cancel := context.WithTimeout(ctx, gossipAgreesTimeout)
	defer cancel()
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		busy := false
		for _, m := range a.mesh.Members() {
			if m.Node != nil && m.Node.Id == id && m.State == "alive" {
				busy = m.Node.Status == "draining" || m.Node.Ineligible
			}
		}
		if !busy {
			return nil
		}
		select {
		case <-ctx.Done():
			return status.Errorf(codes.Unavailable, "node %s still gossips that it is draining or ineligible after %s; try again", id, gossipAgreesTimeout)
		case <-t.C:
		}
	}
}
