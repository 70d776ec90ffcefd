package consensus

import (
	"context"
	"sort"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
	"google.golang.org/protobuf/proto"
)

// leaderSession holds the duties of one term of leadership: membership
// reconcile, autopilot and the scheduler. It is started when this server
// gains leadership and stopped (all goroutines waited for) when it loses it.
type leaderSession struct {
	s      *Server
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup
	ap     *autopilot.Autopilot
	sched  *schedLoop
}

func (ls *leaderSession) goFunc(f func()) {
	ls.wg.Add(1)
	go func() {
		defer ls.wg.Done()
		f()
	}()
}

func (s *Server) startLeader() {
	s.leaderMu.Lock()
	defer s.leaderMu.Unlock()
	select {
	case <-s.shutdownCh:
		return
	default:
	}
	if s.leader != nil {
		return
	}
	ctx, cancel := context.WithCancel(context.Background())
	ls := &leaderSession{s: s, ctx: ctx, cancel: cancel}
	s.leader = ls
	s.logger.Info("gained leadership; starting leader duties")
	ls.goFunc(ls.run)
}

func (s *Server) stopLeader() {
	s.leaderMu.Lock()
	ls := s.leader
	s.leader = nil
	s.leaderMu.Unlock()
	if ls == nil {
		return
	}
	s.logger.Info("stopping leader duties")
	ls.cancel()
	ls.wg.Wait()
	s.fsm.events.enable(false)
	s.apState.Store(nil)
}

func (ls *leaderSession) run() {
	s := ls.s
	// Apply everything committed by earlier leaders before acting on state.
	if err := s.await(s.raft.Barrier(s.cfg.ApplyTimeout)); err != nil {
		s.logger.Warn("leader barrier failed; leader duties not started", "error", err)
		return
	}
	if ls.ctx.Err() != nil {
		return
	}
	reconcileEvery := s.cfg.DeadServerCleanup / 5
	ls.ap = autopilot.New(s.raft, &apDelegate{ls: ls},
		autopilot.WithLogger(s.logger),
		autopilot.WithPromoter(&Promoter{MaxVoters: s.cfg.MaxVoters}),
		autopilot.WithReconcileInterval(reconcileEvery),
		autopilot.WithUpdateInterval(reconcileEvery/2),
	)
	ls.ap.Start(ls.ctx)
	defer func() {
		// Autopilot may be stuck on a raft future that a shutting-down raft
		// never answers: do not wait for it once the server shuts down.
		done := ls.ap.Stop()
		select {
		case <-done:
		case <-s.shutdownCh:
			select {
			case <-done:
			case <-time.After(5 * time.Second):
				s.logger.Warn("autopilot did not stop within 5s of shutdown; not waiting for it")
			}
		}
	}()

	s.loads.Reset(time.Now())
	ls.sched = newSchedLoop(s, ls.ctx)
	s.fsm.events.enable(true)
	s.fsm.events.all()
	ls.goFunc(ls.sched.run)

	if gcEnabled(s.cfg) {
		ls.goFunc(func() {
			t := time.NewTicker(s.cfg.JobGCInterval)
			defer t.Stop()
			for {
				select {
				case <-ls.ctx.Done():
					return
				case <-t.C:
					ls.collectGarbage()
				}
			}
		})
	}

	tick := time.NewTicker(s.cfg.ReconcileInterval)
	defer tick.Stop()
	for {
		ls.reconcile()
		select {
		case <-ls.ctx.Done():
			return
		case <-s.nudgeLeader:
		case <-tick.C:
		}
	}
}

// reconcile brings the node table and the Raft membership in line with
// the gossip view.
func (ls *leaderSession) reconcile() {
	s := ls.s
	members := s.cfg.Membership.Members()
	ls.reconcileNodes(members)
	ls.reconcileRaft(members)
}

// nodeFromMember builds the node record the FSM should hold for a member.
func nodeFromMember(m Member, old *controlpb.Node) *controlpb.Node {
	var n *controlpb.Node
	if m.Node != nil {
		n = proto.Clone(m.Node).(*controlpb.Node)
	} else {
		n = &controlpb.Node{}
	}
	n.Id = m.ID
	if n.Name == "" {
		n.Name = m.Name
	}
	if m.RPCAddr != "" {
		n.RpcAddr = m.RPCAddr
	}
	if m.RaftAddr != "" {
		n.RaftAddr = m.RaftAddr
	}
	if m.AZ != "" {
		n.Az = m.AZ
	}
	if m.Lifecycle != "" {
		n.Lifecycle = m.Lifecycle
	}
	n.Server = n.Server || m.Server
	// Ineligibility sticks, like a drain, until an operator ends it
	// (SetNodeEligibility): a restarted agent gossips none.
	n.Ineligible = n.Ineligible || m.Ineligible || (old != nil && old.Ineligible)
	n.CreateIndex, n.ModifyIndex, n.StatusTime = 0, 0, nil
	switch {
	case m.State == MemberDead:
		n.Status, n.StatusReason = NodeDown, "gossip reports the node dead"
	case m.State == MemberLeft:
		n.Status, n.StatusReason = NodeLeft, "the node left the cluster"
	case m.Draining || n.Status == NodeDraining || (old != nil && old.Status == NodeDraining):
		n.Status = NodeDraining
		if old != nil && old.Status == NodeDraining {
			if n.StatusReason == "" {
				n.StatusReason = old.StatusReason
			}
			if n.DrainDeadline == nil {
				n.DrainDeadline = old.DrainDeadline
			}
		}
	default:
		n.Status, n.StatusReason = NodeReady, ""
	}
	return n
}

func sameNode(a, b *controlpb.Node) bool {
	x := proto.Clone(a).(*controlpb.Node)
	x.CreateIndex, x.ModifyIndex, x.StatusTime = 0, 0, nil
	return proto.Equal(x, b)
}

func (ls *leaderSession) reconcileNodes(members []Member) {
	s := ls.s
	st := s.fsm.state
	seen := map[string]bool{}
	var changed []*controlpb.Node
	for _, m := range members {
		if m.ID == "" {
			continue
		}
		seen[m.ID] = true
		old := st.Node(m.ID)
		n := nodeFromMember(m, old)
		if old == nil && !nodeAlive(n) {
			continue // never known and already gone
		}
		if old == nil || !sameNode(old, n) {
			changed = append(changed, n)
		}
	}
	for _, old := range st.Nodes() {
		if !seen[old.Id] && nodeAlive(old) {
			n := proto.Clone(old).(*controlpb.Node)
			n.Status, n.StatusReason, n.StatusTime = NodeDown, "no longer in the gossip view", nil
			changed = append(changed, n)
		}
	}
	if len(changed) == 0 {
		return
	}
	if _, err := s.upsertNodes(ls.ctx, changed); err != nil {
		s.logger.Warn("node reconcile failed", "nodes", len(changed), "error", err)
		return
	}
	s.logger.Debug("reconciled nodes", "changed", len(changed))
}

// reconcileRaft adds standbys (non-voters) up to MaxVoters+Standbys Raft
// members, removes draining non-voters, updates changed addresses, and
// moves leadership away from a draining leader. Promotions, demotions and
// dead-server removal are autopilot's (see Promoter).
func (ls *leaderSession) reconcileRaft(members []Member) {
	s := ls.s
	f := s.raft.GetConfiguration()
	if s.await(f) != nil {
		return
	}
	servers := f.Configuration().Servers
	inRaft := map[string]raft.Server{}
	voters := 0
	for _, srv := range servers {
		inRaft[string(srv.ID)] = srv
		if srv.Suffrage == raft.Voter {
			voters++
		}
	}
	total := len(servers)
	anyDead := false
	var cands []Member
	for _, m := range members {
		if !m.Server {
			continue
		}
		srv, ok := inRaft[m.ID]
		if !m.usable() {
			if ok {
				anyDead = true
			}
			continue
		}
		switch {
		case ok && m.ID != s.cfg.NodeID && m.RaftAddr != "" && string(srv.Address) != m.RaftAddr:
			s.logger.Info("raft address changed", "id", m.ID, "old", srv.Address, "new", m.RaftAddr)
			var fut raft.IndexFuture
			if srv.Suffrage == raft.Voter {
				fut = s.raft.AddVoter(srv.ID, raft.ServerAddress(m.RaftAddr), 0, 0)
			} else {
				fut = s.raft.AddNonvoter(srv.ID, raft.ServerAddress(m.RaftAddr), 0, 0)
			}
			if err := s.await(fut); err != nil {
				s.logger.Warn("update raft address failed", "id", m.ID, "error", err)
			}
		case ok && s.draining(m) && srv.Suffrage == raft.Nonvoter && m.ID != s.cfg.NodeID:
			s.logger.Info("removing draining standby from raft", "id", m.ID)
			if err := s.await(s.raft.RemoveServer(srv.ID, 0, 0)); err != nil {
				s.logger.Warn("remove draining standby failed", "id", m.ID, "error", err)
			} else {
				total--
			}
		case !ok && !s.draining(m) && m.RaftAddr != "":
			cands = append(cands, m)
		}
	}
	sortCandidates(cands)
	for _, m := range cands {
		if total >= s.cfg.MaxVoters+s.cfg.Standbys {
			break
		}
		s.logger.Info("adding raft standby", "id", m.ID, "addr", m.RaftAddr)
		if err := s.await(s.raft.AddNonvoter(raft.ServerID(m.ID), raft.ServerAddress(m.RaftAddr), 0, 0)); err != nil {
			s.logger.Warn("add standby failed", "id", m.ID, "error", err)
			break
		}
		total++
	}
	if anyDead && ls.ap != nil {
		ls.ap.RemoveDeadServers()
	}
	// A draining leader hands over first, while it still can.
	for _, m := range members {
		if m.ID == s.cfg.NodeID && s.draining(m) && voters > 1 {
			s.logger.Info("leader is draining; transferring leadership")
			if err := s.await(s.raft.LeadershipTransfer()); err != nil {
				s.logger.Warn("leadership transfer failed", "error", err)
			}
			return
		}
	}
}

// draining reports whether a member is draining, by gossip or by a drain
// committed to the state (DrainNode).
func (s *Server) draining(m Member) bool {
	if m.Draining {
		return true
	}
	n := s.fsm.state.Node(m.ID)
	return n != nil && n.Status == NodeDraining
}

// ---------------------------------------------------------------- autopilot

// apSnapshot is the health view of the last autopilot state.
type apSnapshot struct{ health map[raft.ServerID]bool }

func (a *apSnapshot) healthy(id raft.ServerID) (bool, bool) {
	if a == nil {
		return false, false
	}
	h, ok := a.health[id]
	return h, ok
}

// apDelegate is autopilot's view of the application.
type apDelegate struct{ ls *leaderSession }

var _ autopilot.ApplicationIntegration = (*apDelegate)(nil)

func (d *apDelegate) AutopilotConfig() *autopilot.Config {
	c := d.ls.s.cfg
	return &autopilot.Config{
		CleanupDeadServers:   true,
		LastContactThreshold: c.LastContactThreshold,
		MaxTrailingLogs:      1024,
		// Never clean a dead voter up below the voter count the cluster was
		// formed with: in a 3-server cluster a voter that crashed keeps its
		// seat, so it votes again the moment it restarts (removed and re-added
		// as a standby, it could not vote until promoted, and a second crash
		// in that window left no quorum).
		MinQuorum:               uint(min(c.MaxVoters, c.BootstrapExpect)),
		ServerStabilizationTime: c.ServerStabilization,
	}
}

func (d *apDelegate) NotifyState(st *autopilot.State) {
	h := make(map[raft.ServerID]bool, len(st.Servers))
	for id, srv := range st.Servers {
		h[id] = srv.Health.Healthy
	}
	d.ls.s.apState.Store(&apSnapshot{health: h})
}

// FetchServerStats derives follower stats from the leader's own view: a
// follower whose heartbeats succeed is taken to be on the leader's term
// and index; one whose heartbeats fail reports the time since its last
// contact. (No extra RPC between servers is needed.)
func (d *apDelegate) FetchServerStats(_ context.Context, servers map[raft.ServerID]*autopilot.Server) map[raft.ServerID]*autopilot.ServerStats {
	s := d.ls.s
	term := s.raft.CurrentTerm()
	last := s.raft.LastIndex()
	out := make(map[raft.ServerID]*autopilot.ServerStats, len(servers))
	for id := range servers {
		st := &autopilot.ServerStats{LastTerm: term, LastIndex: last}
		if id != raft.ServerID(s.cfg.NodeID) {
			if lc, failing := s.lastContact(id); failing {
				st.LastContact = lc
			}
		}
		out[id] = st
	}
	return out
}

func (d *apDelegate) KnownServers() map[raft.ServerID]*autopilot.Server {
	s := d.ls.s
	out := map[raft.ServerID]*autopilot.Server{}
	for _, m := range s.cfg.Membership.Members() {
		if !m.Server || m.ID == "" {
			continue
		}
		status := autopilot.NodeAlive
		switch m.State {
		case MemberDead:
			status = autopilot.NodeFailed
		case MemberLeft:
			status = autopilot.NodeLeft
		}
		out[raft.ServerID(m.ID)] = &autopilot.Server{
			ID:          raft.ServerID(m.ID),
			Name:        m.Name,
			Address:     raft.ServerAddress(m.RaftAddr),
			NodeStatus:  status,
			RaftVersion: raft.ProtocolVersionMax,
			IsLeader:    m.ID == s.cfg.NodeID,
			NodeType:    autopilot.NodeVoter,
			Meta:        memberMeta(m, s.draining(m)),
		}
	}
	// Raft members missing from the gossip view (not yet seen after a
	// restart, or reaped) are judged by Raft's own heartbeats, so a slow
	// gossip view never removes a working server.
	if f := s.raft.GetConfiguration(); s.await(f) == nil {
		for _, srv := range f.Configuration().Servers {
			if _, ok := out[srv.ID]; ok {
				continue
			}
			status := autopilot.NodeAlive
			if _, failing := s.lastContact(srv.ID); failing {
				status = autopilot.NodeFailed
			}
			out[srv.ID] = &autopilot.Server{ID: srv.ID, Name: string(srv.ID), Address: srv.Address, NodeStatus: status,
				RaftVersion: raft.ProtocolVersionMax, NodeType: autopilot.NodeVoter, Meta: map[string]string{}}
		}
	}
	return out
}

func memberMeta(m Member, draining bool) map[string]string {
	meta := map[string]string{metaAZ: m.AZ, metaLifecycle: m.Lifecycle}
	if draining {
		meta[metaDraining] = "true"
	}
	return meta
}

const (
	metaAZ        = "az"
	metaLifecycle = "lifecycle"
	metaDraining  = "draining"
)

func (d *apDelegate) RemoveFailedServer(srv *autopilot.Server) {
	ls := d.ls
	if ls.ctx.Err() != nil {
		return
	}
	ls.goFunc(func() {
		ls.s.logger.Info("removing failed raft server", "id", srv.ID, "name", srv.Name)
		if err := ls.s.await(ls.s.raft.RemoveServer(srv.ID, 0, 0)); err != nil {
			ls.s.logger.Warn("remove failed server", "id", srv.ID, "error", err)
		}
	})
}

// Promoter is the autopilot promoter of gpumesh: it keeps MaxVoters voters,
// chosen among healthy, non-draining servers, on-demand before spot, spread
// over distinct availability zones, and otherwise sticks with the current
// voters. A draining voter is demoted once a replacement is a voter; a
// draining leader hands leadership to another voter.
type Promoter struct {
	MaxVoters int
}

var _ autopilot.Promoter = (*Promoter)(nil)

func (p *Promoter) GetServerExt(*autopilot.Config, *autopilot.ServerState) any { return nil }
func (p *Promoter) GetStateExt(*autopilot.Config, *autopilot.State) any        { return nil }

func (p *Promoter) GetNodeTypes(_ *autopilot.Config, s *autopilot.State) map[raft.ServerID]autopilot.NodeType {
	out := make(map[raft.ServerID]autopilot.NodeType, len(s.Servers))
	for id := range s.Servers {
		out[id] = autopilot.NodeVoter
	}
	return out
}

func (p *Promoter) FilterFailedServerRemovals(_ *autopilot.Config, _ *autopilot.State, f *autopilot.FailedServers) *autopilot.FailedServers {
	return f
}

func (p *Promoter) IsPotentialVoter(t autopilot.NodeType) bool { return t == autopilot.NodeVoter }

// CalculatePromotionsAndDemotions computes the desired voter set (see the
// type's comment) and the changes that reach it.
func (p *Promoter) CalculatePromotionsAndDemotions(c *autopilot.Config, s *autopilot.State) autopilot.RaftChanges {
	now := time.Now()
	stable := s.ServerStabilizationTime(c)
	desired := DesiredVoters(s, p.MaxVoters, func(ss *autopilot.ServerState) bool {
		return ss.Health.IsStable(now, stable)
	})
	want := map[raft.ServerID]bool{}
	for _, id := range desired {
		want[id] = true
	}
	var ch autopilot.RaftChanges
	ids := make([]raft.ServerID, 0, len(s.Servers))
	for id := range s.Servers {
		ids = append(ids, id)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	voters := 0
	for _, id := range ids {
		if ss := s.Servers[id]; ss.HasVotingRights() || ss.State == autopilot.RaftStaging {
			voters++
		}
	}
	for _, id := range ids {
		ss := s.Servers[id]
		voter := ss.HasVotingRights() || ss.State == autopilot.RaftStaging
		switch {
		case want[id] && !voter:
			ch.Promotions = append(ch.Promotions, id)
		case !want[id] && voter && ss.Server.NodeStatus != autopilot.NodeAlive && voters <= p.MaxVoters:
			// A voter that is down keeps its seat while no replacement
			// needs it: restarted, it votes at once (demoted, it would have
			// to wait for promotion, and one more crash in that window
			// would leave no quorum).
		case !want[id] && voter && ss.State != autopilot.RaftLeader:
			// Only once the desired voters are all in place.
			ch.Demotions = append(ch.Demotions, id)
		}
	}
	if len(ch.Promotions) > 0 {
		ch.Demotions = nil
	}
	if ld, ok := s.Servers[s.Leader]; ok && !want[s.Leader] && len(ch.Promotions) == 0 && len(ch.Demotions) == 0 {
		_ = ld
		for _, id := range desired {
			if srv := s.Servers[id]; srv != nil && srv.HasVotingRights() && id != s.Leader {
				ch.Leader = id
				break
			}
		}
	}
	return ch
}

// DesiredVoters picks up to maxVoters servers from an autopilot state:
// alive, non-draining servers that are current voters or pass eligible
// (stable health for non-voters), ranked on-demand before spot, new AZs
// first, current voters before others, then by ID. Draining current voters
// fill remaining seats only when nothing else can.
func DesiredVoters(s *autopilot.State, maxVoters int, eligible func(*autopilot.ServerState) bool) []raft.ServerID {
	type cand struct {
		id    raft.ServerID
		voter bool
		life  int
		az    string
	}
	var cands, draining []cand
	for id, ss := range s.Servers {
		if ss.Server.NodeStatus != autopilot.NodeAlive {
			continue
		}
		voter := ss.HasVotingRights() || ss.State == autopilot.RaftStaging
		c := cand{id: id, voter: voter, life: lifecycleRank(ss.Server.Meta[metaLifecycle]), az: ss.Server.Meta[metaAZ]}
		if ss.Server.Meta[metaDraining] == "true" {
			if voter {
				draining = append(draining, c)
			}
			continue
		}
		if !voter && !eligible(ss) {
			continue
		}
		if voter && !ss.Health.Healthy && ss.State != autopilot.RaftLeader {
			// An unhealthy voter keeps its seat unless a better candidate
			// exists: rank it after every healthy server.
			c.life += 10
		}
		cands = append(cands, c)
	}
	less := func(a, b cand, usedAZ map[string]bool) bool {
		if a.life != b.life {
			return a.life < b.life
		}
		na, nb := a.az != "" && !usedAZ[a.az], b.az != "" && !usedAZ[b.az]
		if na != nb {
			return na
		}
		if a.voter != b.voter {
			return a.voter
		}
		return a.id < b.id
	}
	var out []raft.ServerID
	used := map[string]bool{}
	for len(out) < maxVoters && len(cands) > 0 {
		best := 0
		for i := 1; i < len(cands); i++ {
			if less(cands[i], cands[best], used) {
				best = i
			}
		}
		out = append(out, cands[best].id)
		used[cands[best].az] = true
		cands = append(cands[:best], cands[best+1:]...)
	}
	sort.Slice(draining, func(i, j int) bool { return draining[i].id < draining[j].id })
	for _, c := range draining {
		if len(out) >= maxVoters {
			break
		}
		out = append(out, c.id)
	}
	return out
}
