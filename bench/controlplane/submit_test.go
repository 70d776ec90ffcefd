package controlplane

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// BenchmarkSubmitThroughFollower: three agent processes; clients submit jobs
// to a follower, which forwards them to the leader; every OK is a committed
// Raft entry. The jobs ask for a GPU, which these nodes lack, so they stay
// pending and no task runs: the figure is the commit path alone.
func BenchmarkSubmitThroughFollower(b *testing.B) {
	_, clients := startCluster(b)
	var follower pb.ControlClient
	poll.Until(b, 60*time.Second, func() error {
		for _, c := range clients {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			info, err := c.AgentInfo(ctx, &pb.AgentInfoRequest{})
			cancel()
			if err != nil || info.LeaderId == "" {
				return fmt.Errorf("no leader yet")
			}
			if info.Role == "voter" {
				follower = c
			}
		}
		if follower == nil {
			return fmt.Errorf("no follower yet")
		}
		return nil
	})
	spec := &pb.JobSpec{Name: "bench", Type: "exec", Ranks: 1, GpusPerRank: 1, Exec: &pb.ExecSpec{Command: []string{"true"}}}
	jobspec.ApplyDefaults(spec)
	fmt.Printf("\njob submissions committed through a follower, 3 agent processes\n%-12s %-8s %-10s %-12s\n", "concurrency", "jobs", "seconds", "jobs/s")
	for _, conc := range []int{1, 16, 64} {
		n := 500
		if conc > 1 {
			n = 4000
		}
		var next atomic.Int64
		var wg sync.WaitGroup
		var failed atomic.Int64
		start := time.Now()
		for w := 0; w < conc; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for next.Add(1) <= int64(n) {
					ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
					_, err := follower.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
					cancel()
					if err != nil {
						failed.Add(1)
					}
				}
			}()
		}
		wg.Wait()
		el := time.Since(start)
		if f := failed.Load(); f > 0 {
			b.Fatalf("%d submissions failed", f)
		}
		rate := float64(n) / el.Seconds()
		fmt.Printf("%-12d %-8d %-10.2f %-12.0f\n", conc, n, el.Seconds(), rate)
		b.ReportMetric(rate, fmt.Sprintf("jobs/s-c%d", conc))
	}
}
