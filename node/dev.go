package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/consensus"
)

// DevConfig describes a local cluster of agents in one process.
type DevConfig struct {
	// Nodes is how many agents to start (default 3).
	Nodes int
	// DataDir holds one folder per agent; empty makes a temporary one that
	// Shutdown removes.
	DataDir string
	// BindAddr is the loopback address the agents share (default 127.0.0.1);
	// every agent gets its own free ports.
	BindAddr string
	// Logger receives every agent's logs, named by node.
	Logger hclog.Logger
	// Configure, if set, adjusts each agent's config before it starts.
	Configure func(i int, c *Config)
}

// DevCluster is a cluster of agents in one process on loopback, for
// `gpumesh dev` and for tests.
type DevCluster struct {
	Agents  []*Agent
	dataDir string
	tempDir bool
}

// NewDevCluster starts the agents; they join the first one and bootstrap
// Raft among the first min(Nodes, 3). Use WaitReady before submitting.
func NewDevCluster(cfg DevConfig) (*DevCluster, error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 3
	}
	if cfg.Nodes < 1 || cfg.Nodes > 64 {
		return nil, fmt.Errorf("dev cluster: nodes must be between 1 and 64, got %d", cfg.Nodes)
	}
	if cfg.BindAddr == "" {
		cfg.BindAddr = "127.0.0.1"
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	dc := &DevCluster{dataDir: cfg.DataDir}
	if dc.dataDir == "" {
		d, err := os.MkdirTemp("", "gpumesh-dev-")
		if err != nil {
			return nil, err
		}
		dc.dataDir, dc.tempDir = d, true
	}
	expect := cfg.Nodes
	if expect > 3 {
		expect = 3
	}
	for i := 0; i < cfg.Nodes; i++ {
		c := DefaultConfig()
		c.NodeName = fmt.Sprintf("node-%d", i+1)
		c.BindAddr = cfg.BindAddr
		c.GossipPort, c.RPCPort, c.RaftPort, c.HTTPPort = 0, 0, 0, 0
		c.DataDir = filepath.Join(dc.dataDir, c.NodeName)
		c.BootstrapExpect = expect
		c.MaxVoters = 3
		c.Dev = true
		c.Logger = cfg.Logger.Named(c.NodeName)
		if i > 0 {
			c.Join = []string{dc.Agents[0].GossipAddr()}
		}
		if cfg.Configure != nil {
			cfg.Configure(i, c)
		}
		a, err := NewAgent(c)
		if err != nil {
			dc.Shutdown()
			return nil, fmt.Errorf("dev cluster: starting %s: %w", c.NodeName, err)
		}
		dc.Agents = append(dc.Agents, a)
	}
	return dc, nil
}

// Leader returns the agent that leads, or nil.
func (dc *DevCluster) Leader() *Agent {
	for _, a := range dc.Agents {
		if a != nil && a.IsLeader() {
			return a
		}
	}
	return nil
}

// WaitReady waits until a leader is elected and every agent is a ready node
// in the replicated state.
func (dc *DevCluster) WaitReady(ctx context.Context) error {
	for {
		if l := dc.Leader(); l != nil && l.raft.HasState() {
			ready := 0
			for _, n := range l.raft.State().Nodes() {
				if n.Status == consensus.NodeReady {
					ready++
				}
			}
			if ready >= len(dc.Agents) {
				return nil
			}
		}
		select {
		case <-ctx.Done():
			return errors.New("dev cluster: no leader with every node ready before the deadline")
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// DataDir is where the agents keep their state.
func (dc *DevCluster) DataDir() string { return dc.dataDir }

// Shutdown stops every agent and removes a temporary data dir.
func (dc *DevCluster) Shutdown() {
	for i := len(dc.Agents) - 1; i >= 0; i-- {
		if dc.Agents[i] != nil {
			_ = dc.Agents[i].Shutdown()
		}
	}
	if dc.tempDir {
		os.RemoveAll(dc.dataDir)
	}
}
