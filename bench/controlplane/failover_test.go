package controlplane

import (
	"context"
	"fmt"
	"os"
	"sort"
	"strconv"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

func trials() int {
	if n, err := strconv.Atoi(os.Getenv("GPUMESH_BENCH_TRIALS")); err == nil && n > 0 {
		return n
	}
	return 20
}

type agentClient struct {
	a *procs.Agent
	c pb.ControlClient
}

// leaderID asks an agent whom it follows.
func leaderID(ac agentClient) (string, string) {
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	info, err := ac.c.AgentInfo(ctx, &pb.AgentInfoRequest{})
	if err != nil {
		return "", ""
	}
	return info.LeaderId, info.Node.GetId()
}

// BenchmarkLeaderFailover: three agent processes on 127.0.0.2-4; SIGKILL
// the leader; time until a survivor is leader and the other survivor
// follows it. The killed agent is restarted between trials.
func BenchmarkLeaderFailover(b *testing.B) {
	as, clients := startCluster(b)
	var acs []agentClient
	for i, a := range as {
		acs = append(acs, agentClient{a: a, c: clients[i]})
	}
	ids := map[string]int{}
	poll.Until(b, 60*time.Second, func() error {
		for i, ac := range acs {
			_, self := leaderID(ac)
			if self == "" {
				return fmt.Errorf("%s not answering", ac.a.Name)
			}
			ids[self] = i
		}
		l, _ := leaderID(acs[0])
		if l == "" {
			return fmt.Errorf("no leader")
		}
		return nil
	})
	var times []time.Duration
	for trial := 0; trial < trials(); trial++ {
		// Everyone agrees on a leader and all three are healthy voters.
		var leader int
		poll.Until(b, 60*time.Second, func() error {
			l0, _ := leaderID(acs[0])
			for _, ac := range acs {
				l, _ := leaderID(ac)
				if l == "" || l != l0 {
					return fmt.Errorf("no agreed leader")
				}
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			defer cancel()
			peers, err := acs[0].c.RaftPeers(ctx, &pb.RaftPeersRequest{})
			if err != nil {
				return err
			}
			healthy := 0
			for _, p := range peers.Peers {
				if p.Suffrage == "voter" && p.Healthy {
					healthy++
				}
			}
			if healthy < 3 {
				return fmt.Errorf("%d healthy voters", healthy)
			}
			leader = ids[l0]
			return nil
		})
		old, _ := leaderID(acs[leader])
		start := time.Now()
		acs[leader].a.Kill()
		var elapsed time.Duration
		poll.Until(b, 30*time.Second, func() error {
			var seen string
			for i, ac := range acs {
				if i == leader {
					continue
				}
				l, _ := leaderID(ac)
				if l == "" || l == old || (seen != "" && l != seen) {
					return fmt.Errorf("no new leader yet")
				}
				seen = l
			}
			elapsed = time.Since(start)
			return nil
		})
		times = append(times, elapsed)
		b.Logf("trial %2d: new leader after %v", trial+1, elapsed.Round(time.Millisecond))
		acs[leader].a.Start()
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	med, max := times[len(times)/2], times[len(times)-1]
	fmt.Printf("\nleader failover after SIGKILL, 3 agent processes, %d trials\n", len(times))
	fmt.Printf("%-10s %-10s %-10s\n", "min", "median", "max")
	fmt.Printf("%-10v %-10v %-10v\n", times[0].Round(time.Millisecond), med.Round(time.Millisecond), max.Round(time.Millisecond))
	b.ReportMetric(float64(med.Milliseconds()), "median-ms")
	b.ReportMetric(float64(max.Milliseconds()), "max-ms")
}
