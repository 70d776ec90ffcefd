package mesh

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"math"
	"net"
	"strings"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// DefaultPort is the gossip port (TCP and UDP).
const DefaultPort = 7946

// KeySize is the size of the gossip encryption key in bytes (AES-256-GCM).
const KeySize = 32

// Config configures a Mesh. Start from DefaultLANConfig (agents) or
// DefaultLocalConfig (tests and in-process clusters), set NodeName, NodeID
// and the addresses, and pass it to New. The gossip timing fields map
// one-to-one onto memberlist's Config; doc.go explains the LAN choices.
type Config struct {
	// NodeName is this node's unique name in the mesh (memberlist's node
	// name). Required; at most MaxNameLen bytes.
	NodeName string
	// NodeID is this node's stable unique ID (a UUID or the EC2 instance
	// ID), gossiped in Meta. Required; at most MaxIDLen bytes.
	NodeID string

	// BindAddr is the IP address the gossip listeners (TCP and UDP) bind
	// to. "0.0.0.0" binds all interfaces.
	BindAddr string
	// BindPort is the gossip port (TCP and UDP); 0 picks a free port,
	// which tests use.
	BindPort int
	// AdvertiseAddr is the IP address other nodes use to reach this one.
	// Empty: derived from BindAddr (a private address of this host when
	// BindAddr is "0.0.0.0").
	AdvertiseAddr string
	// AdvertisePort is the port other nodes use; 0 means the bound port.
	AdvertisePort int

	// Transport, if set, carries this node's gossip instead of UDP and
	// TCP sockets bound at BindAddr:BindPort (which are then ignored; the
	// transport names the node's address). One transport serves one Mesh,
	// which shuts it down. MemNetwork.NewTransport makes in-memory ones
	// for tests and simulations of large meshes.
	Transport memberlist.Transport

	// NoCompression turns off memberlist's LZW compression of every
	// gossip message (probes and acks included). Compression halves the
	// bytes; on a LAN it costs CPU on every packet, and CPU is what a
	// node whose cores training saturates lacks (doc.go). The presets
	// turn it off. A node decodes compressed messages either way, so
	// nodes with and without it mix.
	NoCompression bool

	// ExpectedSize is how many nodes the mesh is expected to hold (the
	// fleet size; 0: unknown, small). New starts memberlist with the
	// settings of ForSize(ExpectedSize): memberlist cannot change them
	// while it runs. The settings the Mesh applies itself (JoinMaxPeers,
	// JoinSyncRounds) follow ForSize of the larger of ExpectedSize and
	// the live members at each join, so they adapt as the mesh grows.
	ExpectedSize int

	// SecretKey enables gossip encryption (AES-256-GCM) when set. It must
	// be KeySize (32) bytes; DecodeKey turns the --encrypt string into it.
	// All nodes of a mesh must use the same key.
	SecretKey []byte

	// Meta is this node's initial metadata. New sets Meta.ID, Meta.Name
	// and Meta.Addrs.Gossip from NodeID, NodeName and the advertised
	// gossip address.
	Meta Meta

	// Logger receives structured logs (memberlist's own log lines are
	// re-leveled into it as the sub-logger "memberlist"). Nil discards.
	Logger hclog.Logger

	// OnEvent, if set, is called for every membership event, in order,
	// from a single goroutine owned by the Mesh (never from memberlist's
	// goroutines). A slow OnEvent delays only later events; it never
	// stalls gossip. It must not call Shutdown.
	OnEvent func(Event)

	// Discoverer, if set, starts an auto-join loop in New: it asks the
	// Discoverer for peer addresses and joins them, with backoff between
	// JoinRetryMin and JoinRetryMax, until one join succeeds or the Mesh
	// shuts down. It also rejoins when this node has been alone for
	// RejoinAfterAlone.
	Discoverer Discoverer

	// JoinRetryMin is the first wait between failed join attempts; it
	// doubles (with up to 25% jitter) up to JoinRetryMax.
	JoinRetryMin time.Duration
	// JoinRetryMax caps the wait between join attempts.
	JoinRetryMax time.Duration
	// JoinSyncRounds is how many extra full-state exchanges (push-pull) a
	// node makes after it joins, alternately with a peer that answered the
	// join and with a random live member, about JoinSyncDelay,
	// 2×JoinSyncDelay, 4×JoinSyncDelay, ... apart (so at about 1, 3, 7,
	// 15 × JoinSyncDelay at most; each wait is drawn from [½, 1] of its
	// length, so that the nodes of a mass join do not all reach the seeds
	// in the same instant). A round whose exchange fails (a busy seed
	// refuses) is made at once with a random live member instead.
	// They close the gap through which a node that joins during a burst
	// of joins would otherwise miss a peer until the periodic push-pull.
	// A round (with random members) also runs when this node's
	// incarnation grows: after it refutes a suspicion or a false death,
	// or updates its metadata. 0 disables them.
	JoinSyncRounds int
	// JoinSyncDelay is the wait before the first post-join push-pull.
	JoinSyncDelay time.Duration
	// FailureSyncDelay: this long after this node declares a peer dead,
	// it makes one push-pull with a random live member (deaths within
	// the delay share one), so that a false death that the peer refuted
	// is undone at once rather than at the next periodic push-pull.
	// 0 disables it.
	FailureSyncDelay time.Duration
	// RejoinAfterAlone makes the auto-join loop (only with a Discoverer)
	// run discovery again once this node has seen no other live member
	// for this long. 0 disables rejoining.
	RejoinAfterAlone time.Duration

	// ReconnectInterval is how often this node tries to join one random
	// member it saw fail (not leave), as Serf's reconnect does. Without it
	// the two sides of a healed network partition never gossip again:
	// memberlist probes and syncs only with live members, so each side
	// keeps the other dead. 0 disables reconnecting.
	ReconnectInterval time.Duration

	// TombstoneTimeout is how long Members keeps reporting a node after it
	// was seen dead or left. 0 keeps them until they rejoin.
	TombstoneTimeout time.Duration
	// JoinMaxPeers is how many of the given or discovered addresses one
	// join attempt contacts (a random subset, in parallel).
	JoinMaxPeers int

	// UpdateTimeout bounds how long UpdateMeta waits for the update to be
	// handed to peers by gossip before it returns (the update is applied
	// locally and keeps spreading either way).
	UpdateTimeout time.Duration

	// ProbeInterval is the time between failure-detector probes of one
	// random peer.
	ProbeInterval time.Duration
	// ProbeTimeout is how long a direct probe waits for an ack before
	// indirect probes are tried; set it to the 99th percentile RTT.
	ProbeTimeout time.Duration
	// IndirectChecks is the number of peers asked to probe a node that
	// missed a direct probe.
	IndirectChecks int
	// SuspicionMult sets the least time a node stays suspect before it is
	// declared dead: SuspicionMult × max(1, log10(N)) × ProbeInterval.
	SuspicionMult int
	// SuspicionMaxTimeoutMult sets the longest suspicion (without peer
	// confirmations) as a multiple of the least.
	SuspicionMaxTimeoutMult int
	// AwarenessMaxMultiplier is how far a node that sees signs of its own
	// slowness stretches its probe interval.
	AwarenessMaxMultiplier int
	// GossipInterval is the time between gossip rounds. A round sends
	// only when there is news.
	GossipInterval time.Duration
	// GossipNodes is the number of random peers per gossip round.
	GossipNodes int
	// RetransmitMult sets how many peers each node forwards one piece of
	// news to: RetransmitMult × ceil(log10(N+1)).
	RetransmitMult int
	// GossipToTheDeadTime is how long gossip still goes to a node after it
	// was declared dead, so that it can refute.
	GossipToTheDeadTime time.Duration
	// PushPullInterval is the base period of full-state exchanges with one
	// random peer; memberlist stretches it by ceil(log2(N/32))+1 above 32
	// nodes. 0 disables them.
	PushPullInterval time.Duration
	// TCPTimeout bounds a TCP connection (join, push-pull, fallback ping).
	TCPTimeout time.Duration
	// DeadNodeReclaimTime is how long after a node was declared dead a
	// node of the same name at another address may take its place.
	DeadNodeReclaimTime time.Duration
}

// DefaultLANConfig returns the agent defaults for one EC2 region's VPC (a
// LAN with sub-millisecond RTT): faster failure detection and gossip than
// memberlist's LAN preset, plus post-join syncs. See doc.go for the
// numbers and their cost.
func DefaultLANConfig() Config {
	return Config{
		BindAddr:                "0.0.0.0",
		BindPort:                DefaultPort,
		JoinRetryMin:            time.Second,
		JoinRetryMax:            30 * time.Second,
		JoinSyncRounds:          4,
		JoinSyncDelay:           250 * time.Millisecond,
		RejoinAfterAlone:        time.Minute,
		FailureSyncDelay:        time.Second,
		ReconnectInterval:       5 * time.Second,
		UpdateTimeout:           2 * time.Second,
		TombstoneTimeout:        24 * time.Hour,
		JoinMaxPeers:            5,
		ProbeInterval:           200 * time.Millisecond,
		ProbeTimeout:            100 * time.Millisecond,
		IndirectChecks:          3,
		SuspicionMult:           3,
		SuspicionMaxTimeoutMult: 4,
		AwarenessMaxMultiplier:  8,
		GossipInterval:          100 * time.Millisecond,
		GossipNodes:             4,
		RetransmitMult:          4,
		GossipToTheDeadTime:     15 * time.Second,
		PushPullInterval:        15 * time.Second,
		TCPTimeout:              5 * time.Second,
		DeadNodeReclaimTime:     30 * time.Second,
		NoCompression:           true,
	}
}

// DefaultLocalConfig returns settings for in-process meshes on loopback
// (tests, `gpumesh dev`): 127.0.0.1, a free port, short timeouts and fast
// join retries. Its probes (400 ms, 200 ms timeout, one indirect pinger)
// are slower than the LAN ones on purpose: the nodes of an in-process
// mesh share the CPU with each other and with whatever else runs (tests
// under -race on a loaded machine), and a starved node must not be
// declared dead. Suspicion settings are the LAN ones (SuspicionMult 3,
// SuspicionMaxTimeoutMult 4, AwarenessMaxMultiplier 8): in a dev cluster
// of 3-10 nodes a suspicion lasts 1.2 s (confirmed) to 4.8 s
// (unconfirmed). Gossip goes every 50 ms to 4 peers (a small cluster
// has little news; see doc.go on why the LAN preset keeps 100 ms).
func DefaultLocalConfig() Config {
	c := DefaultLANConfig()
	c.BindAddr = "127.0.0.1"
	c.BindPort = 0
	c.JoinRetryMin = 20 * time.Millisecond
	c.JoinRetryMax = 500 * time.Millisecond
	c.JoinSyncDelay = 100 * time.Millisecond
	c.RejoinAfterAlone = 5 * time.Second
	c.FailureSyncDelay = 200 * time.Millisecond
	c.ReconnectInterval = time.Second
	c.UpdateTimeout = time.Second
	c.ProbeInterval = 400 * time.Millisecond
	c.ProbeTimeout = 200 * time.Millisecond
	c.IndirectChecks = 1
	c.GossipInterval = 50 * time.Millisecond
	c.GossipToTheDeadTime = 5 * time.Second
	c.PushPullInterval = 5 * time.Second
	c.TCPTimeout = time.Second
	c.DeadNodeReclaimTime = 2 * time.Second
	return c
}

// SuspicionTimeouts returns the shortest and longest time a suspect peer
// stays suspect before this node declares it dead, in a mesh of n nodes,
// as memberlist computes them: min = SuspicionMult × max(1, log10(n)) ×
// ProbeInterval, reached once SuspicionMult-2 other members have
// independently confirmed the suspicion (Lifeguard), or at once when the
// mesh is too small for that (n-2 < SuspicionMult-2); max =
// SuspicionMaxTimeoutMult × min, the timeout without confirmations.
// Confirmations in between shorten it on a log scale.
func (c *Config) SuspicionTimeouts(n int) (min, max time.Duration) {
	scale := math.Max(1, math.Log10(math.Max(1, float64(n))))
	// memberlist's own arithmetic: milli-precision scale, then the interval.
	min = time.Duration(c.SuspicionMult) * time.Duration(scale*1000) * c.ProbeInterval / 1000
	return min, time.Duration(c.SuspicionMaxTimeoutMult) * min
}

// SuspicionConfirmations returns how many independent confirmations
// (other members that also failed to probe the peer) shorten a suspicion
// from its longest to its shortest timeout in a mesh of n nodes:
// SuspicionMult-2, or 0 when fewer than that many other nodes exist (the
// shortest timeout then applies at once).
func (c *Config) SuspicionConfirmations(n int) int {
	k := c.SuspicionMult - 2
	if n-2 < k {
		return 0
	}
	return k
}

// GenerateKey returns a new random key in the form DecodeKey reads.
func GenerateKey() (string, error) {
	k := make([]byte, KeySize)
	if _, err := rand.Read(k); err != nil {
		return "", fmt.Errorf("mesh: generate key: %w", err)
	}
	return base64.StdEncoding.EncodeToString(k), nil
}

// DecodeKey decodes the --encrypt value: standard base64 of exactly
// KeySize bytes (as `openssl rand -base64 32` prints).
func DecodeKey(s string) ([]byte, error) {
	s = strings.TrimSpace(s)
	k, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		return nil, fmt.Errorf("%w: not standard base64 (%v): generate one with `openssl rand -base64 32`", ErrInvalidKey, err)
	}
	if len(k) != KeySize {
		return nil, fmt.Errorf("%w: decodes to %d bytes, need %d: generate one with `openssl rand -base64 32`", ErrInvalidKey, len(k), KeySize)
	}
	return k, nil
}

// Validate checks the fields and their relations.
func (c *Config) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, a...)...)
	}
	if c.NodeName == "" {
		return bad("NodeName is empty: give every agent a unique --name")
	}
	if err := checkString("NodeName", c.NodeName, MaxNameLen); err != nil {
		return bad("%v", err)
	}
	if c.NodeID == "" {
		return bad("NodeID is empty: set a stable unique ID (UUID or instance ID)")
	}
	if err := checkString("NodeID", c.NodeID, MaxIDLen); err != nil {
		return bad("%v", err)
	}
	if net.ParseIP(c.BindAddr) == nil {
		return bad("BindAddr %q is not an IP address", c.BindAddr)
	}
	if c.AdvertiseAddr != "" && net.ParseIP(c.AdvertiseAddr) == nil {
		return bad("AdvertiseAddr %q is not an IP address", c.AdvertiseAddr)
	}
	if c.BindPort < 0 || c.BindPort > 65535 {
		return bad("BindPort %d is not in 0..65535", c.BindPort)
	}
	if c.AdvertisePort < 0 || c.AdvertisePort > 65535 {
		return bad("AdvertisePort %d is not in 0..65535", c.AdvertisePort)
	}
	if c.SecretKey != nil && len(c.SecretKey) != KeySize {
		return fmt.Errorf("%w: %w: SecretKey is %d bytes, need %d (base64 of 32 random bytes, `openssl rand -base64 32`)",
			ErrInvalidConfig, ErrInvalidKey, len(c.SecretKey), KeySize)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"JoinRetryMin", c.JoinRetryMin}, {"JoinRetryMax", c.JoinRetryMax},
		{"UpdateTimeout", c.UpdateTimeout}, {"ProbeInterval", c.ProbeInterval},
		{"ProbeTimeout", c.ProbeTimeout}, {"GossipInterval", c.GossipInterval},
		{"TCPTimeout", c.TCPTimeout},
	} {
		if d.v <= 0 {
			return bad("%s must be > 0, got %v", d.name, d.v)
		}
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"JoinSyncDelay", c.JoinSyncDelay}, {"RejoinAfterAlone", c.RejoinAfterAlone},
		{"FailureSyncDelay", c.FailureSyncDelay},
		{"ReconnectInterval", c.ReconnectInterval},
		{"GossipToTheDeadTime", c.GossipToTheDeadTime}, {"PushPullInterval", c.PushPullInterval},
		{"DeadNodeReclaimTime", c.DeadNodeReclaimTime}, {"TombstoneTimeout", c.TombstoneTimeout},
	} {
		if d.v < 0 {
			return bad("%s must be >= 0, got %v", d.name, d.v)
		}
	}
	if c.ExpectedSize < 0 {
		return bad("ExpectedSize must be >= 0, got %d", c.ExpectedSize)
	}
	if c.JoinRetryMax < c.JoinRetryMin {
		return bad("JoinRetryMax (%v) must be >= JoinRetryMin (%v)", c.JoinRetryMax, c.JoinRetryMin)
	}
	if c.JoinSyncRounds < 0 || c.JoinSyncRounds > 16 {
		return bad("JoinSyncRounds must be in 0..16, got %d", c.JoinSyncRounds)
	}
	if c.JoinSyncRounds > 0 && c.JoinSyncDelay == 0 {
		return bad("JoinSyncDelay must be > 0 when JoinSyncRounds is %d", c.JoinSyncRounds)
	}
	if c.ProbeTimeout >= c.ProbeInterval {
		return bad("ProbeTimeout (%v) must be shorter than ProbeInterval (%v)", c.ProbeTimeout, c.ProbeInterval)
	}
	for _, n := range []struct {
		name string
		v    int
	}{
		{"IndirectChecks", c.IndirectChecks}, {"SuspicionMult", c.SuspicionMult},
		{"SuspicionMaxTimeoutMult", c.SuspicionMaxTimeoutMult},
		{"AwarenessMaxMultiplier", c.AwarenessMaxMultiplier},
		{"GossipNodes", c.GossipNodes}, {"RetransmitMult", c.RetransmitMult},
		{"JoinMaxPeers", c.JoinMaxPeers},
	} {
		if n.v < 1 {
			return bad("%s must be >= 1, got %d", n.name, n.v)
		}
	}
	if c.SuspicionMult < 2 {
		return bad("SuspicionMult must be >= 2 (lower declares healthy nodes dead on one lost probe), got %d", c.SuspicionMult)
	}
	return nil
}

// ForSize returns c adapted to a mesh of about n nodes (the expected
// fleet size; see ExpectedSize for what New does with it). It is a
// pure function of c and n; a mesh of 64 nodes or fewer gets c unchanged,
// so small clusters keep their measured detection times. memberlist
// itself already scales the suspicion timeout (× log10 n), the number of
// retransmits (× log10 n+1) and the push-pull period (× log2 n/32); on
// top of that, with s = ceil(log4(n/64)) size steps (1 up to 256 nodes,
// 2 up to 1,024, 3 up to 4,096):
//
//   - IndirectChecks grows by s (at most 6): before a node is suspected,
//     more other members must also fail to reach it, so one starved or
//     badly connected prober cannot accuse it alone.
//   - SuspicionMult grows by 1 above 256 nodes: the shortest suspicion
//     then needs two independent confirmations instead of one (the
//     timeout still falls to memberlist's log-scaled minimum).
//   - JoinMaxPeers falls to at most 2 above 128 nodes: each contacted
//     seed serves a full-state exchange whose size grows with n, and in a
//     mass join every seed would otherwise serve JoinMaxPeers × n of them
//     at once.
//
// JoinSyncRounds stays: the post-join push-pulls are what makes a mass
// join converge. Gossip alone cannot: each node sends at most GossipNodes
// packets of about 8 alive messages per GossipInterval, while a mass join
// of n nodes needs about n² × RetransmitMult × ceil(log10(n+1)) of them
// (about 50 s at 1,000 nodes). With 2 rounds, 1,000 simulated nodes still
// missed 6,703 (observer, member) pairs 5 s after the join; with 4, none
// after 1.54 s (bench/results/fleet.md, virtual time).
// Probe and gossip intervals stay: a node probes one peer per interval
// whatever n is, so its own load is constant and a failed node is first
// probed within about one interval (Lifeguard's design). JoinMaxPeers only
// ever falls, so applying ForSize to its own result leaves it as it is.
func (c Config) ForSize(n int) Config {
	if n <= 64 {
		return c
	}
	s := sizeSteps(n)
	c.IndirectChecks = min(c.IndirectChecks+s, max(c.IndirectChecks, 6))
	if n > 256 {
		c.SuspicionMult++
	}
	if n > 128 {
		c.JoinMaxPeers = min(c.JoinMaxPeers, 2)
	}
	return c
}

// sizeSteps returns ceil(log4(n/64)) for n > 64, else 0.
func sizeSteps(n int) int {
	s := 0
	for size := 64; size < n; size *= 4 {
		s++
	}
	return s
}
