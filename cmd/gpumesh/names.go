package main

import (
	"context"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// memberStatus is the STATUS column of `gpumesh members`: the status a
// member last gossiped, shown only while it is alive. A dead or departed
// member's last word ("ready") is no longer true.
func memberStatus(m *pb.Member) string {
	if m.State != "alive" || m.Meta == nil {
		return "-"
	}
	return dash(m.Meta.Status)
}

// nodeLabel names a node for a person: "node-2 (8d25fd03bf55f4ac)", or the
// bare ID when no name is known (the lookup is best effort).
func nodeLabel(ctx context.Context, f *clientFlags, id string) string {
	if id == "" {
		return "-"
	}
	c, done, err := f.dial()
	if err != nil {
		return id
	}
	defer done()
	resp, err := c.ListNodes(ctx, &pb.ListNodesRequest{Query: &pb.QueryOptions{Stale: true}})
	if err != nil {
		return id
	}
	for _, n := range resp.Nodes {
		if n.Id == id && n.Name != "" && n.Name != id {
			return n.Name + " (" + id + ")"
		}
	}
	return id
}

// newLeader waits (until ctx ends) for the Raft group to name a leader
// after a transfer, preferring want when the reply named one, and returns
// it as "name (id)". The transfer's reply often comes before the new leader
// is known.
func newLeader(ctx context.Context, f *clientFlags, want string) string {
	c, done, err := f.dial()
	if err != nil {
		return dash(want)
	}
	defer done()
	for {
		if resp, err := c.RaftPeers(ctx, &pb.RaftPeersRequest{}); err == nil {
			for _, p := range resp.Peers {
				if (want != "" && p.Id == want) || (want == "" && p.Leader) {
					if p.NodeName != "" {
						return p.NodeName + " (" + p.Id + ")"
					}
					return p.Id
				}
			}
		}
		if !sleepCtx(ctx, 100*time.Millisecond) {
			return dash(want)
		}
	}
}
