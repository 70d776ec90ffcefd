package node

import (
	"net"
	"os"
	"strconv"
	"testing"

	"github.com/gpumesh/gpumesh/cuda"
)

// NewAgent fills in what the config leaves out (the node name) in its own
// copy: the caller's config is unchanged and can start another agent.
func TestNewAgentKeepsCallersConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.BindAddr, cfg.DataDir = "127.0.0.1", t.TempDir()
	cfg.GossipPort, cfg.RPCPort, cfg.RaftPort, cfg.HTTPPort = 0, 0, 0, 0
	cfg.Server = false
	cfg.GPUSampler = func() ([]cuda.GPUMetrics, error) { return nil, nil }
	before := *cfg
	a, err := NewAgent(cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown()
	host, _ := os.Hostname()
	_, port, _ := net.SplitHostPort(a.GossipAddr())
	gossipPort, _ := strconv.Atoi(port)
	if want := DefaultNodeName(host, cfg.BindAddr, gossipPort); a.Name() != want {
		t.Errorf("agent name %q, want the default %q", a.Name(), want)
	}
	if cfg.NodeName != before.NodeName || cfg.NodeID != before.NodeID {
		t.Errorf("NewAgent changed the caller's config: name %q, id %q", cfg.NodeName, cfg.NodeID)
	}
}
