package mesh_test

import (
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/mesh"
)

func TestForSize(t *testing.T) {
	lan := mesh.DefaultLANConfig()
	for _, tc := range []struct {
		n                                  int
		indirect, suspMult, joinPeers, syn int
	}{
		{n: 1, indirect: 3, suspMult: 3, joinPeers: 5, syn: 4},
		{n: 50, indirect: 3, suspMult: 3, joinPeers: 5, syn: 4},
		{n: 64, indirect: 3, suspMult: 3, joinPeers: 5, syn: 4},
		{n: 65, indirect: 4, suspMult: 3, joinPeers: 5, syn: 4},
		{n: 128, indirect: 4, suspMult: 3, joinPeers: 5, syn: 4},
		{n: 200, indirect: 4, suspMult: 3, joinPeers: 2, syn: 4},
		{n: 256, indirect: 4, suspMult: 3, joinPeers: 2, syn: 4},
		{n: 257, indirect: 5, suspMult: 4, joinPeers: 2, syn: 4},
		{n: 500, indirect: 5, suspMult: 4, joinPeers: 2, syn: 4},
		{n: 1000, indirect: 5, suspMult: 4, joinPeers: 2, syn: 4},
		{n: 5000, indirect: 6, suspMult: 4, joinPeers: 2, syn: 4},
		{n: 100000, indirect: 6, suspMult: 4, joinPeers: 2, syn: 4},
	} {
		c := lan.ForSize(tc.n)
		if c.IndirectChecks != tc.indirect || c.SuspicionMult != tc.suspMult || c.JoinMaxPeers != tc.joinPeers || c.JoinSyncRounds != tc.syn {
			t.Errorf("n=%d: indirect %d, suspicion mult %d, join peers %d, sync rounds %d; want %d, %d, %d, %d",
				tc.n, c.IndirectChecks, c.SuspicionMult, c.JoinMaxPeers, c.JoinSyncRounds,
				tc.indirect, tc.suspMult, tc.joinPeers, tc.syn)
		}
		// The post-join syncs stay at every size: a mass join converges
		// through them (gossip alone would take about 50 s at 1,000).
		// What memberlist reads per probe and per gossip round stays put:
		// a node's own load does not grow with n.
		if c.ProbeInterval != lan.ProbeInterval || c.ProbeTimeout != lan.ProbeTimeout ||
			c.GossipInterval != lan.GossipInterval || c.GossipNodes != lan.GossipNodes {
			t.Errorf("n=%d: probe or gossip timing changed: %+v", tc.n, c)
		}
		c.NodeName, c.NodeID = "a", "b"
		if err := c.Validate(); err != nil {
			t.Errorf("n=%d: ForSize gives an invalid config: %v", tc.n, err)
		}
	}

	// A preset with fewer indirect checks grows from its own value, and
	// settings already below the caps stay.
	local := mesh.DefaultLocalConfig()
	local.JoinSyncRounds, local.JoinMaxPeers = 1, 1
	if c := local.ForSize(1000); c.IndirectChecks != 3 || c.JoinSyncRounds != 1 || c.JoinMaxPeers != 1 {
		t.Errorf("local preset at 1000: indirect %d, sync rounds %d, join peers %d; want 3, 1, 1", c.IndirectChecks, c.JoinSyncRounds, c.JoinMaxPeers)
	}
}

// The detection budget at 1,000 nodes with the adapted settings: the
// shortest suspicion (two confirmations) plus dissemination fits the
// 5 s target; memberlist's log-scaled minimum.
func TestForSizeSuspicionAt1000(t *testing.T) {
	c := mesh.DefaultLANConfig().ForSize(1000)
	min, max := c.SuspicionTimeouts(1000)
	if min != 2400*time.Millisecond || max != 9600*time.Millisecond {
		t.Errorf("suspicion at 1000 nodes: %v..%v, want 2.4s..9.6s", min, max)
	}
	if k := c.SuspicionConfirmations(1000); k != 2 {
		t.Errorf("confirmations at 1000: %d, want 2", k)
	}
}
