package consensus

import (
	"fmt"
	"net"
	"strconv"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// DefaultRaftPort is the Raft port of gpumesh.
const DefaultRaftPort = 7948

// Config configures a Server. Build it with DefaultConfig and change what
// you need; NewServer validates it.
type Config struct {
	// NodeID is this node's unique, stable ID (also its Raft server ID).
	NodeID string
	// NodeName is the human name of the node (for logs and peers lists).
	NodeName string
	// DataDir holds the Raft state under DataDir/raft (log, stable store,
	// snapshots). It survives restarts: a server that finds state there
	// rejoins its cluster with it.
	DataDir string
	// RaftBindAddr is the host:port the Raft transport listens on. Port 0
	// picks a free port (tests). Default ":7948".
	RaftBindAddr string
	// RaftAdvertiseAddr is the host:port other servers dial; empty means the
	// listener's address (which must then not be unspecified).
	RaftAdvertiseAddr string
	// StreamLayer, when set, replaces the TCP listener and dialer of the
	// Raft transport (for TLS, or tests). RaftBindAddr is then ignored.
	StreamLayer raft.StreamLayer

	// BootstrapExpect is the number of server-eligible members that must be
	// seen in gossip before the first cluster bootstraps. Default 3.
	BootstrapExpect int
	// BootstrapSettle is how long the set of server-eligible members must
	// stay unchanged, once BootstrapExpect are seen, before bootstrapping:
	// it lets nodes that boot together converge on the same set. Default 1 s.
	BootstrapSettle time.Duration
	// MaxVoters is the number of voting Raft members kept: 1, 3 or 5
	// (default 3).
	MaxVoters int
	// Standbys is the number of non-voting Raft members kept warm for fast
	// promotion. Default 2.
	Standbys int

	// HeartbeatTimeout, ElectionTimeout and LeaderLeaseTimeout are Raft's
	// timeouts. The defaults (200 ms each) are tuned for a LAN so that a
	// failover takes under a second; the lease equals the heartbeat timeout
	// (raft's maximum) so that a leader on a busy machine does not step
	// down spuriously.
	HeartbeatTimeout   time.Duration
	ElectionTimeout    time.Duration
	LeaderLeaseTimeout time.Duration
	// CommitTimeout is how long the leader waits before sending a heartbeat
	// that carries the commit index. Default 5 ms.
	CommitTimeout time.Duration
	// MaxAppendEntries is the maximum number of log entries sent in one
	// AppendEntries RPC and batched into one disk write. Default 256.
	MaxAppendEntries int
	// SnapshotThreshold is the number of log entries after which a
	// snapshot is taken. Default 8192.
	SnapshotThreshold uint64
	// SnapshotInterval is how often the need for a snapshot is checked.
	// Default 30 s.
	SnapshotInterval time.Duration
	// TrailingLogs is how many log entries are kept after a snapshot, so
	// slow followers catch up without a snapshot. Default 10240.
	TrailingLogs uint64
	// SnapshotRetain is how many snapshots are kept on disk. Default 2.
	SnapshotRetain int

	// DeadServerCleanup is the most time a dead voter may stay in the
	// Raft configuration before the leader removes and replaces it.
	// Autopilot's reconcile interval is derived from it. Default 5 s.
	DeadServerCleanup time.Duration
	// ServerStabilization is how long a standby must be healthy before it
	// may be promoted to voter. Default 1 s.
	ServerStabilization time.Duration
	// LastContactThreshold: a server not heard from by the leader for this
	// long is unhealthy. Default 1 s.
	LastContactThreshold time.Duration

	// ReconcileInterval is how often the leader re-reads the membership
	// even without a nudge. Default 5 s.
	ReconcileInterval time.Duration
	// ApplyTimeout bounds how long a write waits to be enqueued in Raft
	// when its context has no deadline. Default 10 s.
	ApplyTimeout time.Duration

	// MasterPortMin and MasterPortMax bound the MASTER_PORT reserved for a
	// job on its rank 0 host, never two live jobs on one host and port;
	// the search starts at a port derived from the job ID and generation.
	// Default 29500..29999 (torchrun's default is 29500).
	MasterPortMin, MasterPortMax int

	// JobGCAge is how long an ended job (complete, failed or stopped) and
	// its allocations stay in the state before the leader purges them; zero
	// keeps them forever. JobGCInterval is how often the leader looks.
	JobGCAge, JobGCInterval time.Duration
	// AllocGCKeep is how many ended allocations each rank (replica slot of
	// a service) of a job that has not ended keeps, newest generations
	// first, besides those the scheduler still reads; the leader purges the
	// older ones every JobGCInterval (the rule: gc.go, allocsToPurge).
	// Zero keeps every allocation until its job is purged. Default 3.
	AllocGCKeep int
	// StopReportGrace is added to a job's kill timeout: ranks told to stop
	// that have not reported a final status by then are marked lost, so a
	// node that never reports cannot keep the job from being placed again.
	// Default 15 s.
	StopReportGrace time.Duration
	// SchedulerBatch is the most jobs whose plans go into one log entry.
	// Default 512.
	SchedulerBatch int
	// NodeLossGrace is how long a node may be silent (gossip reports it
	// dead, or it left) before the ranks it runs count as lost and their
	// generation is placed again (Nomad's heartbeat grace). An agent that
	// restarts within it finds its exec tasks still running, adopts them,
	// and the generation goes on. A generation ends sooner when one of its
	// own ranks fails while the node is silent (its peers saw it die).
	// Default 30 s.
	NodeLossGrace time.Duration
	// FailureSettle is how long after a rank fails the scheduler waits for
	// the rest of the generation to report, or for word that a node of
	// the generation is lost, before it counts the failure against the
	// job's restart policy: when a node dies its peers often fail before
	// gossip says the node is dead, and a node loss is not the job's
	// fault. Default 5 s.
	FailureSettle time.Duration

	// Membership is the gossip view. Required.
	Membership Membership
	// Logger receives structured logs; nil means a discarding logger.
	Logger hclog.Logger
}

// DefaultConfig returns a Config with LAN defaults; NodeID, DataDir and
// Membership must still be set.
func DefaultConfig() *Config {
	return &Config{
		RaftBindAddr:         ":" + strconv.Itoa(DefaultRaftPort),
		BootstrapExpect:      3,
		BootstrapSettle:      time.Second,
		MaxVoters:            3,
		Standbys:             2,
		HeartbeatTimeout:     200 * time.Millisecond,
		ElectionTimeout:      200 * time.Millisecond,
		LeaderLeaseTimeout:   200 * time.Millisecond,
		CommitTimeout:        5 * time.Millisecond,
		MaxAppendEntries:     256,
		SnapshotThreshold:    8192,
		SnapshotInterval:     30 * time.Second,
		TrailingLogs:         10240,
		SnapshotRetain:       2,
		DeadServerCleanup:    5 * time.Second,
		ServerStabilization:  time.Second,
		LastContactThreshold: time.Second,
		ReconcileInterval:    5 * time.Second,
		ApplyTimeout:         10 * time.Second,
		MasterPortMin:        29500,
		MasterPortMax:        29999,
		JobGCAge:             4 * time.Hour,
		JobGCInterval:        time.Minute,
		AllocGCKeep:          3,
		SchedulerBatch:       512,
		StopReportGrace:      15 * time.Second,
		NodeLossGrace:        30 * time.Second,
		FailureSettle:        5 * time.Second,
	}
}

// Validate checks the config's fields and their relations.
func (c *Config) Validate() error {
	bad := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, args...)...)
	}
	switch {
	case c.JobGCAge < 0 || c.JobGCInterval < 0:
		return bad("job gc age and interval must be >= 0, got %s and %s", c.JobGCAge, c.JobGCInterval)
	case c.AllocGCKeep < 0:
		return bad("AllocGCKeep must be >= 0 (0 keeps every ended allocation), got %d", c.AllocGCKeep)
	case c.NodeID == "":
		return bad("NodeID is empty; set it to the node's stable unique ID")
	case c.DataDir == "":
		return bad("DataDir is empty; set it to a directory that survives restarts")
	case c.Membership == nil:
		return bad("Membership is nil; pass the gossip view")
	case c.BootstrapExpect < 1:
		return bad("BootstrapExpect must be >= 1, got %d", c.BootstrapExpect)
	case c.MaxVoters < 1 || c.MaxVoters > 5:
		return bad("MaxVoters must be between 1 and 5, got %d", c.MaxVoters)
	case c.MaxVoters%2 == 0:
		return bad("MaxVoters must be odd (1, 3 or 5), got %d", c.MaxVoters)
	case c.BootstrapExpect > c.MaxVoters:
		return bad("BootstrapExpect (%d) must not exceed MaxVoters (%d)", c.BootstrapExpect, c.MaxVoters)
	case c.Standbys < 0:
		return bad("Standbys must be >= 0, got %d", c.Standbys)
	case c.HeartbeatTimeout < 5*time.Millisecond:
		return bad("HeartbeatTimeout must be >= 5ms, got %s", c.HeartbeatTimeout)
	case c.ElectionTimeout < c.HeartbeatTimeout:
		return bad("ElectionTimeout (%s) must be >= HeartbeatTimeout (%s)", c.ElectionTimeout, c.HeartbeatTimeout)
	case c.LeaderLeaseTimeout <= 0 || c.LeaderLeaseTimeout > c.HeartbeatTimeout:
		return bad("LeaderLeaseTimeout (%s) must be > 0 and <= HeartbeatTimeout (%s)", c.LeaderLeaseTimeout, c.HeartbeatTimeout)
	case c.CommitTimeout <= 0:
		return bad("CommitTimeout must be > 0, got %s", c.CommitTimeout)
	case c.MaxAppendEntries < 1 || c.MaxAppendEntries > 1024:
		return bad("MaxAppendEntries must be between 1 and 1024, got %d", c.MaxAppendEntries)
	case c.SnapshotThreshold < 1 || c.SnapshotInterval <= 0 || c.SnapshotRetain < 1:
		return bad("SnapshotThreshold, SnapshotInterval and SnapshotRetain must be positive")
	case c.DeadServerCleanup < 100*time.Millisecond:
		return bad("DeadServerCleanup must be >= 100ms, got %s", c.DeadServerCleanup)
	case c.ServerStabilization < 0 || c.LastContactThreshold <= 0:
		return bad("ServerStabilization must be >= 0 and LastContactThreshold > 0")
	case c.ReconcileInterval <= 0 || c.ApplyTimeout <= 0 || c.BootstrapSettle < 0:
		return bad("ReconcileInterval and ApplyTimeout must be > 0, BootstrapSettle >= 0")
	case c.MasterPortMin < 1 || c.MasterPortMax > 65535 || c.MasterPortMin > c.MasterPortMax:
		return bad("master port range %d..%d is not a valid port range", c.MasterPortMin, c.MasterPortMax)
	case c.StopReportGrace <= 0:
		return bad("StopReportGrace must be > 0, got %s", c.StopReportGrace)
	case c.SchedulerBatch < 1:
		return bad("SchedulerBatch must be >= 1, got %d", c.SchedulerBatch)
	case c.NodeLossGrace < 0 || c.FailureSettle < 0:
		return bad("NodeLossGrace and FailureSettle must be >= 0, got %s and %s", c.NodeLossGrace, c.FailureSettle)
	}
	if c.StreamLayer == nil {
		if _, _, err := net.SplitHostPort(c.RaftBindAddr); err != nil {
			return bad("RaftBindAddr %q is not host:port: %v", c.RaftBindAddr, err)
		}
	}
	if c.RaftAdvertiseAddr != "" {
		host, _, err := net.SplitHostPort(c.RaftAdvertiseAddr)
		if err != nil {
			return bad("RaftAdvertiseAddr %q is not host:port: %v", c.RaftAdvertiseAddr, err)
		}
		if ip := net.ParseIP(host); ip != nil && ip.IsUnspecified() {
			return bad("RaftAdvertiseAddr %q is unspecified; advertise an address others can dial", c.RaftAdvertiseAddr)
		}
	}
	return nil
}
