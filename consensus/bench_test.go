package consensus

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// benchConfig uses the production timeouts (DefaultConfig) on loopback,
// with the data dir on the test's disk, and quiet logs.
func benchConfig(c *Config) {
	d := DefaultConfig()
	c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout = d.HeartbeatTimeout, d.ElectionTimeout, d.LeaderLeaseTimeout
	c.Logger = hclog.NewNullLogger()
}

// submitRetry registers a job, retrying on the current leader while
// leadership moves (as a client would); it gives up after 10 s.
func submitRetry(tc *TestCluster, s *Server, spec *controlpb.JobSpec) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, _, err := s.RegisterJob(context.Background(), spec)
		if err == nil || time.Now().After(deadline) || !(errors.Is(err, ErrNotLeader) || errors.Is(err, ErrLeadershipLost)) {
			return err
		}
		time.Sleep(5 * time.Millisecond)
		if l := tc.Leader(); l != nil {
			s = l
		}
	}
}

func benchSubmit(b *testing.B, tc *TestCluster, s *Server, workers, total int) time.Duration {
	var next atomic.Int64
	var wg sync.WaitGroup
	spec := &controlpb.JobSpec{Name: "bench", Type: "exec", Ranks: 1, Exec: &controlpb.ExecSpec{Command: []string{"true"}}}
	start := time.Now()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for next.Add(1) <= int64(total) {
				if err := submitRetry(tc, s, spec); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	return time.Since(start)
}

// BenchmarkRegisterJob measures job submissions committed per second
// through Raft with the disk log (raft-wal, fsync per batch), from 1 and
// from 64 concurrent submitters, on a 1-server and a 3-server cluster.
func BenchmarkRegisterJob(b *testing.B) {
	for _, servers := range []int{1, 3} {
		for _, workers := range []int{1, 64} {
			b.Run(fmt.Sprintf("servers=%d/goroutines=%d", servers, workers), func(b *testing.B) {
				tc := MakeTestCluster(b, servers, func(c *Config) {
					benchConfig(c)
					if servers == 1 {
						c.BootstrapExpect, c.MaxVoters = 1, 1
					}
				})
				l := tc.WaitForLeader(10 * time.Second)
				l.pauseScheduler(true) // measure the write path only
				b.ResetTimer()
				d := benchSubmit(b, tc, l, workers, b.N)
				b.ReportMetric(float64(b.N)/d.Seconds(), "jobs/s")
			})
		}
	}
}

// BenchmarkPlacements: 1,000 simulated client nodes, 10,000 single-rank
// jobs submitted in a burst; every placement committed through Raft. It
// reports the placement rate alone (jobs queued while the scheduler is
// paused, then released) and end to end (scheduler running during the
// burst, from the first submission to the last job running).
func BenchmarkPlacements(b *testing.B) {
	const nodes, jobs = 1000, 10000
	for _, mode := range []string{"placement-only", "end-to-end"} {
		b.Run(mode, func(b *testing.B) {
			for i := 0; i < b.N; i++ {
				tc := NewTestCluster(b, func(c *Config) {
					benchConfig(c)
					c.BootstrapExpect, c.MaxVoters, c.Standbys = 1, 1, 0
				})
				tc.Start("srv", func(m *Member) { m.Ineligible = true })
				view := tc.Views["srv"]
				for n := 0; n < nodes; n++ {
					id := fmt.Sprintf("c%04d", n)
					view.Set(Member{ID: id, Name: id, RPCAddr: "10.0.0.1:7947", State: MemberAlive, Lifecycle: LifecycleOnDemand,
						AZ: fmt.Sprintf("az-%d", n%3), Node: &controlpb.Node{Id: id, Name: id, RpcAddr: "10.0.0.1:7947", MaxRanks: 16}})
				}
				tc.AnnounceAll("srv")
				s := tc.WaitForLeader(10 * time.Second)
				poll.Until(b, 30*time.Second, func() (bool, string) { return len(s.State().Nodes()) == nodes+1, "nodes not reconciled" })
				b.ResetTimer()
				var start time.Time
				if mode == "placement-only" {
					s.pauseScheduler(true)
					d := benchSubmit(b, tc, s, 64, jobs)
					b.ReportMetric(float64(jobs)/d.Seconds(), "submits/s")
					start = time.Now()
					s.pauseScheduler(false)
				} else {
					start = time.Now()
					benchSubmit(b, tc, s, 64, jobs)
				}
				poll.Until(b, 120*time.Second, func() (bool, string) {
					n := 0
					for _, j := range s.State().Jobs() {
						if j.Status == JobRunning {
							n++
						}
					}
					return n == jobs, fmt.Sprintf("%d of %d running", n, jobs)
				})
				d := time.Since(start)
				b.StopTimer()
				allocs := 0
				for _, j := range s.State().Jobs() {
					allocs += len(s.State().Allocations(j.Id))
				}
				if allocs != jobs {
					b.Fatalf("%d allocations for %d single-rank jobs", allocs, jobs)
				}
				b.ReportMetric(float64(s.raft.LastIndex()), "log-entries")
				b.ReportMetric(float64(jobs)/d.Seconds(), "placements/s")
				tc.ShutdownAll()
			}
		})
	}
}

// BenchmarkLeaderFailover: 3 servers with the default (production)
// timeouts; the leader is shut down (its transport closed, gossip marks it
// dead) and the time until another server leads and commits a write is
// measured, over 25 trials per iteration. Reports median and max.
func BenchmarkLeaderFailover(b *testing.B) {
	const trials = 25
	for i := 0; i < b.N; i++ {
		var elect, write []time.Duration
		for k := 0; k < trials; k++ {
			tc := MakeTestCluster(b, 3, benchConfig)
			l := tc.WaitForLeader(10 * time.Second)
			waitAllVoters(b, tc)
			old := l.cfg.NodeID
			start := time.Now()
			tc.Stop(old, true)
			var nl *Server
			for {
				if nl = tc.Leader(); nl != nil && nl.cfg.NodeID != old {
					break
				}
				time.Sleep(time.Millisecond)
			}
			elect = append(elect, time.Since(start))
			if _, _, err := nl.RegisterJob(context.Background(), &controlpb.JobSpec{Name: "after", Ranks: 1}); err != nil {
				b.Fatal(err)
			}
			write = append(write, time.Since(start))
			tc.ShutdownAll()
		}
		med := func(d []time.Duration) (time.Duration, time.Duration) {
			sort.Slice(d, func(i, j int) bool { return d[i] < d[j] })
			return d[len(d)/2], d[len(d)-1]
		}
		em, ex := med(elect)
		wm, wx := med(write)
		b.ReportMetric(float64(em.Milliseconds()), "elect-median-ms")
		b.ReportMetric(float64(ex.Milliseconds()), "elect-max-ms")
		b.ReportMetric(float64(wm.Milliseconds()), "write-median-ms")
		b.ReportMetric(float64(wx.Milliseconds()), "write-max-ms")
	}
}

func waitAllVoters(b testing.TB, tc *TestCluster) {
	poll.Until(b, 10*time.Second, func() (bool, string) {
		for _, s := range tc.Live() {
			if r := s.Role(); r != RoleVoter && r != RoleLeader {
				return false, s.cfg.NodeID + " is " + r
			}
		}
		return true, ""
	})
}

// BenchmarkDeadVoterReplacement: 5 servers (3 voters, 2 standbys) with
// the default timeouts and DeadServerCleanup; a voter is shut down and
// marked dead in gossip; measured: time until the leader's configuration
// has 3 voters again without it. 5 trials per iteration.
func BenchmarkDeadVoterReplacement(b *testing.B) {
	for i := 0; i < b.N; i++ {
		var ds []time.Duration
		for k := 0; k < 5; k++ {
			tc := MakeTestCluster(b, 5, func(c *Config) {
				d := DefaultConfig()
				c.DeadServerCleanup, c.ServerStabilization = d.DeadServerCleanup, d.ServerStabilization
				c.LastContactThreshold, c.ReconcileInterval = d.LastContactThreshold, d.ReconcileInterval
				benchConfig(c)
			})
			var victim string
			poll.Until(b, 20*time.Second, func() (bool, string) {
				l := tc.Leader()
				if l == nil {
					return false, "no leader"
				}
				v, nv := voters(RaftConfig(l))
				for _, id := range v {
					if id != l.cfg.NodeID {
						victim = id
					}
				}
				return len(v) == 3 && len(nv) == 2, "not 3 voters + 2 standbys"
			})
			start := time.Now()
			tc.Stop(victim, true)
			poll.Until(b, 20*time.Second, func() (bool, string) {
				l := tc.Leader()
				if l == nil {
					return false, "no leader"
				}
				cfg := RaftConfig(l)
				v, _ := voters(cfg)
				_, still := cfg[victim]
				return len(v) == 3 && !still, "not replaced"
			})
			ds = append(ds, time.Since(start))
			tc.ShutdownAll()
		}
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		b.ReportMetric(float64(ds[len(ds)/2].Milliseconds()), "median-ms")
		b.ReportMetric(float64(ds[len(ds)-1].Milliseconds()), "max-ms")
	}
}
