package mesh

import (
	"testing"
)

// The Mesh's own join settings follow the live member count past
// ExpectedSize; memberlist's follow ExpectedSize from the start.
func TestSizedJoinSettings(t *testing.T) {
	lan := DefaultLANConfig()
	for _, tc := range []struct {
		expected, alive   int
		joinPeers, rounds int
	}{
		{0, 1, 5, 4},
		{0, 100, 5, 4},
		{0, 200, 2, 4},
		{0, 600, 2, 4},
		{1000, 1, 2, 4},
		{200, 600, 2, 4},
	} {
		c := lan
		c.ExpectedSize = tc.expected
		got := sizedFor(c, tc.alive)
		if got.JoinMaxPeers != tc.joinPeers || got.JoinSyncRounds != tc.rounds {
			t.Errorf("expected %d, alive %d: join peers %d, sync rounds %d; want %d, %d",
				tc.expected, tc.alive, got.JoinMaxPeers, got.JoinSyncRounds, tc.joinPeers, tc.rounds)
		}
	}

	// New runs memberlist with the settings for ExpectedSize.
	net := NewMemNetwork()
	c := DefaultLocalConfig()
	c.NodeName, c.NodeID, c.Transport, c.ExpectedSize = "a", "a", net.NewTransport(), 1000
	m, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Shutdown()
	want := DefaultLocalConfig().ForSize(1000)
	if m.cfg.IndirectChecks != want.IndirectChecks || m.cfg.SuspicionMult != want.SuspicionMult || m.cfg.IndirectChecks == c.IndirectChecks {
		t.Fatalf("memberlist runs with indirect checks %d, suspicion mult %d; want %d, %d (ForSize(1000))",
			m.cfg.IndirectChecks, m.cfg.SuspicionMult, want.IndirectChecks, want.SuspicionMult)
	}
	c.ExpectedSize = -1
	if err := c.Validate(); err == nil {
		t.Fatal("a negative ExpectedSize validates")
	}
}
