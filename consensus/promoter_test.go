package consensus

import (
	"testing"
	"time"

	"github.com/hashicorp/raft"
	autopilot "github.com/hashicorp/raft-autopilot"
)

func apState(servers ...*autopilot.ServerState) *autopilot.State {
	s := &autopilot.State{Servers: map[raft.ServerID]*autopilot.ServerState{}}
	for _, ss := range servers {
		s.Servers[ss.Server.ID] = ss
		if ss.State == autopilot.RaftLeader {
			s.Leader = ss.Server.ID
		}
	}
	return s
}

func srv(id string, state autopilot.RaftState, life, az string, draining bool) *autopilot.ServerState {
	meta := map[string]string{metaLifecycle: life, metaAZ: az}
	if draining {
		meta[metaDraining] = "true"
	}
	return &autopilot.ServerState{
		Server: autopilot.Server{ID: raft.ServerID(id), NodeStatus: autopilot.NodeAlive, Meta: meta},
		State:  state,
		Health: autopilot.ServerHealth{Healthy: true, StableSince: time.Now().Add(-time.Hour)},
	}
}

func TestDesiredVoters(t *testing.T) {
	all := func(*autopilot.ServerState) bool { return true }
	cases := []struct {
		name string
		st   *autopilot.State
		want []string
	}{
		{"sticky voters", apState(
			srv("a", autopilot.RaftLeader, "on-demand", "x", false),
			srv("b", autopilot.RaftVoter, "on-demand", "x", false),
			srv("c", autopilot.RaftVoter, "on-demand", "x", false),
			srv("d", autopilot.RaftNonVoter, "on-demand", "x", false),
		), []string{"a", "b", "c"}},
		{"on-demand before spot", apState(
			srv("a", autopilot.RaftLeader, "spot", "x", false),
			srv("b", autopilot.RaftVoter, "spot", "x", false),
			srv("c", autopilot.RaftVoter, "spot", "x", false),
			srv("z", autopilot.RaftNonVoter, "on-demand", "x", false),
		), []string{"z", "a", "b"}},
		{"distinct AZs", apState(
			srv("a", autopilot.RaftLeader, "on-demand", "x", false),
			srv("b", autopilot.RaftVoter, "on-demand", "x", false),
			srv("c", autopilot.RaftVoter, "on-demand", "x", false),
			srv("d", autopilot.RaftNonVoter, "on-demand", "y", false),
			srv("e", autopilot.RaftNonVoter, "on-demand", "z", false),
		), []string{"a", "d", "e"}},
		{"draining replaced", apState(
			srv("a", autopilot.RaftLeader, "on-demand", "", false),
			srv("b", autopilot.RaftVoter, "on-demand", "", true),
			srv("c", autopilot.RaftVoter, "on-demand", "", false),
			srv("d", autopilot.RaftNonVoter, "spot", "", false),
		), []string{"a", "c", "d"}},
		{"draining kept when nothing else", apState(
			srv("a", autopilot.RaftLeader, "on-demand", "", false),
			srv("b", autopilot.RaftVoter, "on-demand", "", true),
			srv("c", autopilot.RaftVoter, "on-demand", "", false),
		), []string{"a", "c", "b"}},
	}
	for _, c := range cases {
		got := DesiredVoters(c.st, 3, all)
		if len(got) != len(c.want) {
			t.Errorf("%s: got %v, want %v", c.name, got, c.want)
			continue
		}
		for i := range got {
			if string(got[i]) != c.want[i] {
				t.Errorf("%s: got %v, want %v", c.name, got, c.want)
				break
			}
		}
	}
	// Promotions come before demotions; the leader hands over last.
	p := &Promoter{MaxVoters: 3}
	st := apState(
		srv("a", autopilot.RaftLeader, "spot", "", false),
		srv("b", autopilot.RaftVoter, "on-demand", "", false),
		srv("c", autopilot.RaftVoter, "on-demand", "", false),
		srv("d", autopilot.RaftNonVoter, "on-demand", "", false),
	)
	ch := p.CalculatePromotionsAndDemotions(&autopilot.Config{}, st)
	if len(ch.Promotions) != 1 || ch.Promotions[0] != "d" || len(ch.Demotions) != 0 || ch.Leader != "" {
		t.Fatalf("round 1 changes %+v", ch)
	}
	st.Servers["d"].State = autopilot.RaftVoter
	ch = p.CalculatePromotionsAndDemotions(&autopilot.Config{}, st)
	if len(ch.Promotions) != 0 || len(ch.Demotions) != 0 || ch.Leader == "" || ch.Leader == "a" {
		t.Fatalf("round 2 changes %+v", ch)
	}
}
