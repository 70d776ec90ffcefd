package sharding

import "testing"

// Nodes in Job.Avoid take ranks only when no placement without them
// exists, whatever the placement policy prefers.
func TestPlaceAvoidsNodesWhenItCan(t *testing.T) {
	cases := []struct {
		name  string
		nodes []Node
		avoid []string
		want  string
	}{
		{"pack prefers the fuller node, avoided", []Node{node("n1", "a", 4), node("n2", "a", 8)}, []string{"n1"}, "n2"},
		{"the only node with room is avoided: used", []Node{node("n1", "a", 4), node("n2", "a", 0)}, []string{"n1"}, "n1"},
		{"every node avoided: placed all the same", []Node{node("n1", "a", 4)}, []string{"n1"}, "n1"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			cl, err := NewCluster(c.nodes, nil)
			if err != nil {
				t.Fatal(err)
			}
			p, err := cl.Place(Job{ID: "j", Ranks: 1, GPUsPerRank: 1, Placement: PlacementPack, Avoid: c.avoid})
			if err != nil {
				t.Fatal(err)
			}
			if got := p.Ranks[0].NodeID; got != c.want {
				t.Fatalf("placed on %s, want %s", got, c.want)
			}
		})
	}
}
