package consensus

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/hashicorp/raft"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// isVoter reports whether id is a voter in cfg (raft.Voter is the zero
// value, so a missing id must not read as a voter).
func isVoter(cfg map[string]raft.ServerSuffrage, id string) bool {
	s, ok := cfg[id]
	return ok && s == raft.Voter
}

func voters(cfg map[string]raft.ServerSuffrage) (v, nv []string) {
	for id, s := range cfg {
		if s == raft.Voter {
			v = append(v, id)
		} else {
			nv = append(nv, id)
		}
	}
	return
}

// waitConfig waits until the leader's Raft configuration has want voters
// and wantNon non-voters, none of them in exclude.
func waitConfig(t *testing.T, tc *TestCluster, timeout time.Duration, want, wantNon int, exclude ...string) map[string]raft.ServerSuffrage {
	t.Helper()
	var cfg map[string]raft.ServerSuffrage
	poll.Until(t, timeout, func() (bool, string) {
		l := tc.Leader()
		if l == nil {
			return false, "no leader"
		}
		cfg = RaftConfig(l)
		for _, x := range exclude {
			if _, ok := cfg[x]; ok {
				return false, fmt.Sprintf("%s still in %v", x, cfg)
			}
		}
		v, nv := voters(cfg)
		return len(v) == want && len(nv) == wantNon, fmt.Sprintf("config %v", cfg)
	})
	return cfg
}

func TestElectionThreeNodes(t *testing.T) {
	tc := MakeTestCluster(t, 3, nil)
	waitConfig(t, tc, 5*time.Second, 3, 0)
	var l *Server
	var lid string
	poll.Until(t, 5*time.Second, func() (bool, string) {
		l = tc.Leader()
		if l == nil {
			return false, "no leader"
		}
		lid, _ = l.Leader()
		return lid == l.cfg.NodeID && l.Role() == RoleLeader, fmt.Sprintf("leader reports leader %q role %s", lid, l.Role())
	})
	for _, s := range tc.Live() {
		poll.Until(t, 5*time.Second, func() (bool, string) {
			id, addr := s.Leader()
			return id == lid && addr == "127.0.0.1:7947", fmt.Sprintf("%s sees leader %q %q", s.cfg.NodeID, id, addr)
		})
		if s != l {
			poll.Until(t, 5*time.Second, func() (bool, string) { return s.Role() == RoleVoter, s.cfg.NodeID + " role " + s.Role() })
		}
	}
	if err := l.VerifyLeader(ctxT(t)); err != nil && l.IsLeader() {
		t.Fatalf("verify leader: %v", err)
	}
	for _, s := range tc.Live() {
		if s != l && !errors.Is(s.VerifyLeader(ctxT(t)), ErrNotLeader) {
			t.Fatalf("follower %s verified leadership", s.cfg.NodeID)
		}
	}
	peers, err := l.Peers()
	if err != nil || len(peers) != 3 {
		t.Fatalf("peers %v %v", peers, err)
	}
	// The leader's node reconcile put every member into the node table.
	poll.Until(t, 5*time.Second, func() (bool, string) {
		n := l.State().Nodes()
		return len(n) == 3 && n[0].Status == NodeReady, fmt.Sprintf("nodes %v", n)
	})
}

func TestElectionFiveNodesStandbys(t *testing.T) {
	tc := MakeTestCluster(t, 5, nil)
	// Bootstrap takes 3 voters; the leader adds the other two as standbys.
	cfg := waitConfig(t, tc, 10*time.Second, 3, 2)
	roles := map[string]int{}
	for _, s := range tc.Live() {
		poll.Until(t, 5*time.Second, func() (bool, string) { return s.Role() != RoleNone, s.cfg.NodeID + " has no role" })
		roles[s.Role()]++
	}
	if roles[RoleLeader] != 1 || roles[RoleVoter] != 2 || roles[RoleStandby] != 2 {
		t.Fatalf("roles %v (config %v)", roles, cfg)
	}
}

func TestElectionFiveVoters(t *testing.T) {
	tc := MakeTestCluster(t, 5, func(c *Config) { c.MaxVoters = 5; c.BootstrapExpect = 5 })
	waitConfig(t, tc, 10*time.Second, 5, 0)
}

func TestLeaderKilledNewLeaderTakesWrites(t *testing.T) {
	tc := MakeTestCluster(t, 3, nil)
	tc.WaitForLeader(5 * time.Second)
	var id1 string
	tc.Write(func(s *Server) (err error) {
		id1, _, err = s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "before", Type: "exec", Ranks: 1})
		return err
	})
	l := tc.WaitForLeader(5 * time.Second)
	// A follower refuses writes with the leader's address.
	for _, s := range tc.Live() {
		if s == l {
			continue
		}
		poll.Until(t, 5*time.Second, func() (bool, string) { id, _ := s.Leader(); return id != "", "follower knows no leader" })
		_, _, err := s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "x", Ranks: 1})
		var nle *NotLeaderError
		if !errors.Is(err, ErrNotLeader) || !errors.As(err, &nle) || nle.LeaderID == "" || nle.LeaderRPCAddr == "" {
			t.Fatalf("follower write: %v", err)
		}
	}
	old := l.cfg.NodeID
	tc.Stop(old, true)
	var nl *Server
	poll.Until(t, 10*time.Second, func() (bool, string) {
		nl = tc.Leader()
		return nl != nil && nl.cfg.NodeID != old, "no new leader"
	})
	var id2 string
	tc.Write(func(s *Server) (err error) {
		id2, _, err = s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "after", Type: "exec", Ranks: 1})
		return err
	})
	for _, s := range tc.Live() {
		poll.Until(t, 5*time.Second, func() (bool, string) {
			return s.State().Job(id1) != nil && s.State().Job(id2) != nil, s.cfg.NodeID + " misses a job"
		})
	}
}

func TestDeadVoterReplacedWithin10s(t *testing.T) {
	tc := MakeTestCluster(t, 5, nil)
	cfg := waitConfig(t, tc, 10*time.Second, 3, 2)
	l := tc.Leader()
	var victim string
	for id, s := range cfg {
		if s == raft.Voter && id != l.cfg.NodeID {
			victim = id
			break
		}
	}
	start := time.Now()
	tc.Stop(victim, true)
	// Removed, and a standby promoted: 3 voters, 1 standby, victim gone.
	waitConfig(t, tc, 10*time.Second, 3, 1, victim)
	t.Logf("dead voter %s replaced in %s", victim, time.Since(start))
	// Writes still work.
	tc.Write(func(s *Server) error {
		_, _, err := s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "x", Ranks: 1})
		return err
	})
	// The node table shows the dead member down.
	poll.Until(t, 5*time.Second, func() (bool, string) {
		n := tc.Leader().State().Node(victim)
		return n != nil && n.Status == NodeDown, fmt.Sprintf("node %v", n)
	})
}

func TestSpotAwareVoters(t *testing.T) {
	tc := NewTestCluster(t, nil)
	// Three spot servers bootstrap; two on-demand servers in two AZs come
	// later and must take voter seats from spot ones.
	for i := 0; i < 3; i++ {
		tc.Start(fmt.Sprintf("spot-%d", i), func(m *Member) { m.Lifecycle = LifecycleSpot; m.AZ = "az-a" })
	}
	for _, id := range tc.IDs() {
		tc.AnnounceAll(id)
	}
	tc.WaitForLeader(10 * time.Second)
	waitConfig(t, tc, 10*time.Second, 3, 0)
	tc.Start("od-1", func(m *Member) { m.AZ = "az-b" })
	tc.AnnounceAll("od-1")
	tc.Start("od-2", func(m *Member) { m.AZ = "az-c" })
	tc.AnnounceAll("od-2")
	poll.Until(t, 15*time.Second, func() (bool, string) {
		l := tc.Leader()
		if l == nil {
			return false, "no leader"
		}
		cfg := RaftConfig(l)
		v, _ := voters(cfg)
		return isVoter(cfg, "od-1") && isVoter(cfg, "od-2") && len(cfg) == 5 && len(v) == 3, fmt.Sprintf("config %v", cfg)
	})
}

func TestDrainingLeaderHandsOver(t *testing.T) {
	tc := MakeTestCluster(t, 4, nil)
	waitConfig(t, tc, 10*time.Second, 3, 1)
	l := tc.Leader()
	old := l.cfg.NodeID
	tc.SetMember(old, func(m *Member) { m.Draining = true })
	// Leadership moves away and the draining node loses its vote; the
	// standby is promoted in its place.
	poll.Until(t, 10*time.Second, func() (bool, string) {
		nl := tc.Leader()
		if nl == nil || nl.cfg.NodeID == old {
			return false, "leader not moved"
		}
		cfg := RaftConfig(nl)
		v, _ := voters(cfg)
		return !isVoter(cfg, old) && len(v) == 3, fmt.Sprintf("config %v", cfg)
	})
}

func TestRestartFromDataDir(t *testing.T) {
	tc := MakeTestCluster(t, 3, nil)
	tc.WaitForLeader(5 * time.Second)
	var id string
	tc.Write(func(s *Server) (err error) {
		id, _, err = s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "keep", Ranks: 1})
		return err
	})
	l := tc.WaitForLeader(5 * time.Second)
	// Restart a follower: it comes back with its state and rejoins.
	var f string
	for _, s := range tc.Live() {
		if s != l {
			f = s.cfg.NodeID
		}
	}
	poll.Until(t, 5*time.Second, func() (bool, string) { return tc.Server(f).State().Job(id) != nil, "not replicated" })
	tc.Stop(f, false)
	s := tc.Restart(f)
	if !s.Bootstrapped() {
		t.Fatal("restarted server does not report its raft state")
	}
	poll.Until(t, 5*time.Second, func() (bool, string) { return s.State().Job(id) != nil, "job lost after restart" })
	var id2 string
	tc.Write(func(s *Server) (err error) {
		id2, _, err = s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "later", Ranks: 1})
		return err
	})
	poll.Until(t, 5*time.Second, func() (bool, string) { return s.State().Job(id2) != nil, "restarted server gets no new entries" })

	// Restart the whole cluster: a leader is elected from the data dirs.
	ids := tc.IDs()
	for _, x := range ids {
		tc.Stop(x, false)
	}
	for _, x := range ids {
		tc.Restart(x)
	}
	nl := tc.WaitForLeader(10 * time.Second)
	poll.Until(t, 5*time.Second, func() (bool, string) {
		return nl.State().Job(id) != nil && nl.State().Job(id2) != nil, "state lost in full restart"
	})
	tc.Write(func(s *Server) error {
		_, _, err := s.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "again", Ranks: 1})
		return err
	})
}

func TestRestartAfterSnapshot(t *testing.T) {
	tc := MakeTestCluster(t, 1, func(c *Config) {
		c.BootstrapExpect, c.MaxVoters = 1, 1
		c.SnapshotThreshold, c.TrailingLogs = 16, 4
	})
	l := tc.WaitForLeader(5 * time.Second)
	var ids []string
	for i := 0; i < 40; i++ {
		id, _, err := l.RegisterJob(ctxT(t), &controlpb.JobSpec{Name: "s", Ranks: 1})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := l.raft.Snapshot().Error(); err != nil {
		t.Fatalf("snapshot: %v", err)
	}
	tc.Stop("node-0", false)
	s := tc.Restart("node-0")
	tc.WaitForLeader(5 * time.Second)
	poll.Until(t, 5*time.Second, func() (bool, string) {
		for _, id := range ids {
			if s.State().Job(id) == nil {
				return false, "missing " + id
			}
		}
		return true, ""
	})
}

func TestBootstrapMembersInDifferentOrders(t *testing.T) {
	for trial := 0; trial < 3; trial++ {
		t.Run(fmt.Sprint(trial), func(t *testing.T) {
			tc := NewTestCluster(t, nil)
			ids := []string{"n-a", "n-b", "n-c"}
			for _, id := range ids {
				tc.Start(id, nil)
			}
			// Each node learns of the others one by one, in its own order.
			orders := [][]string{{"n-a", "n-b", "n-c"}, {"n-c", "n-a", "n-b"}, {"n-b", "n-c", "n-a"}}
			for step := 0; step < 3; step++ {
				for i, obs := range ids {
					tc.Announce(obs, orders[(i+trial)%3][step])
				}
				time.Sleep(30 * time.Millisecond) // let bootstrap loops look at partial views
			}
			tc.WaitForLeader(10 * time.Second)
			waitConfig(t, tc, 5*time.Second, 3, 0)
			// A server that appears later never bootstraps its own cluster,
			// although its ID sorts first (its own bootstrap set would hold
			// it): it sees members gossiping Bootstrapped and waits to be
			// added by the leader.
			s0 := tc.Start("n-0", nil)
			for _, id := range ids {
				tc.Announce("n-0", id) // n-0 sees the cluster before anyone sees n-0
			}
			tc.Announce("n-0", "n-0")
			poll.Until(t, 5*time.Second, func() (bool, string) { return s0.bootBlocked.Load(), "n-0 did not notice the existing cluster" })
			if s0.raft.LastIndex() != 0 {
				t.Fatal("n-0 bootstrapped a cluster of its own")
			}
			tc.AnnounceAll("n-0")
			waitConfig(t, tc, 10*time.Second, 3, 1)
			// One cluster: a single leader that every server follows.
			poll.Until(t, 10*time.Second, func() (bool, string) {
				l := tc.Leader()
				if l == nil {
					return false, "no single leader"
				}
				for _, s := range tc.Live() {
					if id, _ := s.Leader(); id != l.cfg.NodeID {
						return false, fmt.Sprintf("%s follows %q, not %s", s.cfg.NodeID, id, l.cfg.NodeID)
					}
				}
				return true, ""
			})
			// n-0's first log entry is the real cluster's bootstrap
			// configuration, not one of its own making.
			var first raft.Log
			w := tc.Server("n-0").wal
			poll.Until(t, 5*time.Second, func() (bool, string) {
				li, _ := w.LastIndex()
				return li > 1, "n-0 got no log entries"
			})
			fi, _ := w.FirstIndex()
			li, _ := w.LastIndex()
			if err := w.GetLog(fi, &first); err != nil {
				t.Fatalf("read n-0's first log entry (%d..%d): %v", fi, li, err)
			}
			if first.Type != raft.LogConfiguration {
				t.Fatalf("n-0's first entry is %v", first.Type)
			}
			for _, srv := range raft.DecodeConfiguration(first.Data).Servers {
				if srv.ID == "n-0" {
					t.Fatal("n-0 bootstrapped a cluster of its own")
				}
			}
		})
	}
}

func TestShutdownIdempotentAndErrors(t *testing.T) {
	tc := MakeTestCluster(t, 1, func(c *Config) { c.BootstrapExpect, c.MaxVoters = 1, 1 })
	s := tc.WaitForLeader(5 * time.Second)
	tc.Stop("node-0", false)
	if err := s.Shutdown(); err != nil {
		t.Fatalf("second shutdown: %v", err)
	}
	if _, _, err := s.RegisterJob(context.Background(), &controlpb.JobSpec{Name: "x", Ranks: 1}); !errors.Is(err, ErrShutdown) {
		t.Fatalf("write after shutdown: %v", err)
	}
}

func TestDrainNodeReplacesVoter(t *testing.T) {
	tc := MakeTestCluster(t, 4, nil)
	cfg := waitConfig(t, tc, 10*time.Second, 3, 1)
	l := tc.Leader()
	var victim string
	for id, s := range cfg {
		if s == raft.Voter && id != l.cfg.NodeID {
			victim = id
		}
	}
	poll.Until(t, 5*time.Second, func() (bool, string) { return l.State().Node(victim) != nil, "node not reconciled" })
	tc.Write(func(s *Server) error {
		_, err := s.DrainNode(ctxT(t), victim, time.Now().Add(2*time.Minute), "spot interruption")
		return err
	})
	// The standby becomes a voter and the draining node leaves the voters
	// (then, as a draining standby, Raft altogether).
	poll.Until(t, 10*time.Second, func() (bool, string) {
		nl := tc.Leader()
		if nl == nil {
			return false, "no leader"
		}
		cfg := RaftConfig(nl)
		v, _ := voters(cfg)
		return !isVoter(cfg, victim) && len(v) == 3, fmt.Sprintf("config %v", cfg)
	})
	if n := tc.Leader().State().Node(victim); n.Status != NodeDraining || n.StatusReason != "spot interruption" {
		t.Fatalf("drained node record %v", n)
	}
}
