//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// netCluster starts n agents, each in its own namespace.
func netCluster(t *testing.T, n int, args ...string) (*topology, *cluster) {
	tp := newTopology(t, n)
	c := newCluster(t, clusterOpts{n: n, ips: tp.ips, netns: tp.nodes, dial: tp.dialer, extraArgs: args})
	return tp, c
}

// submitN submits n exec jobs with ids prefix-0..n-1 to a and returns the
// acknowledged ids and the errors of the others.
func submitN(a *agent, prefix string, n int, timeout time.Duration) (acked []string, errs []error) {
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("%s-%03d", prefix, i)
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		_, err := a.client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: execSpec(prefix)})
		cancel()
		if err == nil {
			acked = append(acked, id)
		} else {
			errs = append(errs, fmt.Errorf("%s via %s: %w", id, a.name, err))
		}
	}
	return acked, errs
}

// The partition test: five agents (five voters) in their own
// namespaces; the leader and one more are cut off from the other three.
// The minority cannot commit, the majority elects a leader and keeps
// scheduling, and after healing every replica converges on one table that
// holds every job the majority accepted and none the minority refused.
func TestPartitionMinorityCannotCommit(t *testing.T) {
	tp, c := netCluster(t, 5, "--bootstrap-expect", "5", "--max-voters", "5", "--standbys", "0")
	lead := c.waitLeader(90*time.Second, nil)
	procs.Eventually(t, 60*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		p, err := lead.client().RaftPeers(ctx, &pb.RaftPeersRequest{})
		if err != nil {
			return err
		}
		voters := 0
		for _, peer := range p.Peers {
			if peer.Suffrage == "voter" {
				voters++
			}
		}
		if voters != 5 {
			return fmt.Errorf("%d voters, want 5: %v", voters, p.Peers)
		}
		return nil
	})
	before, errs := submitN(lead, "before", 5, 10*time.Second)
	if len(errs) > 0 {
		t.Fatalf("submissions before the partition: %v", errs)
	}

	// The minority: the leader and the next agent.
	li := 0
	for i, a := range c.agents {
		if a == lead {
			li = i
		}
	}
	minIdx := []int{li, (li + 1) % len(c.agents)}
	var minority, majority []*agent
	for i, a := range c.agents {
		if i == minIdx[0] || i == minIdx[1] {
			minority = append(minority, a)
		} else {
			majority = append(majority, a)
		}
	}
	tp.partition(minIdx...)
	cut := time.Now()
	t.Logf("partition: minority %s+%s, majority %s %s %s", minority[0].name, minority[1].name, majority[0].name, majority[1].name, majority[2].name)

	newLead := c.waitLeader(60*time.Second, majority)
	election := time.Since(cut)
	procs.Eventually(t, 30*time.Second, func() error {
		for _, a := range minority {
			if info, err := a.info(context.Background()); err == nil && info.Role == "leader" {
				return fmt.Errorf("%s (cut off from the majority) still says it leads", a.name)
			}
		}
		return nil
	})
	stepDown := time.Since(cut)

	// The minority cannot commit: every submission fails, none succeeds.
	var minorityTried []string
	minorityErrs := 0
	for k, a := range minority {
		ok, errs := submitN(a, fmt.Sprintf("minority%d", k), 3, 4*time.Second)
		if len(ok) > 0 {
			t.Errorf("the minority side acknowledged %v: a cut-off minority must not commit", ok)
		}
		minorityErrs += len(errs)
		for i := 0; i < 3; i++ {
			minorityTried = append(minorityTried, fmt.Sprintf("minority%d-%03d", k, i))
		}
		if len(errs) > 0 {
			t.Logf("minority refusal, e.g.: %v", errs[0])
		}
	}

	// The majority keeps accepting and scheduling.
	var during []string
	for k, a := range majority {
		ok, errs := submitN(a, fmt.Sprintf("majority%d", k), 4, 20*time.Second)
		if len(errs) > 0 {
			t.Errorf("the majority refused submissions: %v", errs)
		}
		during = append(during, ok...)
	}
	scheduled := time.Now()
	procs.Eventually(t, 90*time.Second, func() error {
		r, err := newLead.jobs(context.Background())
		if err != nil {
			return err
		}
		st := map[string]string{}
		for _, j := range r.Jobs {
			st[j.Id] = j.Status
		}
		for _, id := range during {
			if st[id] != "complete" {
				return fmt.Errorf("job %s accepted by the majority is %q, not complete", id, st[id])
			}
		}
		return nil
	})
	scheduleTime := time.Since(scheduled)

	tp.heal()
	healed := time.Now()
	// Gossip merges: every agent sees all five alive again.
	procs.Eventually(t, 90*time.Second, func() error {
		for _, a := range c.agents {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			ms, err := a.client().Members(ctx, &pb.MembersRequest{})
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %v", a.name, err)
			}
			alive := 0
			for _, m := range ms.Members {
				if m.State == "alive" {
					alive++
				}
			}
			if alive != len(c.agents) {
				return fmt.Errorf("after healing, %s's gossip view has %d of %d members alive: the sides of the partition did not merge", a.name, alive, len(c.agents))
			}
		}
		return nil
	})
	gossipMerged := time.Since(healed)
	jobs := c.waitConverged(120*time.Second, nil)
	converge := time.Since(healed)
	have := map[string]int{}
	for _, j := range jobs {
		have[j.Id]++
	}
	for _, id := range append(append([]string(nil), before...), during...) {
		if have[id] != 1 {
			t.Errorf("job %s (accepted) is in the converged state %d times, want 1", id, have[id])
		}
	}
	for _, id := range minorityTried {
		if have[id] != 0 {
			t.Errorf("job %s, refused on the minority side, is in the state after healing", id)
		}
	}
	// Every agent is back in one gossip view and the voters are five again.
	rejoin := time.Now()
	procs.Eventually(t, 120*time.Second, func() error {
		l, err := c.leader(context.Background(), nil)
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		p, err := l.client().RaftPeers(ctx, &pb.RaftPeersRequest{})
		if err != nil {
			return err
		}
		voters := 0
		for _, peer := range p.Peers {
			if peer.Suffrage == "voter" {
				voters++
			}
		}
		if voters != 5 {
			return fmt.Errorf("%d voters after healing, want 5", voters)
		}
		return nil
	})
	votersBack := time.Since(rejoin) + converge
	record(t, "partition", map[string]any{
		"agents": 5, "voters": 5, "minority": 2, "minority_included_leader": true,
		"majority_new_leader_s": election.Seconds(), "old_leader_stepped_down_s": stepDown.Seconds(),
		"minority_submissions": len(minorityTried), "minority_refused": minorityErrs,
		"majority_acknowledged": len(during) + len(before), "majority_jobs_completed_during_partition_s": scheduleTime.Seconds(),
		"gossip_merged_after_heal_s": gossipMerged.Seconds(), "converged_after_heal_s": converge.Seconds(), "five_voters_after_heal_s": votersBack.Seconds(),
		"final_jobs": len(jobs),
	})
}
