package consensus

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpumesh/gpumesh/consensus/fsmpb"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	wal "github.com/hashicorp/raft-wal"
	"github.com/hashicorp/raft-wal/metadb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// Raft roles reported by Server.Role.
const (
	RoleLeader  = "leader"
	RoleVoter   = "voter"
	RoleStandby = "standby"
	RoleNone    = "none"
)

// Server is one node's Raft member: it bootstraps or rejoins the cluster,
// applies the log to its StateStore, and, while it leads, reconciles
// membership and voters and runs the scheduler.
type Server struct {
	cfg    *Config
	logger hclog.Logger

	fsm    *FSM
	raft   *raft.Raft
	trans  *raft.NetworkTransport
	wal    *wal.WAL
	meta   *metadb.BoltMetaDB
	snaps  *raft.FileSnapshotStore
	obs    *raft.Observer
	obsCh  chan raft.Observation
	hadLog bool

	nudgeBoot   chan struct{}
	nudgeLeader chan struct{}
	leaderCh    chan bool
	roleCh      chan struct{} // RoleChanged

	hbMu       sync.Mutex
	hbFailures map[raft.ServerID]time.Time // peer -> last contact, while heartbeats fail
	// repl tells which followers are behind (the scheduler places nothing
	// new on them).
	repl *replTracker
	// loads holds the routers' load reports while this server leads
	// (memory only: a new leader starts listening afresh).
	loads *LoadTable
	// schedPaused stops the scheduler from evaluating (benchmarks measure
	// the write path alone); events accumulate and are processed once it
	// is cleared.
	schedPaused atomic.Bool

	leaderMu sync.Mutex
	leader   *leaderSession

	apState atomic.Pointer[apSnapshot]
	// bootBlocked is set while the bootstrap loop waits because a cluster
	// already exists (tests observe it).
	bootBlocked atomic.Bool

	shutdownCh   chan struct{}
	shutdownOnce sync.Once
	shutdownErr  error
	wg           sync.WaitGroup
}

// NewServer opens the Raft stores under cfg.DataDir/raft and starts Raft.
// When the data dir holds Raft state the server restarts from it and
// rejoins its cluster; otherwise it waits until the membership shows
// cfg.BootstrapExpect server-eligible members and bootstraps if it is one
// of the chosen set (or is added later by the leader).
func NewServer(cfg *Config) (*Server, error) {
	if cfg == nil {
		return nil, fmt.Errorf("%w: config is nil; start from DefaultConfig()", ErrInvalidConfig)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	logger = logger.Named("consensus")
	s := &Server{
		cfg:         cfg,
		logger:      logger,
		nudgeBoot:   make(chan struct{}, 1),
		nudgeLeader: make(chan struct{}, 1),
		leaderCh:    make(chan bool, 1),
		roleCh:      make(chan struct{}, 1),
		hbFailures:  map[raft.ServerID]time.Time{},
		shutdownCh:  make(chan struct{}),
	}
	s.fsm = NewFSM(logger.Named("fsm"))
	s.fsm.configApplied = s.nudgeRole
	s.loads = NewLoadTable(time.Now())
	s.repl = newReplTracker(func() { s.fsm.events.capacity(); s.fsm.events.signal() })
	if err := s.setupRaft(); err != nil {
		s.closeStores()
		return nil, err
	}
	s.goFunc(s.monitorLeadership)
	s.goFunc(s.watchObservations)
	if !s.hadLog {
		s.goFunc(s.bootstrapLoop)
	}
	return s, nil
}

func (s *Server) setupRaft() error {
	cfg := s.cfg
	dir := filepath.Join(cfg.DataDir, "raft")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("raft data dir %s: %w", dir, err)
	}
	walDir := filepath.Join(dir, "wal")
	if err := os.MkdirAll(walDir, 0o700); err != nil {
		return fmt.Errorf("raft log dir %s: %w", walDir, err)
	}
	// WAL.Close does not close its meta store (raft-wal v0.4.0), which
	// keeps a file lock: own it and close it ourselves.
	s.meta = &metadb.BoltMetaDB{}
	w, err := wal.Open(walDir, wal.WithLogger(s.logger.Named("wal")), wal.WithMetaStore(s.meta))
	if err != nil {
		return fmt.Errorf("open raft log in %s: %w", dir, err)
	}
	s.wal = w
	snaps, err := raft.NewFileSnapshotStoreWithLogger(dir, cfg.SnapshotRetain, s.logger.Named("snapshot"))
	if err != nil {
		return fmt.Errorf("open snapshot store in %s: %w", dir, err)
	}
	s.snaps = snaps

	stream := cfg.StreamLayer
	if stream == nil {
		stream, err = NewTCPStreamLayer(cfg.RaftBindAddr, cfg.RaftAdvertiseAddr)
		if err != nil {
			return err
		}
	}
	s.trans = raft.NewNetworkTransportWithConfig(&raft.NetworkTransportConfig{
		Stream:  newTrackedStream(stream),
		MaxPool: 3,
		Timeout: 10 * time.Second,
		Logger:  quietOnShutdown{Logger: s.logger.Named("transport"), done: s.shutdownCh},
	})

	rc := raft.DefaultConfig()
	rc.LocalID = raft.ServerID(cfg.NodeID)
	rc.Logger = s.logger.Named("raft")
	rc.HeartbeatTimeout = cfg.HeartbeatTimeout
	rc.ElectionTimeout = cfg.ElectionTimeout
	rc.LeaderLeaseTimeout = cfg.LeaderLeaseTimeout
	rc.CommitTimeout = cfg.CommitTimeout
	rc.MaxAppendEntries = cfg.MaxAppendEntries
	rc.BatchApplyCh = true
	rc.SnapshotThreshold = cfg.SnapshotThreshold
	rc.SnapshotInterval = cfg.SnapshotInterval
	rc.TrailingLogs = cfg.TrailingLogs
	rc.ShutdownOnRemove = false
	if err := raft.ValidateConfig(rc); err != nil {
		return fmt.Errorf("%w: %v", ErrInvalidConfig, err)
	}
	has, err := raft.HasExistingState(w, w, snaps)
	if err != nil {
		return fmt.Errorf("read raft state in %s: %w", dir, err)
	}
	s.hadLog = has
	r, err := raft.NewRaft(rc, s.fsm, w, w, snaps, &trackedTransport{NetworkTransport: s.trans, t: s.repl, hold: replicationHold, stop: s.shutdownCh})
	if err != nil {
		return fmt.Errorf("start raft: %w", err)
	}
	s.raft = r
	s.obsCh = make(chan raft.Observation, 64)
	s.obs = raft.NewObserver(s.obsCh, false, func(o *raft.Observation) bool {
		switch o.Data.(type) {
		case raft.FailedHeartbeatObservation, raft.ResumedHeartbeatObservation, raft.PeerObservation:
			return true
		}
		return false
	})
	r.RegisterObserver(s.obs)
	s.logger.Info("raft started", "id", cfg.NodeID, "addr", s.trans.LocalAddr(), "existing_state", has)
	return nil
}

// goFunc runs f in a goroutine that Shutdown waits for.
func (s *Server) goFunc(f func()) {
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		f()
	}()
}

// RaftAddr returns the Raft address other servers dial.
func (s *Server) RaftAddr() string { return string(s.trans.LocalAddr()) }

// Bootstrapped reports whether this server is part of a working cluster:
// it restarted with Raft state, or its log holds more than the bootstrap
// configuration (a leader has been elected and written to it). The node
// gossips it (Member.Bootstrapped) so that latecomers never bootstrap a
// second cluster. A server that has only just bootstrapped reports false,
// so the other members of the same bootstrap set still bootstrap too.
func (s *Server) Bootstrapped() bool {
	return s.hadLog || s.raft.LastIndex() > 1
}

// MembershipChanged tells the server that the gossip view changed. It never
// blocks; the server re-reads Membership.Members().
func (s *Server) MembershipChanged() {
	select {
	case s.nudgeBoot <- struct{}{}:
	default:
	}
	select {
	case s.nudgeLeader <- struct{}{}:
	default:
	}
}

// IsLeader reports whether this server is the Raft leader now.
func (s *Server) IsLeader() bool { return s.raft.State() == raft.Leader }

// Leader returns the leader's node ID and gRPC address; both are empty
// when no leader is known, the address when the leader is not in the
// gossip view or node table.
func (s *Server) Leader() (id, rpcAddr string) {
	_, lid := s.raft.LeaderWithID()
	if lid == "" {
		return "", ""
	}
	return string(lid), s.rpcAddrOf(string(lid))
}

func (s *Server) rpcAddrOf(id string) string {
	for _, m := range s.cfg.Membership.Members() {
		if m.ID == id {
			if m.RPCAddr != "" {
				return m.RPCAddr
			}
			break
		}
	}
	if n := s.fsm.state.Node(id); n != nil {
		return n.RpcAddr
	}
	return ""
}

// LeaderCh delivers true when this server becomes leader and false when it
// stops being leader. It holds only the latest value: a slow reader sees the
// current state, possibly without the transitions in between.
func (s *Server) LeaderCh() <-chan bool { return s.leaderCh }

// Role returns RoleLeader, RoleVoter, RoleStandby (non-voter) or RoleNone
// (not in the Raft configuration).
func (s *Server) Role() string {
	if s.raft.State() == raft.Leader {
		return RoleLeader
	}
	f := s.raft.GetConfiguration()
	if s.await(f) != nil {
		return RoleNone
	}
	for _, srv := range f.Configuration().Servers {
		if srv.ID == raft.ServerID(s.cfg.NodeID) {
			if srv.Suffrage == raft.Nonvoter {
				return RoleStandby
			}
			return RoleVoter
		}
	}
	return RoleNone
}

// RoleChanged receives a value (never blocking the sender) after Role or
// Bootstrapped may have changed: when this server gains or loses
// leadership, and when a Raft configuration entry or a snapshot is applied
// here (a server joins, is promoted or demoted, or the bootstrap
// configuration commits). It holds at most one value; a reader that calls
// Role and Bootstrapped after each receive sees the latest state.
func (s *Server) RoleChanged() <-chan struct{} { return s.roleCh }

func (s *Server) nudgeRole() {
	select {
	case s.roleCh <- struct{}{}:
	default:
	}
}

// State returns the replicated state as applied on this server (possibly
// stale on followers). See StateStore for the immutability contract.
func (s *Server) State() *StateStore { return s.fsm.state }

// AppliedIndex returns the index of the last log entry applied here.
func (s *Server) AppliedIndex() uint64 { return s.raft.AppliedIndex() }

// Peers returns the Raft configuration with the leader, names and health.
// Health comes from the leader's autopilot where this server leads, and
// from the gossip view elsewhere.
func (s *Server) Peers() ([]*controlpb.RaftPeer, error) {
	f := s.raft.GetConfiguration()
	if err := s.await(f); err != nil {
		if errors.Is(err, raft.ErrRaftShutdown) {
			return nil, ErrShutdown
		}
		return nil, fmt.Errorf("raft configuration: %w", err)
	}
	_, lid := s.raft.LeaderWithID()
	members := map[string]Member{}
	for _, m := range s.cfg.Membership.Members() {
		members[m.ID] = m
	}
	ap := s.apState.Load()
	var out []*controlpb.RaftPeer
	for _, srv := range f.Configuration().Servers {
		p := &controlpb.RaftPeer{
			Id:       string(srv.ID),
			Address:  string(srv.Address),
			Suffrage: "voter",
			Leader:   srv.ID == lid,
		}
		if srv.Suffrage != raft.Voter {
			p.Suffrage = "nonvoter"
		}
		m, ok := members[p.Id]
		if ok {
			p.NodeName = m.Name
		} else if n := s.fsm.state.Node(p.Id); n != nil {
			p.NodeName = n.Name
		}
		if h, found := ap.healthy(srv.ID); found && s.IsLeader() {
			p.Healthy = h
		} else {
			p.Healthy = ok && m.usable()
		}
		out = append(out, p)
	}
	return out, nil
}

// VerifyLeader confirms with a quorum that this server still leads; a
// leader that answers a read after it succeeds gives a linearizable read.
// It returns a *NotLeaderError elsewhere.
func (s *Server) VerifyLeader(ctx context.Context) error {
	if !s.IsLeader() {
		return s.notLeader()
	}
	if err := s.await(s.raft.VerifyLeader()); err != nil {
		if errors.Is(err, raft.ErrNotLeader) || errors.Is(err, raft.ErrLeadershipLost) {
			return s.notLeader()
		}
		return fmt.Errorf("verify leadership: %w", err)
	}
	return ctx.Err()
}

// TransferLeadership hands leadership to another voter (raft picks the
// most up to date one) and waits until it is done.
func (s *Server) TransferLeadership() error {
	if !s.IsLeader() {
		return s.notLeader()
	}
	if err := s.await(s.raft.LeadershipTransfer()); err != nil {
		return fmt.Errorf("leadership transfer: %w", err)
	}
	return nil
}

// Shutdown stops the leader duties, Raft, its transport and the stores and
// waits for every goroutine. It is safe to call more than once.
func (s *Server) Shutdown() error {
	s.shutdownOnce.Do(func() {
		s.logger.Info("shutting down")
		close(s.shutdownCh)
		var errs []error
		if s.raft != nil {
			if err := s.raft.Shutdown().Error(); err != nil {
				errs = append(errs, fmt.Errorf("raft shutdown: %w", err))
			}
			s.raft.DeregisterObserver(s.obs)
		}
		s.stopLeader()
		s.wg.Wait()
		if err := s.closeStores(); err != nil {
			errs = append(errs, err)
		}
		s.shutdownErr = errors.Join(errs...)
	})
	return s.shutdownErr
}

func (s *Server) closeStores() error {
	var errs []error
	if s.trans != nil {
		if err := s.trans.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft transport: %w", err))
		}
	}
	if s.wal != nil {
		if err := s.wal.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft log: %w", err))
		}
	}
	if s.meta != nil {
		if err := s.meta.Close(); err != nil {
			errs = append(errs, fmt.Errorf("close raft log meta store: %w", err))
		}
	}
	return errors.Join(errs...)
}

// ---------------------------------------------------------------- bootstrap

// bootstrapLoop waits for BootstrapExpect server-eligible members and
// bootstraps when this node is among the chosen set. It ends once this
// server has Raft state (bootstrapped itself or added by a leader).
func (s *Server) bootstrapLoop() {
	tick := time.NewTicker(bootstrapPoll(s.cfg))
	defer tick.Stop()
	var lastKey string
	var since time.Time
	for {
		if s.raft.LastIndex() > 0 {
			return
		}
		set, blocked := s.bootstrapCandidates()
		key := ""
		for _, m := range set {
			key += m.ID + "@" + m.RaftAddr + ","
		}
		switch {
		case blocked != "":
			s.bootBlocked.Store(true)
			if key != lastKey {
				s.logger.Info("not bootstrapping: a cluster already exists; waiting to be added by its leader", "member", blocked)
			}
			lastKey, since = key, time.Time{}
		case set == nil:
			lastKey, since = "", time.Time{}
		case key != lastKey:
			lastKey, since = key, time.Now()
		case time.Since(since) >= s.cfg.BootstrapSettle:
			if err := s.bootstrap(set); err != nil {
				s.logger.Error("bootstrap failed", "error", err)
			}
			return
		}
		select {
		case <-s.shutdownCh:
			return
		case <-s.nudgeBoot:
		case <-tick.C:
		}
	}
}

func bootstrapPoll(cfg *Config) time.Duration {
	d := cfg.BootstrapSettle / 4
	if d < 10*time.Millisecond {
		d = 10 * time.Millisecond
	}
	if d > 250*time.Millisecond {
		d = 250 * time.Millisecond
	}
	return d
}

// bootstrapCandidates returns the bootstrap set seen now, or the name of
// a member that already has Raft state (then nobody bootstraps).
func (s *Server) bootstrapCandidates() ([]Member, string) {
	members := s.cfg.Membership.Members()
	for _, m := range members {
		if m.ID != s.cfg.NodeID && m.Bootstrapped && m.usable() {
			return nil, m.Name
		}
	}
	return BootstrapSet(members, s.cfg.BootstrapExpect), ""
}

func (s *Server) bootstrap(set []Member) error {
	in := false
	var conf raft.Configuration
	for _, m := range set {
		addr := m.RaftAddr
		if m.ID == s.cfg.NodeID {
			in = true
			addr = string(s.trans.LocalAddr())
		}
		conf.Servers = append(conf.Servers, raft.Server{Suffrage: raft.Voter, ID: raft.ServerID(m.ID), Address: raft.ServerAddress(addr)})
	}
	if !in {
		s.logger.Info("bootstrap set chosen without this node; waiting to be added by the leader", "set", idsOf(set))
		return nil
	}
	s.logger.Info("bootstrapping raft cluster", "servers", idsOf(set))
	if err := s.raft.BootstrapCluster(conf).Error(); err != nil && !errors.Is(err, raft.ErrCantBootstrap) {
		return fmt.Errorf("bootstrap with %v: %w", idsOf(set), err)
	}
	return nil
}

func idsOf(ms []Member) []string {
	out := make([]string, len(ms))
	for i, m := range ms {
		out[i] = m.ID
	}
	return out
}

// ---------------------------------------------------------------- leadership

func (s *Server) monitorLeadership() {
	rch := s.raft.LeaderCh()
	for {
		select {
		case <-s.shutdownCh:
			return
		case is := <-rch:
			if is {
				s.startLeader()
			} else {
				s.stopLeader()
			}
			select {
			case <-s.leaderCh:
			default:
			}
			s.leaderCh <- is
			s.nudgeRole()
		}
	}
}

func (s *Server) watchObservations() {
	for {
		select {
		case <-s.shutdownCh:
			return
		case o := <-s.obsCh:
			switch d := o.Data.(type) {
			case raft.FailedHeartbeatObservation:
				s.hbMu.Lock()
				s.hbFailures[d.PeerID] = d.LastContact
				s.hbMu.Unlock()
			case raft.ResumedHeartbeatObservation:
				s.hbMu.Lock()
				delete(s.hbFailures, d.PeerID)
				s.hbMu.Unlock()
			case raft.PeerObservation:
				if d.Removed {
					s.repl.forget(d.Peer.ID)
					s.hbMu.Lock()
					delete(s.hbFailures, d.Peer.ID)
					s.hbMu.Unlock()
				} else {
					// Behind until it accepts an append from this leader.
					s.repl.fall(d.Peer.ID)
				}
			}
		}
	}
}

// lastContact returns how long ago the leader last reached a peer while its
// heartbeats fail, or 0 when they succeed.
func (s *Server) lastContact(id raft.ServerID) (time.Duration, bool) {
	s.hbMu.Lock()
	defer s.hbMu.Unlock()
	t, failing := s.hbFailures[id]
	if !failing {
		return 0, false
	}
	if t.IsZero() {
		return time.Hour, true
	}
	return time.Since(t), true
}

// ---------------------------------------------------------------- writes

func (s *Server) notLeader() error {
	id, addr := s.Leader()
	return &NotLeaderError{LeaderID: id, LeaderRPCAddr: addr}
}

// apply proposes a command and waits until it is committed and applied.
func (s *Server) apply(ctx context.Context, cmd *fsmpb.Command) (any, uint64, error) {
	select {
	case <-s.shutdownCh:
		return nil, 0, ErrShutdown
	default:
	}
	if err := ctx.Err(); err != nil {
		return nil, 0, err
	}
	if s.raft.State() != raft.Leader {
		return nil, 0, s.notLeader()
	}
	data, err := encodeCommand(time.Now(), cmd)
	if err != nil {
		return nil, 0, fmt.Errorf("encode command: %w", err)
	}
	timeout := s.cfg.ApplyTimeout
	if dl, ok := ctx.Deadline(); ok {
		timeout = time.Until(dl)
		if timeout <= 0 {
			return nil, 0, context.DeadlineExceeded
		}
	}
	f := s.raft.Apply(data, timeout)
	if err := s.awaitCtx(ctx, f); err != nil {
		switch {
		case errors.Is(err, raft.ErrNotLeader):
			return nil, 0, s.notLeader()
		case errors.Is(err, raft.ErrLeadershipLost), errors.Is(err, raft.ErrLeadershipTransferInProgress):
			if errors.Is(err, raft.ErrLeadershipTransferInProgress) {
				return nil, 0, s.notLeader()
			}
			return nil, 0, ErrLeadershipLost
		case errors.Is(err, raft.ErrRaftShutdown):
			return nil, 0, ErrShutdown
		case errors.Is(err, raft.ErrEnqueueTimeout):
			return nil, 0, fmt.Errorf("raft apply: %w (the leader is overloaded or has no quorum)", err)
		case ctx.Err() != nil:
			return nil, 0, fmt.Errorf("raft apply: stopped waiting for the commit (the change may still be committed): %w", err)
		}
		return nil, 0, fmt.Errorf("raft apply: %w", err)
	}
	resp := f.Response()
	if err, ok := resp.(error); ok {
		return nil, f.Index(), err
	}
	return resp, f.Index(), nil
}

// await waits for a raft future, or for shutdown: a future still queued
// in raft's buffered apply channel when raft stops is never answered.
func (s *Server) await(f raft.Future) error { return s.awaitCtx(context.Background(), f) }

// awaitCtx is await that also gives up when ctx ends, with ctx's cause.
// raft bounds only the enqueueing of an entry; without ctx a caller would
// wait for the commit until the leader steps down, whatever its deadline.
func (s *Server) awaitCtx(ctx context.Context, f raft.Future) error {
	done := make(chan error, 1)
	go func() { done <- f.Error() }() // ends when raft answers (commit, step-down or shutdown)
	select {
	case err := <-done:
		return err
	case <-s.shutdownCh:
		return ErrShutdown
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// pauseScheduler stops (on) or resumes the leader's scheduler evaluating.
func (s *Server) pauseScheduler(on bool) {
	s.schedPaused.Store(on)
	s.fsm.events.signal()
}

// RegisterJob stores a new job (the caller has validated spec) and returns
// its ID, assigned here on the leader: the job's name followed by 8 random
// hex digits. The ID travels in the log entry, so replay gives the same ID.
func (s *Server) RegisterJob(ctx context.Context, spec *controlpb.JobSpec) (string, uint64, error) {
	if spec == nil {
		return "", 0, fmt.Errorf("%w: job spec is nil", ErrInvalidArgument)
	}
	logSpec, err := twin[fsmpb.JobSpec](spec)
	if err != nil {
		return "", 0, fmt.Errorf("%w: job spec: %v", ErrInvalidArgument, err)
	}
	for attempt := 0; ; attempt++ {
		id := NewJobID(spec.GetName())
		resp, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_RegisterJob{RegisterJob: &fsmpb.RegisterJob{Id: id, Spec: logSpec, UniqueService: true}}})
		if errors.Is(err, ErrJobExists) && attempt < 3 {
			continue
		}
		if err != nil {
			return "", idx, err
		}
		return resp.(string), idx, nil
	}
}

// NewJobID returns name (lower-cased, reduced to [a-z0-9-_.], at most 40
// characters; "job" when empty) + "-" + 8 random hex digits.
func NewJobID(name string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(name) {
		if b.Len() >= 40 {
			break
		}
		switch {
		case r >= 'a' && r <= 'z', r >= '0' && r <= '9', r == '-', r == '_', r == '.':
			b.WriteRune(r)
		default:
			b.WriteByte('-')
		}
	}
	base := strings.Trim(b.String(), "-.")
	if base == "" {
		base = "job"
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	return base + "-" + hex.EncodeToString(rnd[:])
}

// StopJob requests a job stop: every allocation gets desired status stop
// and the job becomes stopped.
func (s *Server) StopJob(ctx context.Context, id string) (uint64, error) {
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_StopJob{StopJob: &fsmpb.StopJob{Id: id}}})
	return idx, err
}

// UpsertNode stores a node record (the leader's membership reconcile does
// this for gossip members; agents may also register themselves).
func (s *Server) UpsertNode(ctx context.Context, n *controlpb.Node) (uint64, error) {
	if n == nil || n.Id == "" {
		return 0, fmt.Errorf("%w: node record needs an id", ErrInvalidArgument)
	}
	return s.upsertNodes(ctx, []*controlpb.Node{n})
}

func (s *Server) upsertNodes(ctx context.Context, nodes []*controlpb.Node) (uint64, error) {
	logNodes, err := twins[fsmpb.Node](nodes)
	if err != nil {
		return 0, fmt.Errorf("%w: node record: %v", ErrInvalidArgument, err)
	}
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_UpsertNodes{UpsertNodes: &fsmpb.UpsertNodes{Nodes: logNodes}}})
	return idx, err
}

// DrainNode marks a node draining: it gets no new work, its allocations are
// placed elsewhere (a new generation), and if it holds a Raft seat it is
// replaced (leadership moves first). deadline may be zero.
func (s *Server) DrainNode(ctx context.Context, nodeID string, deadline time.Time, reason string) (uint64, error) {
	c := &fsmpb.DrainNode{NodeId: nodeID, Reason: reason}
	if !deadline.IsZero() {
		c.Deadline = timestamppb.New(deadline)
	}
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_DrainNode{DrainNode: c}})
	return idx, err
}

// SetNodeEligibility turns a node's scheduling eligibility on or off.
// Eligible also ends a drain: the node is ready for new work again (work
// already moved away stays where it went). The node's gossip record must
// agree first (its agent clears "draining" there), or the next reconcile
// marks it draining again.
func (s *Server) SetNodeEligibility(ctx context.Context, nodeID string, eligible bool) (uint64, error) {
	c := &fsmpb.NodeEligibility{NodeId: nodeID, Eligible: eligible}
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_NodeEligibility{NodeEligibility: c}})
	return idx, err
}

// UpdateAllocations records client reports: client status, exit code,
// message, start and finish times, result. Only those fields are taken from
// each update (matched by ID); reports for unknown or already final
// allocations are ignored.
func (s *Server) UpdateAllocations(ctx context.Context, updates []*controlpb.Allocation) (uint64, error) {
	logUpdates, err := twins[fsmpb.Allocation](updates)
	if err != nil {
		return 0, fmt.Errorf("%w: allocation update: %v", ErrInvalidArgument, err)
	}
	_, idx, err := s.apply(ctx, &fsmpb.Command{Cmd: &fsmpb.Command_UpdateAllocations{UpdateAllocations: &fsmpb.UpdateAllocations{Allocations: logUpdates}}})
	return idx, err
}

// ReportLoad records one router's load: requests in flight per service job
// ID, averaged over its report window. Only the leader keeps them (it
// scales services by load); elsewhere it returns ErrNotLeader.
func (s *Server) ReportLoad(nodeID string, inFlight map[string]float64) error {
	if !s.IsLeader() {
		return ErrNotLeader
	}
	s.loads.Report(nodeID, inFlight, time.Now())
	return nil
}
