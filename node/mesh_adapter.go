package node

import (
	"context"
	"fmt"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/mesh"
)

// meshAdapter turns package mesh into the agent's membership.
type meshAdapter struct {
	m       *mesh.Mesh
	changed chan struct{}
}

var _ membership = (*meshAdapter)(nil)

func newMesh(a *Agent, gossipPort int) (membership, error) {
	cfg := mesh.DefaultLANConfig()
	if a.cfg.Dev {
		cfg = mesh.DefaultLocalConfig()
	}
	cfg.NodeName = a.cfg.NodeName
	cfg.NodeID = a.nodeID
	cfg.BindAddr = a.cfg.BindAddr
	cfg.BindPort = gossipPort
	cfg.AdvertiseAddr = a.advAddr
	cfg.AdvertisePort = gossipPort
	cfg.Logger = a.logger.Named("mesh")
	cfg.ExpectedSize = a.cfg.ExpectNodes
	if a.cfg.EncryptKey != "" {
		k, err := mesh.DecodeKey(a.cfg.EncryptKey)
		if err != nil {
			return nil, err
		}
		cfg.SecretKey = k
	}
	if a.discoverer != nil {
		cfg.Discoverer = a.discoverer
	}
	cfg.Meta = nodeToMeta(a.self)
	ad := &meshAdapter{changed: make(chan struct{}, 1)}
	cfg.OnEvent = func(mesh.Event) {
		select {
		case ad.changed <- struct{}{}:
		default:
		}
	}
	m, err := mesh.New(cfg)
	if err != nil {
		return nil, err
	}
	ad.m = m
	return ad, nil
}

func nodeToMeta(n *pb.Node) mesh.Meta {
	lc, _ := mesh.ParseLifecycle(n.Lifecycle)
	st := mesh.StatusAlive
	if n.Status == consensus.NodeDraining {
		st = mesh.StatusDraining
	}
	meta := mesh.Meta{
		ID:               n.Id,
		Name:             n.Name,
		Addrs:            mesh.Addresses{Gossip: n.GossipAddr, RPC: n.RpcAddr, Raft: n.RaftAddr, HTTP: n.HttpAddr, Serve: n.ServeAddr},
		InstanceType:     n.InstanceType,
		AvailabilityZone: n.Az,
		Region:           n.Region,
		Lifecycle:        lc,
		Status:           st,
		Ineligible:       n.Ineligible,
		ServerEligible:   n.Server,
		Version:          n.Version,
		MaxRanks:         int(n.MaxRanks),
	}
	for _, g := range n.Gpus {
		meta.GPUs = append(meta.GPUs, mesh.GPU{Model: g.Model, MemoryBytes: g.MemoryBytes})
	}
	return meta
}

func metaToNode(m mesh.Meta) *pb.Node {
	n := &pb.Node{
		Id:           m.ID,
		Name:         m.Name,
		GossipAddr:   m.Addrs.Gossip,
		RpcAddr:      m.Addrs.RPC,
		RaftAddr:     m.Addrs.Raft,
		HttpAddr:     m.Addrs.HTTP,
		ServeAddr:    m.Addrs.Serve,
		InstanceType: m.InstanceType,
		Az:           m.AvailabilityZone,
		Region:       m.Region,
		Lifecycle:    m.Lifecycle.String(),
		Status:       consensus.NodeReady,
		Ineligible:   m.Ineligible,
		Server:       m.ServerEligible,
		Version:      m.Version,
		MaxRanks:     int32(m.MaxRanks),
	}
	if m.Status == mesh.StatusDraining {
		n.Status = consensus.NodeDraining
	}
	for i, g := range m.GPUs {
		n.Gpus = append(n.Gpus, &pb.GPU{Index: int32(i), Model: g.Model, MemoryBytes: g.MemoryBytes})
	}
	return n
}

func (ad *meshAdapter) Members() []member {
	ms := ad.m.Members()
	out := make([]member, 0, len(ms))
	for _, m := range ms {
		mm := member{Name: m.Name, Addr: m.Addr, State: m.State.String()}
		if m.MetaErr == nil {
			mm.Node = metaToNode(m.Meta)
			mm.bootstrapped = m.Meta.Bootstrapped
			mm.role = m.Meta.Role.String()
		}
		out = append(out, mm)
	}
	return out
}

func (ad *meshAdapter) Join(ctx context.Context, addrs []string) error {
	_, err := ad.m.Join(ctx, addrs)
	return err
}

func (ad *meshAdapter) UpdateSelf(fn func(n *pb.Node)) error {
	var ferr error
	err := ad.m.UpdateMeta(func(m *mesh.Meta) {
		n := metaToNode(*m)
		fn(n)
		nm := nodeToMeta(n)
		nm.Role = m.Role
		nm.Bootstrapped = m.Bootstrapped
		if nm.Addrs.Gossip == "" {
			nm.Addrs.Gossip = m.Addrs.Gossip
		}
		*m = nm
	})
	if ferr != nil {
		return ferr
	}
	if err != nil {
		return fmt.Errorf("gossip update: %w", err)
	}
	return nil
}

// SetRole records the consensus duty in gossip, for display.
func (ad *meshAdapter) SetRole(role string) {
	r := mesh.RoleClient
	switch role {
	case "leader", "voter":
		r = mesh.RoleVoter
	case "standby":
		r = mesh.RoleStandby
	}
	if ad.m.LocalMeta().Role != r {
		_ = ad.m.UpdateMeta(func(m *mesh.Meta) { m.Role = r })
	}
}

func (ad *meshAdapter) Changed() <-chan struct{} { return ad.changed }

func (ad *meshAdapter) Leave(timeout time.Duration) error { return ad.m.Leave(timeout) }

func (ad *meshAdapter) Shutdown() error { return ad.m.Shutdown() }

// SetBootstrapped gossips whether this node holds Raft state.
func (ad *meshAdapter) SetBootstrapped(b bool) {
	if ad.m.LocalMeta().Bootstrapped != b {
		_ = ad.m.UpdateMeta(func(m *mesh.Meta) { m.Bootstrapped = b })
	}
}
