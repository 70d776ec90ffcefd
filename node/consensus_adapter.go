package node

import (
	"context"
	"errors"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// raftAdapter turns package consensus into the agent's raftServer.
type raftAdapter struct {
	s *consensus.Server
	a *Agent
}

var _ raftServer = (*raftAdapter)(nil)

func newRaft(a *Agent, raftPort int) (_ raftServer, err error) {
	cfg := consensus.DefaultConfig()
	if a.cfg.Dev {
		// BootstrapSettle keeps its default: it is also the time a late
		// joiner waits to learn that the others already formed a cluster.
		cfg.ReconcileInterval = time.Second
	}
	cfg.NodeID = a.nodeID
	cfg.NodeName = a.cfg.NodeName
	cfg.DataDir = a.cfg.DataDir
	cfg.RaftBindAddr = joinHostPort(a.cfg.BindAddr, raftPort)
	cfg.RaftAdvertiseAddr = joinHostPort(a.advAddr, raftPort)
	cfg.BootstrapExpect = a.cfg.BootstrapExpect
	cfg.MaxVoters = a.cfg.MaxVoters
	cfg.Standbys = a.cfg.Standbys
	cfg.JobGCAge = a.cfg.JobGCAge
	if a.cfg.JobGCAge > 0 {
		// Look often enough that nothing outlives its age by much.
		cfg.JobGCInterval = min(time.Minute, max(a.cfg.JobGCAge/4, 100*time.Millisecond))
	}
	if a.cfg.AllocGCKeep > 0 {
		cfg.AllocGCKeep = a.cfg.AllocGCKeep
	}
	if a.cfg.NodeLossGrace > 0 {
		cfg.NodeLossGrace = a.cfg.NodeLossGrace
	}
	cfg.Logger = a.logger.Named("consensus")
	cfg.Membership = &membershipView{a: a}
	if cfg.StreamLayer, err = a.sec.raftStreamLayer(cfg.RaftBindAddr, cfg.RaftAdvertiseAddr); err != nil {
		return nil, err
	}
	s, err := consensus.NewServer(cfg)
	if err != nil {
		return nil, err
	}
	return &raftAdapter{s: s, a: a}, nil
}

// membershipView shows gossip members to consensus.
type membershipView struct{ a *Agent }

func (v *membershipView) Members() []consensus.Member {
	ms := v.a.mesh.Members()
	out := make([]consensus.Member, 0, len(ms))
	for _, m := range ms {
		if m.Node == nil || m.Node.Id == "" {
			continue
		}
		out = append(out, consensus.Member{
			ID:           m.Node.Id,
			Name:         m.Name,
			RaftAddr:     m.Node.RaftAddr,
			RPCAddr:      m.Node.RpcAddr,
			Server:       m.Node.Server,
			State:        m.State,
			AZ:           m.Node.Az,
			Lifecycle:    m.Node.Lifecycle,
			Draining:     m.Node.Status == consensus.NodeDraining,
			Ineligible:   m.Node.Ineligible,
			Bootstrapped: m.bootstrapped,
			Node:         m.Node,
		})
	}
	return out
}

func wrapNotLeader(err error) error {
	if errors.Is(err, consensus.ErrNotLeader) || errors.Is(err, consensus.ErrNoLeader) || errors.Is(err, consensus.ErrLeadershipLost) {
		return errors.Join(errNotLeader, err)
	}
	if errors.Is(err, consensus.ErrJobNotFound) || errors.Is(err, consensus.ErrNodeNotFound) {
		return errors.Join(errNotFound, err)
	}
	if errors.Is(err, consensus.ErrInvalidArgument) {
		return errors.Join(errInvalidArgument, err)
	}
	return err
}

func (r *raftAdapter) IsLeader() bool                 { return r.s.IsLeader() }
func (r *raftAdapter) Leader() (string, string)       { return r.s.Leader() }
func (r *raftAdapter) Role() string                   { return r.s.Role() }
func (r *raftAdapter) HasState() bool                 { return r.s.Role() != "none" }
func (r *raftAdapter) State() stateReader             { return r.s.State() }
func (r *raftAdapter) Peers() ([]*pb.RaftPeer, error) { return r.s.Peers() }
func (r *raftAdapter) TransferLeadership() error      { return r.s.TransferLeadership() }
func (r *raftAdapter) TransferLeadershipTo(id string) error {
	return wrapNotLeader(r.s.TransferLeadershipTo(id))
}
func (r *raftAdapter) MembershipChanged()           { r.s.MembershipChanged() }
func (r *raftAdapter) Shutdown() error              { return r.s.Shutdown() }
func (r *raftAdapter) Bootstrapped() bool           { return r.s.Bootstrapped() }
func (r *raftAdapter) RoleChanged() <-chan struct{} { return r.s.RoleChanged() }

func (r *raftAdapter) Stats() consensus.RaftStats { return r.s.RaftStats() }

func (r *raftAdapter) CountLeaderChanges() *consensus.LeaderChangeCounter {
	return r.s.CountLeaderChanges()
}

func (r *raftAdapter) RegisterJob(ctx context.Context, id string, spec *pb.JobSpec) (string, uint64, error) {
	jid, idx, err := r.s.RegisterJobID(ctx, id, spec)
	return jid, idx, wrapNotLeader(err)
}

func (r *raftAdapter) UpdateService(ctx context.Context, id string, spec *pb.JobSpec) (string, uint64, error) {
	outcome, idx, err := r.s.UpdateService(ctx, id, spec)
	return outcome, idx, wrapNotLeader(err)
}

func (r *raftAdapter) StopJob(ctx context.Context, id string) (uint64, error) {
	idx, err := r.s.StopJob(ctx, id)
	return idx, wrapNotLeader(err)
}

func (r *raftAdapter) DrainNode(ctx context.Context, nodeID string, deadline time.Time, reason string) (uint64, error) {
	idx, err := r.s.DrainNode(ctx, nodeID, deadline, reason)
	return idx, wrapNotLeader(err)
}

func (r *raftAdapter) SetNodeEligibility(ctx context.Context, nodeID string, eligible bool) (uint64, error) {
	idx, err := r.s.SetNodeEligibility(ctx, nodeID, eligible)
	return idx, wrapNotLeader(err)
}

func (r *raftAdapter) UpdateAllocations(ctx context.Context, ups []*pb.Allocation) (uint64, error) {
	idx, err := r.s.UpdateAllocations(ctx, ups)
	return idx, wrapNotLeader(err)
}

func (r *raftAdapter) ReportLoad(nodeID string, inFlight map[string]float64) error {
	return wrapNotLeader(r.s.ReportLoad(nodeID, inFlight))
}

func (r *raftAdapter) UpsertNode(ctx context.Context, n *pb.Node) (uint64, error) {
	idx, err := r.s.UpsertNode(ctx, n)
	return idx, wrapNotLeader(err)
}
