//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"io"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/netemu"
	"github.com/gpumesh/gpumesh/internal/poll"
)

func allReduceSpec(name string, iters int32, sizes ...string) *pb.JobSpec {
	return &pb.JobSpec{
		Name: name, Type: "allreduce", Ranks: 3, Placement: "spread",
		Restart:   &pb.RestartPolicy{Attempts: 3, Delay: durationpb.New(500 * time.Millisecond)},
		Allreduce: &pb.AllReduceSpec{Sizes: sizes, Dtype: "float32", Iters: iters, Device: "cpu"},
	}
}

// getJob reads a job from the leader.
func getJob(c *cluster, id string) (*pb.GetJobResponse, error) {
	l, err := c.leader(context.Background(), nil)
	if err != nil {
		return nil, err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return l.Client().GetJob(ctx, &pb.GetJobRequest{Id: id})
}

// waitNodes waits until a's Control API lists n registered nodes.
func waitNodes(t *testing.T, a *agent, n int) {
	t.Helper()
	poll.Until(t, 60*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		r, err := a.Client().ListNodes(ctx, &pb.ListNodesRequest{})
		if err != nil {
			return err
		}
		if len(r.Nodes) != n {
			return fmt.Errorf("%d nodes registered, want %d", len(r.Nodes), n)
		}
		return nil
	})
}

// runJob submits spec as job id through a and waits up to timeout for the
// job to complete or fail. It returns the job and the time from submission.
func runJob(t *testing.T, c *cluster, a *agent, id string, spec *pb.JobSpec, timeout time.Duration) (*pb.GetJobResponse, time.Duration) {
	t.Helper()
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	_, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: spec})
	cancel()
	if err != nil {
		t.Fatal(err)
	}
	var r *pb.GetJobResponse
	poll.Until(t, timeout, func() (err error) {
		r, err = getJob(c, id)
		if err != nil {
			return err
		}
		if r.Job.Status != "complete" && r.Job.Status != "failed" {
			return fmt.Errorf("%s is %s", id, r.Job.Status)
		}
		return nil
	})
	return r, time.Since(start)
}

// checkedSizes reports every rank of r whose all-reduce result is not ok
// and returns rank 0's figures, one "size: busbw GB/s, check ..." a size.
func checkedSizes(t *testing.T, r *pb.GetJobResponse) []string {
	t.Helper()
	var rows []string
	for _, al := range r.Allocations {
		if ok := al.Result.GetFields()["ok"]; ok == nil || !ok.GetBoolValue() {
			t.Errorf("rank %d: result not ok: %v", al.Rank, al.Result)
		}
		if al.Rank == 0 {
			for _, row := range al.Result.GetFields()["sizes"].GetListValue().GetValues() {
				f := row.GetStructValue().GetFields()
				rows = append(rows, f["size"].GetStringValue()+": "+f["busbw_gbps"].GetStringValue()+" GB/s, check "+f["check"].GetStringValue())
			}
		}
	}
	return rows
}

// rankLog reads what one rank has logged so far.
func rankLog(a *agent, id string, gen uint64, rank int32) string {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	st, err := a.Client().Logs(ctx, &pb.LogsRequest{JobId: id, Generation: gen, Rank: rank})
	if err != nil {
		return ""
	}
	var b strings.Builder
	for {
		ch, err := st.Recv()
		if err == io.EOF || err != nil {
			break
		}
		b.Write(ch.Data)
	}
	return b.String()
}

// The collective fault: the agent of one rank is SIGKILLed in the
// middle of an all-reduce. Every other rank errors within the collective
// timeout, the job is placed again (generation 2) on the agents that are
// left, and that generation completes with a checked result.
func TestAllReduceRankKilled(t *testing.T) {
	const timeout = 3 * time.Second
	c := newCluster(t, clusterOpts{n: 4, extraArgs: []string{"--bootstrap-expect", "3", "--max-ranks-per-node", "1", "--collective-timeout", timeout.String()}})
	lead := c.waitLeader(60*time.Second, nil)
	waitNodes(t, lead, 4)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	const id = "ar-kill"
	if _, err := lead.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: allReduceSpec("ar-kill", 4000, "1MiB")}); err != nil {
		t.Fatal(err)
	}
	// Wait until every rank of generation 1 is inside the all-reduce.
	var gen1 []*pb.Allocation
	poll.Until(t, 60*time.Second, func() error {
		r, err := getJob(c, id)
		if err != nil {
			return err
		}
		gen1 = nil
		for _, al := range r.Allocations {
			if al.Generation == 1 {
				gen1 = append(gen1, al)
			}
		}
		if len(gen1) != 3 {
			return fmt.Errorf("%d ranks of generation 1 placed", len(gen1))
		}
		for _, al := range gen1 {
			if al.ClientStatus != "running" {
				return fmt.Errorf("rank %d is %q", al.Rank, al.ClientStatus)
			}
			if !strings.Contains(rankLog(lead, id, 1, al.Rank), "all-reduce starting") {
				return fmt.Errorf("rank %d has not started its all-reduce", al.Rank)
			}
		}
		return nil
	})
	// Kill the agent of a rank that does not lead (so that this measures
	// the data plane, not a Raft failover).
	var victim *agent
	var victimRank int32
	for _, al := range gen1 {
		for _, a := range c.agents {
			if a.Name == al.NodeName && a != lead && victim == nil {
				victim, victimRank = a, al.Rank
			}
		}
	}
	if victim == nil {
		t.Fatal("every rank runs on the leader's node?")
	}
	victim.Kill()
	killed := time.Now()

	// Every other rank of generation 1 fails, within the collective timeout.
	var detect []time.Duration
	poll.Until(t, 60*time.Second, func() error {
		r, err := getJob(c, id)
		if err != nil {
			return err
		}
		detect = nil
		for _, al := range r.Allocations {
			if al.Generation != 1 || al.Rank == victimRank {
				continue
			}
			if al.ClientStatus != "failed" && al.ClientStatus != "stopped" {
				return fmt.Errorf("surviving rank %d of generation 1 is %q", al.Rank, al.ClientStatus)
			}
			if al.FinishTime == nil {
				return fmt.Errorf("rank %d failed without a finish time", al.Rank)
			}
			detect = append(detect, al.FinishTime.AsTime().Sub(killed))
		}
		return nil
	})
	for i, d := range detect {
		// The rank's clock and ours are one machine's; the finish time is
		// stamped when the runner sees the error.
		if d > timeout+2*time.Second {
			t.Errorf("a surviving rank took %s after the kill to fail (collective timeout %s)", d, timeout)
		}
		_ = i
	}
	// The job is placed again and completes with a checked result.
	var final *pb.GetJobResponse
	poll.Until(t, 120*time.Second, func() error {
		r, err := getJob(c, id)
		if err != nil {
			return err
		}
		final = r
		if r.Job.Status == "failed" {
			return fmt.Errorf("STOP: job failed: %s", r.Job.StatusReason)
		}
		if r.Job.Status != "complete" {
			return fmt.Errorf("job is %s at generation %d (%s)", r.Job.Status, r.Job.Generation, r.Job.StatusReason)
		}
		return nil
	})
	if final.Job.Generation < 2 {
		t.Errorf("job completed at generation %d, want >= 2 (placed again after the kill)", final.Job.Generation)
	}
	// The kill was a node loss, not the job's failure, although the
	// survivors failed before gossip said the node was dead: it uses no
	// restart attempt.
	if final.Job.Restarts != 0 {
		t.Errorf("the node loss used %d restart attempts (%s); a node loss must not count", final.Job.Restarts, final.Job.EndCause)
	}
	recovered := time.Since(killed)
	for _, al := range final.Allocations {
		if al.Generation != final.Job.Generation {
			continue
		}
		if al.NodeName == victim.Name {
			t.Errorf("generation %d placed rank %d on the killed agent %s", al.Generation, al.Rank, victim.Name)
		}
		if ok := al.Result.GetFields()["ok"]; ok == nil || !ok.GetBoolValue() {
			t.Errorf("rank %d of generation %d: result not ok: %v", al.Rank, al.Generation, al.Result)
		}
	}
	for k, n := range c.rankStarts(id) {
		if n != 1 {
			t.Errorf("%s was started %d times by the runners (want once)", k, n)
		}
	}
	var msgs []string
	for _, al := range final.Allocations {
		if al.Generation == 1 && al.Rank != victimRank {
			msgs = append(msgs, al.Message)
		}
	}
	t.Logf("surviving ranks' errors: %q", msgs)
	record(t, "allreduce-rank-killed", map[string]any{
		"agents": 4, "ranks": 3, "collective_timeout_s": timeout.Seconds(), "killed_rank": victimRank,
		"survivors_failed_after": durStats(detect), "final_generation": final.Job.Generation,
		"kill_to_complete_s": recovered.Seconds(), "survivor_errors": msgs,
	})
}

// The lossy link: with 1% of the packets of every agent dropped,
// a 3-rank all-reduce still completes and every rank's result checks.
func TestAllReduceUnderPacketLoss(t *testing.T) {
	tp, c := netCluster(t, 3, "--bootstrap-expect", "3", "--max-ranks-per-node", "1", "--collective-timeout", "30s")
	lead := c.waitLeader(90*time.Second, nil)
	how := ""
	for i := range tp.nodes {
		how = tp.loss(i, 1)
	}
	const id = "ar-loss"
	r, took := runJob(t, c, lead, id, allReduceSpec(id, 20, "1MiB", "16MiB"), 240*time.Second)
	if r.Job.Status != "complete" || r.Job.Generation != 1 {
		t.Fatalf("all-reduce under 1%% loss: %s at generation %d (%s)", r.Job.Status, r.Job.Generation, r.Job.StatusReason)
	}
	busbw := checkedSizes(t, r)
	record(t, "allreduce-packet-loss", map[string]any{
		"agents": 3, "ranks": 3, "loss_pct_every_agent": 1, "loss_by": how, "sizes": "1MiB, 16MiB x 20 iters, float32, cpu",
		"job_s": took.Seconds(), "generation": r.Job.Generation, "rank0_busbw": busbw,
	})
}

// A 3-rank all-reduce across links delayed 20-50 ms one way (the link
// emulator) completes at generation 1 with every rank's result checked;
// the no-delay case through the same emulator is the baseline.
func TestAllReduceDelayed(t *testing.T) {
	cases := []struct {
		name string
		link netemu.LinkConfig
	}{
		{"no-delay", netemu.LinkConfig{QueueLen: 4096}},
		{"delayed", netemu.LinkConfig{Delay: 35 * time.Millisecond, Jitter: 15 * time.Millisecond, QueueLen: 4096}},
	}
	only := delayCases()
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if only != "" && !strings.Contains(only, tc.name) {
				t.Skipf("GPUMESH_DELAY_CASES=%s", only)
			}
			tp := newEmuTopology(t, 3, tc.link, seed(t)+uint64(i))
			c := newCluster(t, clusterOpts{n: 3, ips: tp.ips, netns: tp.nodes, dial: tp.dialer,
				extraArgs: []string{"--bootstrap-expect", "3", "--max-ranks-per-node", "1", "--collective-timeout", "30s"}})
			lead := c.waitLeader(90*time.Second, nil)
			waitNodes(t, lead, 3)
			id := "ar-" + tc.name
			r, took := runJob(t, c, lead, id, allReduceSpec(id, 10, "64KiB", "1MiB", "4MiB"), 240*time.Second)
			if r.Job.Status != "complete" || r.Job.Generation != 1 {
				t.Fatalf("all-reduce over %s links: %s at generation %d (%s)", tc.name, r.Job.Status, r.Job.Generation, r.Job.StatusReason)
			}
			rows := checkedSizes(t, r)
			st := tp.emu.Stats().Total()
			if tc.link.Delay > 0 && st.DelaySum/time.Duration(max(st.Delivered, 1)) < tc.link.Delay-tc.link.Jitter {
				t.Errorf("mean emulated delay %s below %s: the links were not delayed", st.DelaySum/time.Duration(max(st.Delivered, 1)), tc.link.Delay-tc.link.Jitter)
			}
			record(t, "allreduce-"+tc.name, map[string]any{
				"agents": 3, "ranks": 3, "delay_ms": tc.link.Delay.Milliseconds(), "jitter_ms": tc.link.Jitter.Milliseconds(),
				"sizes": "64KiB, 1MiB, 4MiB x 10 iters, float32, cpu", "submit_to_complete_s": took.Seconds(), "generation": r.Job.Generation,
				"rank0": rows, "emulator_packets": st.Delivered, "emulator_overflow": st.Overflow, "emulator_max_delay_ms": st.DelayMax.Milliseconds(),
			})
		})
	}
}
