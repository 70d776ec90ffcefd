package node

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/mesh"
	"github.com/gpumesh/gpumesh/sharding"
)

// Default ports of an agent (a contract scripts and security groups rely on).
// Gossip and Raft are defined by the packages that own them.
const (
	DefaultGossipPort = mesh.DefaultPort
	DefaultRPCPort    = 7947
	DefaultRaftPort   = consensus.DefaultRaftPort
	DefaultHTTPPort   = 7949
)

// Config is everything an Agent needs. cmd/gpumesh turns flags, environment
// and config files into one; tests build it directly.
type Config struct {
	// NodeName is the human name of the node, unique in the cluster.
	// Empty: DefaultNodeName (the host name, plus the bind address when it
	// is a loopback address and the gossip port when not the default).
	NodeName string
	// NodeID is the stable identity of the node. Empty: read from
	// DataDir/node-id, or created there on first start.
	NodeID string

	// BindAddr is the IP every listener binds to (default 0.0.0.0).
	BindAddr string
	// AdvertiseAddr is the IP other nodes use to reach this one. Empty: the
	// bind address if it is not a wildcard, else the first private address.
	AdvertiseAddr string
	// Ports. Zero picks a free port (tests and dev clusters).
	GossipPort, RPCPort, RaftPort, HTTPPort int
	// ServeAddr is where the agent serves service traffic only
	// (/svc/NAME/... and the Host form, as on the HTTP port) with a lean
	// HTTP/1.1 front end that costs less CPU per request than the HTTP
	// port's (service_serve.go): "host:port", or ":port" on BindAddr;
	// port 0 picks a free one. Empty (the default): no serve port; the
	// HTTP port routes services either way. HTTPS when the HTTP port is.
	ServeAddr string

	// DataDir holds the node ID, the Raft log and snapshots, and the
	// allocations' working directories and logs.
	DataDir string

	// Join lists gossip addresses (host or host:port) of existing members.
	Join []string
	// BootstrapExpect is how many server-eligible members must be seen before
	// the first Raft configuration is formed.
	BootstrapExpect int
	// Server makes the node eligible for a Raft seat (voter or standby).
	// Nodes that are not become clients.
	Server bool
	// MaxVoters caps the voters (odd, 1..5); Standbys non-voters stay warm.
	MaxVoters, Standbys int

	// EncryptKey is the base64 gossip encryption key (32 bytes), or empty.
	EncryptKey string
	// ExpectNodes is the fleet size this node's gossip is tuned for
	// (mesh.Config.ExpectedSize; 0: small, tuned as the mesh grows where
	// it can be). Failure detection settings are fixed when the agent
	// starts: give the fleet's size to agents of a large fleet.
	ExpectNodes int

	// MaxRanksPerNode caps the ranks (of all jobs) placed on this node; zero
	// means the number of CPU cores.
	MaxRanksPerNode int
	// CollectiveTimeout bounds how long a collective waits for a peer.
	CollectiveTimeout time.Duration
	// DataPlane is how collective and pipeline frames travel between
	// nodes: "tcp" (a plain TCP lane per link on the RPC port, set up and
	// authenticated through its gRPC stream, wrapped in the same mutual
	// TLS as gRPC when TLS is on) or "grpc" (on the gRPC streams). Empty
	// means "tcp".
	DataPlane string
	// LaneSocketBuffer is SO_SNDBUF/SO_RCVBUF of every TCP lane in bytes; 0
	// leaves them to the kernel's autotuning (see
	// collective.NetConfig.LaneSocketBuffer).
	LaneSocketBuffer int
	// TaskUser is the account exec tasks run as when their spec names none.
	// Empty means the agent's own user. Running as another user needs root:
	// an agent that is not root runs every task as itself and refuses specs
	// that name someone else. "dynamic" (DynamicTaskUser) gives every job an
	// account of its own from TaskUIDs. `gpumesh agent` defaults it to
	// "dynamic".
	TaskUser string
	// TaskUIDs is where dynamic task users' IDs come from. Zero means
	// DefaultTaskUIDs.
	TaskUIDs UIDRange
	// TaskUsersAllowed are the accounts a job's exec.user may name besides
	// TaskUser; a job naming any other fails with a message saying so.
	TaskUsersAllowed []string
	// JobGCAge is how long ended jobs stay in the cluster state (and can be
	// inspected) before the leader purges them; zero keeps them forever.
	JobGCAge time.Duration
	// AllocGCKeep is how many ended allocations each rank (service replica
	// slot) of a job that has not ended keeps for inspection, besides those
	// the scheduler still reads (consensus.Config.AllocGCKeep). Zero means
	// consensus's default (3).
	AllocGCKeep int
	// NodeLossGrace is how long a node may be silent before the leader
	// counts its ranks as lost and places their job again; an agent that
	// restarts within it adopts its still-running exec tasks and the job
	// goes on. Zero means consensus's default (30 s).
	NodeLossGrace time.Duration

	// Identity the node reports; on EC2, what is left empty comes from the
	// instance metadata.
	InstanceType, AZ, Region, Lifecycle string

	// Discoverer, when set, finds peers to join; it is retried until the
	// node has joined. EC2.JoinTag sets one.
	Discoverer Discoverer

	// EC2 is how the agent uses EC2: identity, spot notices, peers by tag,
	// fleet scaling (ec2.go). Nil: not at all.
	EC2 *EC2Config

	// Dev selects short timeouts suited to a cluster on one machine, and
	// exec tasks that stop when the agent's process exits, however it exits.
	Dev bool

	// GPUSampler reads GPU health for /metrics and the dashboard; nil means
	// NVML (cuda.Sample). Tests pass a fake.
	GPUSampler GPUSampler
	// GPUs lists the GPUs the node offers for placement, once at start;
	// nil means NVML (discoverGPUs). Tests pass a fake inventory.
	GPUs func() []*pb.GPU
	// Security is mutual TLS for gRPC and Raft and the ACL token for
	// mutating calls (security.go); the zero value is off.
	Security SecurityConfig

	// Logger receives the agent's logs; a named sub-logger per subsystem.
	Logger hclog.Logger
}

// Discoverer finds addresses ("host" or "host:port") of possible peers.
type Discoverer interface {
	Addrs(ctx context.Context) ([]string, error)
}

// DefaultConfig returns the production defaults.
func DefaultConfig() *Config {
	return &Config{
		BindAddr:          "0.0.0.0",
		GossipPort:        DefaultGossipPort,
		RPCPort:           DefaultRPCPort,
		RaftPort:          DefaultRaftPort,
		HTTPPort:          DefaultHTTPPort,
		BootstrapExpect:   3,
		Server:            true,
		MaxVoters:         3,
		Standbys:          2,
		CollectiveTimeout: 30 * time.Second,
		DataPlane:         "tcp",
		LaneSocketBuffer:  collective.DefaultNetConfig().LaneSocketBuffer,
		JobGCAge:          4 * time.Hour,
		AllocGCKeep:       consensus.DefaultConfig().AllocGCKeep,
		NodeLossGrace:     consensus.DefaultConfig().NodeLossGrace,
		Lifecycle:         "unknown",
	}
}

// Validate checks the fields against each other.
func (c *Config) Validate() error {
	var errs []error
	if c.DataDir == "" {
		errs = append(errs, errors.New("data dir is required (--data-dir)"))
	}
	if ip := net.ParseIP(c.BindAddr); ip == nil {
		errs = append(errs, fmt.Errorf("bind address %q is not an IP address (--bind)", c.BindAddr))
	}
	if c.AdvertiseAddr != "" {
		if ip := net.ParseIP(c.AdvertiseAddr); ip == nil || ip.IsUnspecified() {
			errs = append(errs, fmt.Errorf("advertise address %q must be a reachable IP address (--advertise)", c.AdvertiseAddr))
		}
	}
	for name, p := range map[string]int{"gossip": c.GossipPort, "rpc": c.RPCPort, "raft": c.RaftPort, "http": c.HTTPPort} {
		if p < 0 || p > 65535 {
			errs = append(errs, fmt.Errorf("%s port %d is out of range 0..65535", name, p))
		}
	}
	if c.ServeAddr != "" {
		host, port, err := net.SplitHostPort(c.ServeAddr)
		p, perr := strconv.Atoi(port)
		switch {
		case err != nil || perr != nil || p < 0 || p > 65535:
			errs = append(errs, fmt.Errorf("serve address %q: want host:port or :port, port 0..65535 (--serve)", c.ServeAddr))
		case host != "" && net.ParseIP(host) == nil:
			errs = append(errs, fmt.Errorf("serve address %q: the host must be an IP address (--serve)", c.ServeAddr))
		}
	}
	if c.ExpectNodes < 0 {
		errs = append(errs, fmt.Errorf("expect-nodes must be >= 0, got %d", c.ExpectNodes))
	}
	if c.Server && c.BootstrapExpect < 1 {
		errs = append(errs, fmt.Errorf("bootstrap-expect must be >= 1, got %d", c.BootstrapExpect))
	}
	if c.MaxVoters < 1 || c.MaxVoters > 5 {
		errs = append(errs, fmt.Errorf("max voters must be between 1 and 5, got %d", c.MaxVoters))
	}
	if c.Server && c.BootstrapExpect > 0 && c.BootstrapExpect > c.MaxVoters {
		errs = append(errs, fmt.Errorf("bootstrap-expect %d is more than the %d voters allowed (max voters)", c.BootstrapExpect, c.MaxVoters))
	}
	if c.Standbys < 0 {
		errs = append(errs, fmt.Errorf("standbys must be >= 0, got %d", c.Standbys))
	}
	if c.EncryptKey != "" {
		k, err := base64.StdEncoding.DecodeString(c.EncryptKey)
		if err != nil || len(k) != 32 {
			errs = append(errs, errors.New("encrypt key must be 32 bytes in base64 (make one with `openssl rand -base64 32`)"))
		}
	}
	if c.MaxRanksPerNode < 0 {
		errs = append(errs, fmt.Errorf("max ranks per node must be >= 0, got %d", c.MaxRanksPerNode))
	}
	switch c.DataPlane {
	case "", "tcp", "grpc":
	default:
		errs = append(errs, fmt.Errorf("data plane %q is not tcp or grpc (--data-plane)", c.DataPlane))
	}
	if c.LaneSocketBuffer < 0 {
		errs = append(errs, fmt.Errorf("lane socket buffer must be >= 0 bytes (0: kernel autotuning), got %d (--lane-socket-buffer)", c.LaneSocketBuffer))
	}
	if err := c.EC2.validate(); err != nil {
		errs = append(errs, err)
	}
	if c.AllocGCKeep < 0 {
		errs = append(errs, fmt.Errorf("allocation GC keep must be >= 1, got %d (--alloc-gc-keep)", c.AllocGCKeep))
	}
	if c.NodeLossGrace < 0 {
		errs = append(errs, fmt.Errorf("node loss grace must be >= 0, got %s (--node-loss-grace)", c.NodeLossGrace))
	}
	if c.CollectiveTimeout <= 0 {
		errs = append(errs, fmt.Errorf("collective timeout must be > 0, got %s", c.CollectiveTimeout))
	}
	switch c.Lifecycle {
	case "", sharding.LifecycleUnknown, sharding.LifecycleSpot, sharding.LifecycleOnDemand:
	default:
		errs = append(errs, fmt.Errorf("lifecycle %q is not spot, on-demand or unknown", c.Lifecycle))
	}
	if c.TaskUIDs != (UIDRange{}) {
		if err := c.TaskUIDs.Validate(); err != nil {
			errs = append(errs, fmt.Errorf("%w (--task-uid-range)", err))
		}
	}
	errs = append(errs, c.Security.Validate())
	return errors.Join(errs...)
}

func (c *Config) maxRanks() int {
	if c.MaxRanksPerNode > 0 {
		return c.MaxRanksPerNode
	}
	return runtime.NumCPU()
}

func joinHostPort(host string, port int) string {
	return net.JoinHostPort(host, strconv.Itoa(port))
}
