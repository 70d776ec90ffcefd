//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/netemu"
	"github.com/gpumesh/gpumesh/internal/poll"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// netCluster starts n agents, each in its own namespace.
func netCluster(t *testing.T, n int, args ...string) (*topology, *cluster) {
	tp := newTopology(t, n)
	c := newCluster(t, clusterOpts{n: n, ips: tp.ips, netns: tp.nodes, dial: tp.dialer, extraArgs: args})
	return tp, c
}

// submitTimed submits n exec jobs with ids prefix-0..n-1 to a and returns
// the acknowledged ids, the errors of the others, and how long each
// acknowledged submission took (the client runs in a's namespace: no emulated link
// between them).
func submitTimed(a *agent, prefix string, n int, timeout time.Duration) (acked []string, errs []error, took []time.Duration) {
	for i := 0; i < n; i++ {
		id := fmt.Sprintf("%s-%03d", prefix, i)
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		start := time.Now()
		_, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: execSpec(prefix)})
		d := time.Since(start)
		cancel()
		if err == nil {
			acked = append(acked, id)
			took = append(took, d)
		} else {
			errs = append(errs, fmt.Errorf("%s via %s: %w", id, a.Name, err))
		}
	}
	return acked, errs, took
}

// checkVoters asks a for the Raft configuration and says whether it has
// want voters.
func checkVoters(a *agent, want int) error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	p, err := a.Client().RaftPeers(ctx, &pb.RaftPeersRequest{})
	if err != nil {
		return err
	}
	voters := 0
	for _, peer := range p.Peers {
		if peer.Suffrage == "voter" {
			voters++
		}
	}
	if voters != want {
		return fmt.Errorf("%d voters, want %d: %v", voters, want, p.Peers)
	}
	return nil
}

// The partition test: five agents (five voters) in their own
// namespaces; the leader and one more are cut off from the other three.
// The minority cannot commit, the majority elects a leader and keeps
// scheduling, and after healing every replica converges on one table that
// holds every job the majority accepted and none the minority refused.
func TestPartitionMinorityCannotCommit(t *testing.T) {
	start := time.Now()
	tp, c := netCluster(t, 5, partitionArgs...)
	partitionScenario(t, tp, c, start, "partition", map[string]any{"network": "veth pairs on bridges, no delay"})
}

// delayCases is GPUMESH_DELAY_CASES: which of the emulated-network cases
// run ("delayed", "no-delay", or "all", the default).
func delayCases() string {
	if v := os.Getenv("GPUMESH_DELAY_CASES"); v != "all" {
		return v
	}
	return ""
}

var partitionArgs = []string{"--bootstrap-expect", "5", "--max-voters", "5", "--standbys", "0"}

// The partition test again, with every namespace joined through the
// userspace link emulator (TUN devices): once with no delay (the
// baseline) and once with 20-50 ms one way on every link (35 ms ± 15 ms,
// uniform, order kept), so round trips are 40-100 ms while Raft's
// heartbeat timeout is 200 ms. The same assertions hold; the figures
// compare election and submission times.
//
//	GPUMESH_DELAY_CASES=delayed    only the delayed case (scripts/reliability.sh's bounded run)
func TestPartitionDelayed(t *testing.T) {
	cases := []struct {
		name   string
		link   netemu.LinkConfig
		figure string
	}{
		{"no-delay", netemu.LinkConfig{QueueLen: 4096}, "no delay (emulator forwarding only)"},
		{"delayed", netemu.LinkConfig{Delay: 35 * time.Millisecond, Jitter: 15 * time.Millisecond, QueueLen: 4096}, "20-50 ms one way (35 ± 15 ms uniform), every link"},
	}
	only := delayCases()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if only != "" && !strings.Contains(only, tc.name) {
				t.Skipf("GPUMESH_DELAY_CASES=%s", only)
			}
			start := time.Now()
			tp := newEmuTopology(t, 5, tc.link, seed(t)+uint64(i))
			c := newCluster(t, clusterOpts{n: 5, ips: tp.ips, netns: tp.nodes, dial: tp.dialer, extraArgs: partitionArgs})
			subs := partitionScenario(t, tp, c, start, "partition-"+tc.name, map[string]any{
				"network":  "userspace link emulator (TUN), " + tc.figure,
				"delay_ms": tc.link.Delay.Milliseconds(), "jitter_ms": tc.link.Jitter.Milliseconds(),
			})
			st := tp.emu.Stats().Total()
			mean := time.Duration(0)
			if n := st.Delivered; n > 0 {
				mean = st.DelaySum / time.Duration(n)
			}
			t.Logf("emulator: %d packets delivered (mean delay %s, max %s), %d cut by the partition, %d lost, %d overflow",
				st.Delivered, mean.Round(100*time.Microsecond), st.DelayMax.Round(100*time.Microsecond), st.Cut, st.Lost, st.Overflow)
			if tc.link.Delay > 0 && mean < tc.link.Delay-tc.link.Jitter {
				t.Errorf("mean emulated delay %s below the configured minimum %s: the links were not delayed", mean, tc.link.Delay-tc.link.Jitter)
			}
			// A commit needs a round trip to a quorum: no acknowledged
			// submission to the leader can be faster than the shortest
			// emulated round trip.
			for _, d := range subs {
				if rtt := 2 * (tc.link.Delay - tc.link.Jitter); d < rtt {
					t.Errorf("a submission to the leader was acknowledged in %s, under the minimum round trip %s: it did not wait for a quorum", d, rtt)
				}
			}
		})
	}
}

// partitionScenario is the partition test on a started 5-agent cluster;
// start is when the cluster began starting. It records the figures under
// name, with extra fields.
func partitionScenario(t *testing.T, tp *topology, c *cluster, start time.Time, name string, extra map[string]any) (leaderSubmits []time.Duration) {
	lead := c.waitLeader(90*time.Second, nil)
	firstLeader := time.Since(start)
	poll.Until(t, 60*time.Second, func() error { return checkVoters(lead, 5) })
	before, errs, beforeTook := submitTimed(lead, "before", 5, 10*time.Second)
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
	t.Logf("partition: minority %s+%s, majority %s %s %s", minority[0].Name, minority[1].Name, majority[0].Name, majority[1].Name, majority[2].Name)

	newLead := c.waitLeader(60*time.Second, majority)
	election := time.Since(cut)
	poll.Until(t, 30*time.Second, func() error {
		for _, a := range minority {
			if info, err := a.info(context.Background()); err == nil && info.Role == "leader" {
				return fmt.Errorf("%s (cut off from the majority) still says it leads", a.Name)
			}
		}
		return nil
	})
	stepDown := time.Since(cut)

	// The minority cannot commit: every submission fails, none succeeds.
	// The submissions go at once (each with its own 4 s deadline): a
	// refused one usually takes the whole deadline.
	var minorityTried []string
	type outcome struct {
		id  string
		err error
	}
	outs := make(chan outcome, 3*len(minority))
	for k, a := range minority {
		for i := 0; i < 3; i++ {
			id := fmt.Sprintf("minority%d-%03d", k, i)
			minorityTried = append(minorityTried, id)
			go func(a *agent, id, prefix string) {
				ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
				defer cancel()
				_, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: execSpec(prefix)})
				if err != nil {
					err = fmt.Errorf("%s via %s: %w", id, a.Name, err)
				}
				outs <- outcome{id, err}
			}(a, id, fmt.Sprintf("minority%d", k))
		}
	}
	minorityErrs := 0
	for range minorityTried {
		o := <-outs
		if o.err == nil {
			t.Errorf("the minority side acknowledged %s: a cut-off minority must not commit", o.id)
			continue
		}
		if minorityErrs == 0 {
			t.Logf("minority refusal, e.g.: %v", o.err)
		}
		minorityErrs++
	}

	// The majority keeps accepting and scheduling.
	var during []string
	var viaLeader, viaFollower []time.Duration
	for k, a := range majority {
		ok, errs, took := submitTimed(a, fmt.Sprintf("majority%d", k), 4, 20*time.Second)
		if len(errs) > 0 {
			t.Errorf("the majority refused submissions: %v", errs)
		}
		during = append(during, ok...)
		if a == newLead {
			viaLeader = append(viaLeader, took...)
		} else {
			viaFollower = append(viaFollower, took...)
		}
	}
	scheduled := time.Now()
	poll.Until(t, 90*time.Second, func() error {
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
	poll.Until(t, 90*time.Second, func() error {
		for _, a := range c.agents {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			ms, err := a.Client().Members(ctx, &pb.MembersRequest{})
			cancel()
			if err != nil {
				return fmt.Errorf("%s: %v", a.Name, err)
			}
			alive := 0
			for _, m := range ms.Members {
				if m.State == "alive" {
					alive++
				}
			}
			if alive != len(c.agents) {
				return fmt.Errorf("after healing, %s's gossip view has %d of %d members alive: the sides of the partition did not merge", a.Name, alive, len(c.agents))
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
	poll.Until(t, 120*time.Second, func() error {
		l, err := c.leader(context.Background(), nil)
		if err != nil {
			return err
		}
		if err := checkVoters(l, 5); err != nil {
			return fmt.Errorf("after healing: %w", err)
		}
		return nil
	})
	votersBack := time.Since(rejoin) + converge
	fields := map[string]any{
		"first_leader_after_start_s":     firstLeader.Seconds(),
		"submit_to_leader_before_cut_ms": durStats(beforeTook), "submit_to_majority_leader_ms": durStats(viaLeader), "submit_via_majority_follower_ms": durStats(viaFollower),
		"agents": 5, "voters": 5, "minority": 2, "minority_included_leader": true,
		"majority_new_leader_s": election.Seconds(), "old_leader_stepped_down_s": stepDown.Seconds(),
		"minority_submissions": len(minorityTried), "minority_refused": minorityErrs,
		"majority_acknowledged": len(during) + len(before), "majority_jobs_completed_during_partition_s": scheduleTime.Seconds(),
		"gossip_merged_after_heal_s": gossipMerged.Seconds(), "converged_after_heal_s": converge.Seconds(), "five_voters_after_heal_s": votersBack.Seconds(),
		"final_jobs": len(jobs), "test_s": time.Since(start).Seconds(),
	}
	for k, v := range extra {
		fields[k] = v
	}
	record(t, name, fields)
	return append(beforeTook, viaLeader...)
}
