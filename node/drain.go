package node

import (
	"context"
	"fmt"
	"time"

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
	// Service replicas here take no new requests from now on.
	a.runner.drainServices()
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
