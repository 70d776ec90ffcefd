package controlplane

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// BenchmarkSubmitToRunning: three agent processes; a 4-rank exec job is
// submitted through a follower; the time until the job reports all four
// ranks running (each a real process under its supervisor). p50 and p99.
func BenchmarkSubmitToRunning(b *testing.B) {
	_, clients := startCluster(b, "--max-ranks-per-node", "4")
	var follower pb.ControlClient
	poll.Until(b, 60*time.Second, func() error {
		follower = nil
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
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		defer cancel()
		nodes, err := clients[0].ListNodes(ctx, &pb.ListNodesRequest{})
		if err != nil || len(nodes.Nodes) < 3 || follower == nil {
			return fmt.Errorf("cluster not ready")
		}
		return nil
	})
	spec := &pb.JobSpec{Name: "lat", Type: "exec", Ranks: 4, Exec: &pb.ExecSpec{Command: []string{"sleep", "600"}}}
	jobspec.ApplyDefaults(spec)
	trials := trials() * 3
	var times []time.Duration
	for i := 0; i < trials; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		start := time.Now()
		resp, err := follower.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
		if err != nil {
			b.Fatal(err)
		}
		for {
			j, err := follower.GetJob(ctx, &pb.GetJobRequest{Id: resp.Id})
			if err != nil {
				b.Fatal(err)
			}
			running := 0
			for _, al := range j.Allocations {
				if al.ClientStatus == "running" {
					running++
				}
			}
			if running == 4 {
				break
			}
			if ctx.Err() != nil {
				b.Fatalf("job %s: %d of 4 ranks running after 30 s", resp.Id, running)
			}
			time.Sleep(2 * time.Millisecond)
		}
		times = append(times, time.Since(start))
		if _, err := follower.StopJob(ctx, &pb.StopJobRequest{Id: resp.Id}); err != nil {
			b.Fatal(err)
		}
		// Wait for the ranks to be gone before the next trial.
		for {
			j, err := follower.GetJob(ctx, &pb.GetJobRequest{Id: resp.Id})
			if err == nil && j.Job.Status == "stopped" {
				live := 0
				for _, al := range j.Allocations {
					if al.ClientStatus == "running" {
						live++
					}
				}
				if live == 0 {
					break
				}
			}
			if ctx.Err() != nil {
				b.Fatalf("job %s did not stop", resp.Id)
			}
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
	}
	sort.Slice(times, func(i, j int) bool { return times[i] < times[j] })
	p := func(q float64) time.Duration { return times[int(q*float64(len(times)-1))] }
	fmt.Printf("\nsubmit through a follower -> all 4 ranks running (exec, 3 agent processes), %d trials\n", len(times))
	fmt.Printf("%-10s %-10s %-10s %-10s\n", "min", "p50", "p99", "max")
	fmt.Printf("%-10v %-10v %-10v %-10v\n", times[0].Round(time.Millisecond), p(0.5).Round(time.Millisecond), p(0.99).Round(time.Millisecond), times[len(times)-1].Round(time.Millisecond))
	b.ReportMetric(float64(p(0.5).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(p(0.99).Microseconds())/1000, "p99-ms")
}
