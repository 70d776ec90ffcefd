package node

import (
	"net"
	"os"
	"strconv"
	"strings"
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

// An agent whose Raft cannot start (its port is taken) fails with an error
// that names Raft, without a panic in the shutdown that undoes the rest,
// and frees what it had opened: the same RPC port can be used at once.
func TestNewAgentRaftStartFailureCleansUp(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	rpc, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rpcPort := rpc.Addr().(*net.TCPAddr).Port
	rpc.Close()
	cfg := DefaultConfig()
	cfg.BindAddr, cfg.DataDir = "127.0.0.1", t.TempDir()
	cfg.GossipPort, cfg.RPCPort, cfg.HTTPPort = 0, rpcPort, 0
	cfg.RaftPort = taken.Addr().(*net.TCPAddr).Port
	cfg.Server, cfg.BootstrapExpect = true, 1
	cfg.GPUSampler = func() ([]cuda.GPUMetrics, error) { return nil, nil }
	a, err := NewAgent(cfg)
	if err == nil {
		a.Shutdown()
		t.Fatal("NewAgent started with its Raft port taken")
	}
	if a != nil || !strings.Contains(err.Error(), "raft") {
		t.Fatalf("NewAgent = %v, %v; want no agent and an error naming raft", a, err)
	}
	again, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(rpcPort)))
	if err != nil {
		t.Fatalf("the failed agent kept its RPC port: %v", err)
	}
	again.Close()
}
