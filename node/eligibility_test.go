package node

import (
	"context"
	"fmt"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// memberStatus is node name's status as agent c's gossip view shows it
// (`gpumesh members`): "ready" or "draining", plus ",ineligible".
func memberStatus(ctx context.Context, c pb.ControlClient, name string) (string, error) {
	resp, err := c.Members(ctx, &pb.MembersRequest{})
	if err != nil {
		return "", err
	}
	for _, m := range resp.Members {
		if m.Name == name && m.Meta != nil {
			st := m.Meta.Status
			if m.Meta.Ineligible {
				st += ",ineligible"
			}
			return st, nil
		}
	}
	return "", fmt.Errorf("no member %s", name)
}

// nodeStatus is the same from the cluster state (`gpumesh nodes`).
func nodeStatus(ctx context.Context, c pb.ControlClient, name string) (string, error) {
	resp, err := c.ListNodes(ctx, &pb.ListNodesRequest{})
	if err != nil {
		return "", err
	}
	for _, n := range resp.Nodes {
		if n.Name == name {
			st := n.Status
			if n.Ineligible {
				st += ",ineligible"
			}
			return st, nil
		}
	}
	return "", fmt.Errorf("no node %s", name)
}

func waitStatus(t *testing.T, ctx context.Context, c pb.ControlClient, name, want string) {
	t.Helper()
	poll.Until(t, 15*time.Second, func() error {
		m, err := memberStatus(ctx, c, name)
		if err != nil {
			return err
		}
		n, err := nodeStatus(ctx, c, name)
		if err != nil {
			return err
		}
		if m != want || n != want {
			return fmt.Errorf("%s: members say %q, nodes say %q; want %q in both", name, m, n, want)
		}
		return nil
	})
}

// A node drained from another agent shows "draining" in every member's
// gossip view, not only in the state; `eligibility --enable` (or `drain
// --disable`) asked of a third agent makes it ready again for good, and it
// takes work; --disable keeps new work off a node and shows so.
func TestClusterDrainUndrainAndEligibility(t *testing.T) {
	dc := startCluster(t, 3, func(i int, c *Config) { c.MaxRanksPerNode = 1 })
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	c1, c3 := client(t, dc.Agents[0]), client(t, dc.Agents[2])
	target := dc.Agents[1].Name()
	if _, err := c1.DrainNode(ctx, &pb.DrainNodeRequest{NodeId: target, Reason: "by hand"}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, ctx, c3, target, "draining")

	resp, err := c3.NodeEligibility(ctx, &pb.NodeEligibilityRequest{NodeId: target, Eligible: true})
	if err != nil {
		t.Fatal(err)
	}
	if resp.NodeName != target {
		t.Fatalf("reply names %q, want %q", resp.NodeName, target)
	}
	waitStatus(t, ctx, c1, target, "ready")
	// It stays ready and takes work: a 3-rank job needs all three nodes.
	sub, err := c1.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "name: all\nranks: 3\nexec: {command: [sh, -c, 'echo rank $RANK']}\n")})
	if err != nil {
		t.Fatal(err)
	}
	final := waitJob(t, c1, sub.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	on := map[string]bool{}
	for _, al := range final.Allocations {
		on[al.NodeName] = true
	}
	if !on[target] {
		t.Fatalf("no rank ran on the undrained node %s: %v", target, on)
	}
	if st, _ := nodeStatus(ctx, c1, target); st != "ready" {
		t.Fatalf("%s is %q after the job, want ready", target, st)
	}

	// --disable --self on the third agent.
	self := dc.Agents[2].Name()
	if _, err := c3.NodeEligibility(ctx, &pb.NodeEligibilityRequest{Self: true, Eligible: false}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, ctx, c1, self, "ready,ineligible")
	if _, err := c1.NodeEligibility(ctx, &pb.NodeEligibilityRequest{NodeId: self, Eligible: true}); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, ctx, c1, self, "ready")
	if _, err := c1.NodeEligibility(ctx, &pb.NodeEligibilityRequest{NodeId: "no-such-node", Eligible: true}); err == nil {
		t.Fatal("an unknown node: no error")
	}
}
