package mesh

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// State is a member's health as this node sees it.
type State int

// States.
const (
	// StateAlive: answering probes.
	StateAlive State = iota
	// StateSuspect: missed probes; declared dead unless it refutes within
	// the suspicion timeout.
	StateSuspect
	// StateDead: declared failed.
	StateDead
	// StateLeft: left gracefully (Leave).
	StateLeft
)

func (s State) String() string {
	switch s {
	case StateAlive:
		return "alive"
	case StateSuspect:
		return "suspect"
	case StateDead:
		return "dead"
	case StateLeft:
		return "left"
	}
	return "State(" + strconv.Itoa(int(s)) + ")"
}

// Member is a snapshot of one node as this node sees it.
type Member struct {
	// Name is the node's mesh name.
	Name string `json:"name"`
	// Addr is the node's gossip address, host:port.
	Addr string `json:"addr"`
	// State is the node's health.
	State State `json:"state"`
	// Since is when this node saw State begin.
	Since time.Time `json:"since"`
	// Meta is the node's gossiped record (zero if MetaErr is set).
	Meta Meta `json:"meta"`
	// MetaErr is set when the node's record could not be decoded (for
	// example a newer format version); the member is still listed.
	MetaErr error `json:"-"`
}

// EventType says what happened to a member.
type EventType int

// Event types.
const (
	// EventJoin: a node became alive (first seen, or back from dead/left).
	EventJoin EventType = iota
	// EventLeave: a node left gracefully.
	EventLeave
	// EventFailed: a node was declared dead.
	EventFailed
	// EventUpdate: a live node changed its metadata.
	EventUpdate
)

func (t EventType) String() string {
	switch t {
	case EventJoin:
		return "join"
	case EventLeave:
		return "leave"
	case EventFailed:
		return "failed"
	case EventUpdate:
		return "update"
	}
	return "EventType(" + strconv.Itoa(int(t)) + ")"
}

// Event is one membership change. Events about one node arrive in the
// order this node learned them; the local node's own join and updates are
// events too.
type Event struct {
	Type   EventType
	Member Member
}

// Discoverer finds addresses of possible peers, for example EC2 instances
// with a cluster tag.
type Discoverer interface {
	// Addrs returns candidate peer addresses, "host" or "host:port" (the
	// port defaults to this node's gossip port). It may include this
	// node's own address; the Mesh filters it. It is called from the
	// Mesh's auto-join goroutine, never concurrently with itself, and must
	// return promptly once ctx is done.
	Addrs(ctx context.Context) ([]string, error)
}

// StaticDiscoverer is a fixed address list (the --join flags).
type StaticDiscoverer []string

// Addrs returns the list.
func (s StaticDiscoverer) Addrs(context.Context) ([]string, error) { return slices.Clone(s), nil }

// DiscovererFunc adapts a function to Discoverer.
type DiscovererFunc func(ctx context.Context) ([]string, error)

// Addrs calls f.
func (f DiscovererFunc) Addrs(ctx context.Context) ([]string, error) { return f(ctx) }

var (
	_ Discoverer                  = StaticDiscoverer(nil)
	_ Discoverer                  = DiscovererFunc(nil)
	_ memberlist.Delegate         = (*delegate)(nil)
	_ memberlist.EventDelegate    = (*delegate)(nil)
	_ memberlist.ConflictDelegate = (*delegate)(nil)
)

// Mesh is this node's membership in the gossip mesh. All methods are safe
// for concurrent use.
type Mesh struct {
	// cfg is the configuration adapted to ExpectedSize (what memberlist
	// runs with); base is the one given to New (see sized).
	cfg, base Config
	log       hclog.Logger
	ml        *memberlist.Memberlist

	metaMu    sync.Mutex // guards meta, metaBytes
	meta      Meta
	metaBytes []byte

	mu      sync.Mutex // guards members, subs; never held while taking memberlist's lock
	members map[string]*Member
	subs    map[*subscriber]struct{}

	joinedOnce sync.Once
	joinedCh   chan struct{} // closed on the first successful join
	left       atomic.Bool
	syncing    atomic.Bool   // a round of post-join syncs is running
	failedCh   chan struct{} // capacity 1: a peer was declared dead
	lifeMu     sync.Mutex    // serializes memberlist's Leave and Shutdown (Leave after Shutdown panics)

	shutdownOnce sync.Once
	shutdownCh   chan struct{}
	goMu         sync.Mutex // guards goClosed and wg.Add
	goClosed     bool
	wg           sync.WaitGroup // every goroutine the Mesh starts
}

// New validates cfg, binds the gossip listeners and starts memberlist. It
// does not contact anyone: call Join, or set Config.Discoverer.
func New(cfg Config) (*Mesh, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	base := cfg
	cfg = cfg.ForSize(cfg.ExpectedSize) // memberlist's settings, fixed while it runs
	m := &Mesh{
		cfg:        cfg,
		base:       base,
		log:        log,
		members:    make(map[string]*Member),
		subs:       make(map[*subscriber]struct{}),
		joinedCh:   make(chan struct{}),
		failedCh:   make(chan struct{}, 1),
		shutdownCh: make(chan struct{}),
	}
	m.meta = cfg.Meta.Clone()
	m.meta.ID, m.meta.Name = cfg.NodeID, cfg.NodeName
	if m.meta.Addrs.Gossip == "" && cfg.BindPort != 0 && cfg.Transport == nil {
		host := cfg.AdvertiseAddr
		if host == "" && !net.ParseIP(cfg.BindAddr).IsUnspecified() {
			host = cfg.BindAddr
		}
		port := cfg.AdvertisePort
		if port == 0 {
			port = cfg.BindPort
		}
		if host != "" {
			m.meta.Addrs.Gossip = net.JoinHostPort(host, strconv.Itoa(port))
		}
	}
	b, err := m.meta.Encode()
	if err != nil {
		return nil, err
	}
	m.metaBytes = b

	if cfg.OnEvent != nil {
		m.addSubscriber(func(ev Event) { cfg.OnEvent(ev) }, nil)
	}

	mc := memberlist.DefaultLANConfig()
	mc.Name = cfg.NodeName
	mc.BindAddr, mc.BindPort = cfg.BindAddr, cfg.BindPort
	mc.AdvertiseAddr, mc.AdvertisePort = cfg.AdvertiseAddr, cfg.AdvertisePort
	if mc.AdvertisePort == 0 {
		mc.AdvertisePort = cfg.BindPort
	}
	mc.ProbeInterval, mc.ProbeTimeout = cfg.ProbeInterval, cfg.ProbeTimeout
	mc.IndirectChecks = cfg.IndirectChecks
	mc.SuspicionMult, mc.SuspicionMaxTimeoutMult = cfg.SuspicionMult, cfg.SuspicionMaxTimeoutMult
	mc.AwarenessMaxMultiplier = cfg.AwarenessMaxMultiplier
	mc.GossipInterval, mc.GossipNodes = cfg.GossipInterval, cfg.GossipNodes
	mc.RetransmitMult = cfg.RetransmitMult
	mc.GossipToTheDeadTime = cfg.GossipToTheDeadTime
	mc.PushPullInterval = cfg.PushPullInterval
	mc.TCPTimeout = cfg.TCPTimeout
	mc.DeadNodeReclaimTime = cfg.DeadNodeReclaimTime
	if cfg.Transport != nil {
		mc.Transport = cfg.Transport
	}
	mc.EnableCompression = !cfg.NoCompression
	if cfg.SecretKey != nil {
		mc.SecretKey = slices.Clone(cfg.SecretKey)
	}
	mc.Logger = log.Named("memberlist").StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true})
	mc.LogOutput = nil
	d := &delegate{m: m}
	mc.Delegate, mc.Events, mc.Conflict = d, d, d

	ml, err := memberlist.Create(mc)
	if err != nil {
		close(m.shutdownCh) // stops the OnEvent goroutine
		m.goMu.Lock()
		m.goClosed = true
		m.goMu.Unlock()
		m.wg.Wait()
		if cfg.BindPort != 0 && isAddrInUse(err) {
			return nil, fmt.Errorf("mesh: gossip port %s:%d is in use: stop the other agent or pick another --bind address or port: %w",
				cfg.BindAddr, cfg.BindPort, err)
		}
		return nil, fmt.Errorf("mesh: start gossip on %s:%d: %w", cfg.BindAddr, cfg.BindPort, err)
	}
	m.ml = ml

	// The gossip address is only known once the transport is bound (port 0,
	// or an unspecified bind address); publish it before anyone is told.
	if gossip := ml.LocalNode().Address(); gossip != m.meta.Addrs.Gossip {
		if err := m.updateMeta(func(mt *Meta) { mt.Addrs.Gossip = gossip }, true); err != nil {
			_ = m.Shutdown()
			return nil, err
		}
	}
	if cfg.Discoverer != nil {
		m.goFunc(func() { m.autoJoin(cfg.Discoverer) })
	}
	if cfg.ReconnectInterval > 0 {
		m.goFunc(m.reconnectLoop)
	}
	if cfg.JoinSyncRounds > 0 {
		m.goFunc(m.watchRefutes)
	}
	if cfg.FailureSyncDelay > 0 {
		m.goFunc(m.watchFailures)
	}
	m.log.Info("gossip started", "name", cfg.NodeName, "addr", m.Addr(), "encrypted", cfg.SecretKey != nil)
	return m, nil
}

func isAddrInUse(err error) bool {
	return strings.Contains(err.Error(), "address already in use")
}

// goFunc runs f in a goroutine that Shutdown waits for. After Shutdown
// has begun it does nothing and returns false.
func (m *Mesh) goFunc(f func()) bool {
	m.goMu.Lock()
	defer m.goMu.Unlock()
	if m.goClosed {
		return false
	}
	m.wg.Add(1)
	go func() {
		defer m.wg.Done()
		f()
	}()
	return true
}

// Addr returns this node's advertised gossip address, host:port.
func (m *Mesh) Addr() string {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	return m.meta.Addrs.Gossip
}

// Name returns this node's name.
func (m *Mesh) Name() string { return m.cfg.NodeName }

// LocalMeta returns a copy of this node's current metadata.
func (m *Mesh) LocalMeta() Meta {
	m.metaMu.Lock()
	defer m.metaMu.Unlock()
	return m.meta.Clone()
}

// UpdateMeta applies fn to a copy of this node's metadata and, if the
// result is valid and fits MetaMaxSize, publishes it: it is applied
// locally at once (an EventUpdate for this node) and gossiped to peers.
// UpdateMeta waits up to Config.UpdateTimeout for the first gossip hops;
// the update keeps spreading after that. fn must not change ID, Name or
// Addrs.Gossip (ErrImmutableMeta) and must not call Mesh methods. On error
// nothing changes.
func (m *Mesh) UpdateMeta(fn func(*Meta)) error {
	return m.updateMeta(fn, false)
}

func (m *Mesh) updateMeta(fn func(*Meta), gossipAddrMayChange bool) error {
	if m.isShutdown() {
		return ErrShutdown
	}
	m.metaMu.Lock()
	next := m.meta.Clone()
	fn(&next)
	if next.ID != m.meta.ID || next.Name != m.meta.Name ||
		(next.Addrs.Gossip != m.meta.Addrs.Gossip && !gossipAddrMayChange) {
		m.metaMu.Unlock()
		return fmt.Errorf("%w: keep ID %q, name %q and gossip address %q", ErrImmutableMeta, m.meta.ID, m.meta.Name, m.meta.Addrs.Gossip)
	}
	b, err := next.Encode()
	if err != nil {
		m.metaMu.Unlock()
		return err
	}
	m.meta, m.metaBytes = next, b
	m.metaMu.Unlock()
	// The only error UpdateNode returns is its timeout: the update is
	// applied locally and queued for gossip, so it is not a failure.
	if err := m.ml.UpdateNode(m.cfg.UpdateTimeout); err != nil {
		m.log.Debug("metadata update still spreading", "error", err)
	}
	return nil
}

// Members returns every node this node knows, itself included, sorted by
// name: alive and suspect ones, and dead or left ones for
// Config.TombstoneTimeout after they went.
func (m *Mesh) Members() []Member {
	snap, haveSnap := mlSnapshot(m.ml) // before m.mu: lock order is memberlist, then m.mu
	now := time.Now()
	m.mu.Lock()
	defer m.mu.Unlock()
	out := make([]Member, 0, len(m.members))
	for name, rec := range m.members {
		if rec.State == StateDead || rec.State == StateLeft {
			if m.cfg.TombstoneTimeout > 0 && now.Sub(rec.Since) > m.cfg.TombstoneTimeout {
				delete(m.members, name)
				continue
			}
		}
		mem := *rec
		mem.Meta = rec.Meta.Clone()
		if haveSnap && mem.State == StateAlive {
			if info, ok := snap[name]; ok && info.State == memberlist.StateSuspect {
				mem.State, mem.Since = StateSuspect, info.StateChange
			}
		}
		out = append(out, mem)
	}
	slices.SortFunc(out, func(a, b Member) int { return strings.Compare(a.Name, b.Name) })
	return out
}

// Member returns the named member, if known.
func (m *Mesh) Member(name string) (Member, bool) {
	for _, mem := range m.Members() {
		if mem.Name == name {
			return mem, true
		}
	}
	return Member{}, false
}

// NumAlive returns how many members, this node included, are alive or
// suspect.
func (m *Mesh) NumAlive() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for _, rec := range m.members {
		if rec.State == StateAlive {
			n++
		}
	}
	return n
}

// Joined returns a channel that is closed once a join has succeeded.
func (m *Mesh) Joined() <-chan struct{} { return m.joinedCh }

// Join contacts the given peers ("host" or "host:port"; this node's own
// address is skipped) and exchanges full state with each reachable one.
// It retries with exponential backoff (Config.JoinRetryMin doubling up to
// JoinRetryMax, with jitter) until at least one peer answers, ctx ends
// or the Mesh shuts down. Each attempt contacts up to
// Config.JoinMaxPeers of the addresses at once and succeeds as soon as
// one answers (it returns 1; the others are still contacted in the
// background, so a dead seed neither fails nor delays the join). A list
// with no address but this node's own returns ErrNoPeers at once. After
// a successful join, the Mesh makes Config.JoinSyncRounds more state
// exchanges with random members in the background.
func (m *Mesh) Join(ctx context.Context, addrs []string) (int, error) {
	b := newBackoff(m.cfg.JoinRetryMin, m.cfg.JoinRetryMax)
	for attempt := 1; ; attempt++ {
		n, err := m.joinOnce(addrs)
		if err == nil {
			return n, nil
		}
		if errors.Is(err, ErrNoPeers) || errors.Is(err, ErrShutdown) || errors.Is(err, ErrLeft) {
			return 0, err
		}
		wait := b.next()
		m.log.Warn("join failed, retrying", "addrs", addrs, "attempt", attempt, "retry_in", wait, "error", err)
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return 0, fmt.Errorf("mesh: join %s: gave up after %d attempts: %w (last error: %v)", strings.Join(addrs, ","), attempt, ctx.Err(), err)
		case <-m.shutdownCh:
			t.Stop()
			return 0, ErrShutdown
		}
	}
}

// joinOnce makes one join attempt: up to JoinMaxPeers random addresses
// of addrs, in parallel; it returns when the first one answers.
func (m *Mesh) joinOnce(addrs []string) (int, error) {
	if m.isShutdown() {
		return 0, ErrShutdown
	}
	if m.left.Load() {
		return 0, ErrLeft
	}
	peers := m.filterSelf(addrs)
	if len(peers) == 0 {
		return 0, fmt.Errorf("%w: %q holds only this node's own address %s", ErrNoPeers, addrs, m.Addr())
	}
	rand.Shuffle(len(peers), func(i, j int) { peers[i], peers[j] = peers[j], peers[i] })
	if maxPeers := m.sized().JoinMaxPeers; len(peers) > maxPeers {
		peers = peers[:maxPeers]
	}
	// Contact all chosen peers at once and go on as soon as one answers:
	// a dead or black-holed seed then costs nothing. The rest finish in
	// the background (tracked, so Shutdown waits for them).
	type result struct {
		peer string
		err  error
	}
	results := make(chan result, len(peers))
	for _, p := range peers {
		if !m.goFunc(func() {
			_, err := m.ml.Join([]string{p})
			results <- result{p, err}
		}) {
			results <- result{p, ErrShutdown}
		}
	}
	var (
		answered []string
		errs     []error
	)
	for range peers {
		r := <-results
		if r.err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", r.peer, r.err))
			continue
		}
		answered = append(answered, r.peer)
		break
	}
	ok := len(answered)
	if ok == 0 {
		return 0, fmt.Errorf("mesh: no peer answered: %w", errors.Join(errs...))
	}
	if m.otherAlive() == 0 {
		// Every address that answered was this node (another local IP of
		// ours, or a DNS name for it).
		return 0, fmt.Errorf("mesh: every address that answered (%s) was this node itself", strings.Join(answered, ", "))
	}
	m.log.Info("joined the mesh", "contacted", ok, "members", m.NumAlive())
	m.joinedOnce.Do(func() { close(m.joinedCh) })
	m.startSync(answered)
	return ok, nil
}

// filterSelf drops addresses that are this node's own gossip address.
func (m *Mesh) filterSelf(addrs []string) []string {
	self := m.Addr()
	selfHost, selfPort, _ := net.SplitHostPort(self)
	selfIP := net.ParseIP(selfHost)
	var out []string
	for _, a := range addrs {
		a = strings.TrimSpace(a)
		if a == "" {
			continue
		}
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			host, port = strings.Trim(a, "[]"), strconv.Itoa(m.cfg.BindPort)
		}
		if ip := net.ParseIP(host); ip != nil && selfIP != nil && ip.Equal(selfIP) && port == selfPort {
			continue
		}
		out = append(out, a)
	}
	return out
}

// otherAlive counts live members other than this node.
func (m *Mesh) otherAlive() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := 0
	for name, rec := range m.members {
		if name != m.cfg.NodeName && rec.State == StateAlive {
			n++
		}
	}
	return n
}

// joinSync runs the post-join push-pulls, after JoinSyncDelay, then 2×,
// 4×, ... apart. Even rounds (the first, third, ...) go to one of the
// peers that answered the join: a seed has heard directly from every node
// that joined through it, so one exchange catches up with the whole join
// burst. Odd rounds go to a random live member, which covers nodes that
// joined through other seeds (discovery hands each node a different
// subset). They repair the case where gossip about a
// node that joined in the same burst ran out of retransmits before
// reaching this node (see doc.go).
func (m *Mesh) joinSync(seeds []string) {
	delay := m.cfg.JoinSyncDelay
	rounds := m.sized().JoinSyncRounds
	for i := 0; i < rounds; i++ {
		// Each wait is drawn from [½, 1] of its length: the nodes of a
		// mass join would otherwise all sync with the seeds in the same
		// instant, and a node serves at most 128 push-pulls at once
		// (memberlist refuses the rest). Never longer, so that a small
		// mesh, which the first sync completes, converges as early.
		t := time.NewTimer(delay/2 + rand.N(delay/2+1))
		select {
		case <-t.C:
		case <-m.shutdownCh:
			t.Stop()
			return
		}
		delay *= 2
		if m.left.Load() {
			return
		}
		peer := ""
		if i%2 == 0 && len(seeds) > 0 {
			peer = seeds[rand.IntN(len(seeds))]
		} else {
			peer = m.randomPeer()
		}
		if peer == "" {
			continue
		}
		if _, err := m.ml.Join([]string{peer}); err != nil {
			m.log.Debug("post-join sync failed", "peer", peer, "error", err)
			// A busy seed refuses; a random member is rarely busy.
			if alt := m.randomPeer(); alt != "" && alt != peer {
				if _, err := m.ml.Join([]string{alt}); err != nil {
					m.log.Debug("post-join sync failed", "peer", alt, "error", err)
				}
			}
		}
	}
}

// sized returns the configuration adapted (ForSize) to the larger of
// ExpectedSize and the live members now: what the Mesh's own join
// settings follow as the mesh grows.
func (m *Mesh) sized() Config { return sizedFor(m.base, m.NumAlive()) }

// sizedFor is base adapted to the larger of its ExpectedSize and alive.
func sizedFor(base Config, alive int) Config {
	return base.ForSize(max(base.ExpectedSize, alive))
}

// startSync starts a round of post-join syncs unless one is running.
func (m *Mesh) startSync(seeds []string) {
	if m.cfg.JoinSyncRounds == 0 || !m.syncing.CompareAndSwap(false, true) {
		return
	}
	if !m.goFunc(func() {
		defer m.syncing.Store(false)
		m.joinSync(seeds)
	}) {
		m.syncing.Store(false)
	}
}

// watchRefutes starts the post-join syncs again whenever this node's
// incarnation grows while it has peers: memberlist bumps it when the node
// refutes a suspicion or a false death (and on UpdateMeta). A refutation
// spreads by gossip like a join and can miss nodes the same way; the
// push-pulls carry it (and any metadata update) to random members at
// once instead of at the next periodic push-pull.
func (m *Mesh) watchRefutes() {
	t := time.NewTicker(m.cfg.ProbeInterval)
	defer t.Stop()
	var last uint32
	for {
		select {
		case <-t.C:
		case <-m.shutdownCh:
			return
		}
		inc, ok := mlIncarnation(m.ml, m.cfg.NodeName)
		if !ok {
			return
		}
		if inc > last && last != 0 && !m.left.Load() && m.otherAlive() > 0 {
			m.log.Debug("incarnation grew (refutation or update): syncing with random members", "incarnation", inc)
			m.startSync(nil)
		}
		last = inc
	}
}

// watchFailures makes one push-pull with a random live member
// FailureSyncDelay after this node declared a peer dead (several deaths
// in that time share one). If the peer is in fact alive and refuted the
// accusation, most members already hold its newer alive record, and
// memberlist never sends it again to a node that missed it (the peer
// ignores the stale death, and the others do not re-announce it), so
// without this the false death would last until a periodic push-pull.
func (m *Mesh) watchFailures() {
	for {
		select {
		case <-m.failedCh:
		case <-m.shutdownCh:
			return
		}
		t := time.NewTimer(m.cfg.FailureSyncDelay)
		select {
		case <-t.C:
		case <-m.shutdownCh:
			t.Stop()
			return
		}
		select { // deaths seen while waiting are covered by this exchange
		case <-m.failedCh:
		default:
		}
		if m.left.Load() {
			continue
		}
		if peer := m.randomPeer(); peer != "" {
			if _, err := m.ml.Join([]string{peer}); err != nil {
				m.log.Debug("sync after a failure failed", "peer", peer, "error", err)
			}
		}
	}
}

func (m *Mesh) randomPeer() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	var addrs []string
	for name, rec := range m.members {
		if name != m.cfg.NodeName && rec.State == StateAlive {
			addrs = append(addrs, rec.Addr)
		}
	}
	if len(addrs) == 0 {
		return ""
	}
	return addrs[rand.IntN(len(addrs))]
}

// reconnectLoop tries, every ReconnectInterval, to join one random member
// that failed (was declared dead, did not leave). A join is a full state
// exchange: each side learns that the other thinks it dead and refutes it,
// so the two halves of a healed partition merge again.
func (m *Mesh) reconnectLoop() {
	t := time.NewTicker(m.cfg.ReconnectInterval)
	defer t.Stop()
	for {
		select {
		case <-t.C:
		case <-m.shutdownCh:
			return
		}
		if m.left.Load() {
			return
		}
		name, addr := m.randomFailed()
		if addr == "" {
			continue
		}
		if _, err := m.ml.Join([]string{addr}); err != nil {
			m.log.Debug("reconnect to failed member failed", "node", name, "addr", addr, "error", err)
			continue
		}
		m.log.Info("reconnected to a member seen failed", "node", name, "addr", addr)
	}
}

// randomFailed returns a random member in StateDead (failed, not left).
func (m *Mesh) randomFailed() (name, addr string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var names []string
	for n, rec := range m.members {
		if n != m.cfg.NodeName && rec.State == StateDead && rec.Addr != "" {
			names = append(names, n)
		}
	}
	if len(names) == 0 {
		return "", ""
	}
	n := names[rand.IntN(len(names))]
	return n, m.members[n].Addr
}

// autoJoin keeps discovering and joining until joined, and discovers
// again when this node has been alone for RejoinAfterAlone.
func (m *Mesh) autoJoin(d Discoverer) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if !m.goFunc(func() {
		select {
		case <-m.shutdownCh:
			cancel()
		case <-ctx.Done():
		}
	}) {
		return
	}
	b := newBackoff(m.cfg.JoinRetryMin, m.cfg.JoinRetryMax)
	joined := false
	var aloneSince time.Time
	poll := m.cfg.RejoinAfterAlone / 4
	if poll < 50*time.Millisecond {
		poll = 50 * time.Millisecond
	}
	for {
		wait := poll
		if m.left.Load() {
			return
		}
		if !joined {
			addrs, err := d.Addrs(ctx)
			if err == nil {
				_, err = m.joinOnce(addrs)
			}
			if err == nil {
				joined, aloneSince = true, time.Time{}
				b.reset()
			} else {
				if errors.Is(err, ErrShutdown) || errors.Is(err, ErrLeft) {
					return
				}
				wait = b.next()
				m.log.Warn("auto-join: no peer joined yet, retrying", "retry_in", wait, "error", err)
			}
		} else if m.cfg.RejoinAfterAlone > 0 {
			if m.otherAlive() > 0 {
				aloneSince = time.Time{}
			} else if aloneSince.IsZero() {
				aloneSince = time.Now()
			} else if time.Since(aloneSince) >= m.cfg.RejoinAfterAlone {
				m.log.Warn("auto-join: alone in the mesh, discovering peers again", "alone_for", time.Since(aloneSince))
				joined = false
				continue
			}
		} else {
			return
		}
		t := time.NewTimer(wait)
		select {
		case <-t.C:
		case <-m.shutdownCh:
			t.Stop()
			return
		}
	}
}

// Leave announces a graceful departure and waits up to timeout for the
// announcement to start spreading; peers report EventLeave. The Mesh
// keeps running (answering probes) until Shutdown, and it will not join
// again.
func (m *Mesh) Leave(timeout time.Duration) error {
	m.lifeMu.Lock()
	defer m.lifeMu.Unlock()
	if m.isShutdown() {
		return ErrShutdown
	}
	m.left.Store(true)
	if err := m.ml.Leave(timeout); err != nil {
		return fmt.Errorf("mesh: leave: %w", err)
	}
	return nil
}

// Shutdown stops gossip and every goroutine of the Mesh, and closes the
// subscription channels; it can wait up to Config.TCPTimeout for a join
// or sync exchange in flight. memberlist's own probe goroutine may still
// finish a probe in flight (at most ProbeInterval × AwarenessMaxMultiplier)
// after Shutdown returns. It does not announce a leave (call Leave first
// for that); peers will see this node fail. Safe to call more than once.
func (m *Mesh) Shutdown() error {
	var err error
	m.shutdownOnce.Do(func() {
		m.lifeMu.Lock()
		close(m.shutdownCh)
		m.lifeMu.Unlock()
		err = m.ml.Shutdown()
		m.goMu.Lock()
		m.goClosed = true
		m.goMu.Unlock()
		m.wg.Wait()
		m.log.Info("gossip stopped")
	})
	return err
}

func (m *Mesh) isShutdown() bool {
	select {
	case <-m.shutdownCh:
		return true
	default:
		return false
	}
}

// Subscribe returns a channel of every membership event from now on, and
// a function that ends the subscription and closes the channel. Events
// are queued without bound and in order for each subscriber, so a slow
// reader never stalls gossip nor loses events (but holds their memory).
// The channel is also closed by Shutdown.
func (m *Mesh) Subscribe() (<-chan Event, func()) {
	ch := make(chan Event)
	s := m.addSubscriber(nil, ch)
	return ch, func() { m.removeSubscriber(s) }
}

// backoff is exponential backoff with up to 25% jitter.
type backoff struct {
	min, max, cur time.Duration
}

func newBackoff(min, max time.Duration) *backoff { return &backoff{min: min, max: max} }

func (b *backoff) reset() { b.cur = 0 }

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur *= 2
	}
	if b.cur > b.max {
		b.cur = b.max
	}
	return b.cur + time.Duration(rand.Int64N(int64(b.cur)/4+1))
}

// delegate receives memberlist's callbacks.
//
// Threading: memberlist calls NodeMeta from its own goroutines and from
// UpdateNode; the EventDelegate methods (NotifyJoin, NotifyLeave,
// NotifyUpdate) and NotifyConflict run while memberlist holds its node
// lock, one at a time, from its packet, stream and timer goroutines.
// They therefore only copy data, update m.members under m.mu and append
// to subscriber queues; they never block, never call back into
// memberlist and never run user code.
type delegate struct{ m *Mesh }

func (d *delegate) NodeMeta(limit int) []byte {
	d.m.metaMu.Lock()
	defer d.m.metaMu.Unlock()
	if len(d.m.metaBytes) > limit { // cannot happen: Encode enforces MetaMaxSize
		return nil
	}
	return slices.Clone(d.m.metaBytes)
}

func (d *delegate) NotifyMsg([]byte)                           {}
func (d *delegate) GetBroadcasts(overhead, limit int) [][]byte { return nil }
func (d *delegate) LocalState(join bool) []byte                { return nil }
func (d *delegate) MergeRemoteState(buf []byte, join bool)     {}

func (d *delegate) NotifyJoin(n *memberlist.Node)   { d.m.onNode(EventJoin, n) }
func (d *delegate) NotifyUpdate(n *memberlist.Node) { d.m.onNode(EventUpdate, n) }
func (d *delegate) NotifyLeave(n *memberlist.Node) {
	typ := EventFailed
	if st, ok := mlStateInCallback(n); ok && st == memberlist.StateLeft {
		typ = EventLeave
	}
	d.m.onNode(typ, n)
}

func (d *delegate) NotifyConflict(existing, other *memberlist.Node) {
	d.m.log.Error("two nodes claim the same name: give every agent a unique --name",
		"name", existing.Name, "known_addr", existing.Address(), "other_addr", other.Address())
}

// onNode records a memberlist event and queues it for subscribers. Runs
// under memberlist's node lock (see delegate).
func (m *Mesh) onNode(typ EventType, n *memberlist.Node) {
	mem := Member{Name: n.Name, Addr: n.Address(), Since: time.Now()}
	switch typ {
	case EventJoin, EventUpdate:
		mem.State = StateAlive
	case EventLeave:
		mem.State = StateLeft
	case EventFailed:
		mem.State = StateDead
	}
	meta, err := DecodeMeta(n.Meta)
	if err == nil && meta.Name != n.Name {
		err = fmt.Errorf("%w: record names node %q but it gossips as %q", ErrInvalidMeta, meta.Name, n.Name)
	}
	if err != nil {
		if !errors.Is(err, ErrMetaVersion) || typ == EventJoin {
			m.log.Warn("undecodable node metadata", "node", n.Name, "error", err)
		}
		mem.MetaErr = err
	} else {
		mem.Meta = meta
	}
	ev := Event{Type: typ, Member: mem}
	m.mu.Lock()
	defer m.mu.Unlock()
	if old, ok := m.members[n.Name]; ok && typ == EventUpdate {
		mem.Since = old.Since
		ev.Member.Since = old.Since
	}
	rec := mem
	m.members[n.Name] = &rec
	if typ == EventFailed && n.Name != m.cfg.NodeName {
		select {
		case m.failedCh <- struct{}{}:
		default:
		}
	}
	for s := range m.subs {
		s.q.push(ev)
	}
}

// subscriber is one event consumer: an unbounded FIFO drained by its own
// goroutine, into ch or into fn.
type subscriber struct {
	q    eventQueue
	fn   func(Event)
	ch   chan Event
	done chan struct{}
	once sync.Once
}

func (m *Mesh) addSubscriber(fn func(Event), ch chan Event) *subscriber {
	s := &subscriber{fn: fn, ch: ch, done: make(chan struct{})}
	s.q.signal = make(chan struct{}, 1)
	m.mu.Lock()
	m.subs[s] = struct{}{}
	m.mu.Unlock()
	if !m.goFunc(func() { m.runSubscriber(s) }) { // shut down already
		m.mu.Lock()
		delete(m.subs, s)
		m.mu.Unlock()
		if ch != nil {
			close(ch)
		}
	}
	return s
}

func (m *Mesh) removeSubscriber(s *subscriber) {
	m.mu.Lock()
	delete(m.subs, s)
	m.mu.Unlock()
	s.once.Do(func() { close(s.done) })
}

func (m *Mesh) runSubscriber(s *subscriber) {
	if s.ch != nil {
		defer close(s.ch)
	}
	for {
		select {
		case <-s.q.signal:
		case <-s.done:
			return
		case <-m.shutdownCh:
			return
		}
		for _, ev := range s.q.popAll() {
			if s.fn != nil {
				s.fn(ev)
				continue
			}
			select {
			case s.ch <- ev:
			case <-s.done:
				return
			case <-m.shutdownCh:
				return
			}
		}
	}
}

// eventQueue is an unbounded FIFO whose push never blocks.
type eventQueue struct {
	mu     sync.Mutex
	items  []Event
	signal chan struct{} // capacity 1: "items may be non-empty"
}

func (q *eventQueue) push(ev Event) {
	q.mu.Lock()
	q.items = append(q.items, ev)
	q.mu.Unlock()
	select {
	case q.signal <- struct{}{}:
	default:
	}
}

func (q *eventQueue) popAll() []Event {
	q.mu.Lock()
	defer q.mu.Unlock()
	out := q.items
	q.items = nil
	return out
}
