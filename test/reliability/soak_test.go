//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// strayProcesses lists processes (other than the agents) whose command
// line names dir: task supervisors and their tasks.
func strayProcesses(dir string, agents []*agent) []string {
	skip := map[string]bool{}
	for _, a := range agents {
		if p := a.pid(); p > 0 {
			skip[fmt.Sprint(p)] = true
		}
	}
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		if skip[e.Name()] || e.Name()[0] < '0' || e.Name()[0] > '9' {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		cmd := strings.ReplaceAll(string(b), "\x00", " ")
		if strings.Contains(cmd, dir) {
			out = append(out, e.Name()+": "+cmd)
		}
	}
	return out
}

type gauges struct {
	goroutines, fds, rssMiB, heapMiB float64
}

func (c *cluster) sample(t *testing.T) []gauges {
	t.Helper()
	var out []gauges
	for _, a := range c.agents {
		m, err := a.metrics(context.Background())
		if err != nil {
			t.Fatalf("%s /metrics: %v", a.name, err)
		}
		out = append(out, gauges{m["go_goroutines"], m["process_open_fds"], m["process_resident_memory_bytes"] / (1 << 20), m["go_memstats_heap_inuse_bytes"] / (1 << 20)})
	}
	return out
}

// runJobs submits n short jobs (ids prefix-00000...) with a few concurrent
// clients to random agents and waits until all of them complete.
func runJobs(t *testing.T, c *cluster, rng *rand.Rand, prefix string, n, clients int) time.Duration {
	t.Helper()
	start := time.Now()
	var next atomic.Int64
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	seeds := make([]uint64, clients)
	for i := range seeds {
		seeds[i] = rng.Uint64()
	}
	for w := 0; w < clients; w++ {
		wg.Add(1)
		go func(r *rand.Rand) {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(n) {
					return
				}
				a := c.agents[r.IntN(len(c.agents))]
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := a.client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: fmt.Sprintf("%s-%05d", prefix, i), Spec: execSpec(prefix)})
				cancel()
				if err != nil {
					mu.Lock()
					errs = append(errs, err)
					mu.Unlock()
				}
			}
		}(rand.New(rand.NewPCG(seeds[w], 3)))
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d submissions failed in a fault-free soak, e.g. %v", len(errs), n, errs[0])
	}
	procs.Eventually(t, 20*time.Minute, func() error {
		l, err := c.leader(context.Background(), nil)
		if err != nil {
			return err
		}
		r, err := l.jobs(context.Background())
		if err != nil {
			return err
		}
		done, other := 0, map[string]int{}
		for _, j := range r.Jobs {
			if !strings.HasPrefix(j.Id, prefix+"-") {
				continue
			}
			if j.Status == "complete" {
				done++
			} else {
				other[j.Status]++
			}
		}
		if other["failed"] > 0 {
			return fmt.Errorf("%d soak jobs failed", other["failed"])
		}
		if done != n {
			return fmt.Errorf("%d of %d soak jobs complete (others: %v)", done, n, other)
		}
		return nil
	})
	return time.Since(start)
}

// settle waits until no task process is left and the agents' goroutine
// counts stop moving, and returns the last sample.
func (c *cluster) settle(t *testing.T) []gauges {
	t.Helper()
	var last []gauges
	procs.Eventually(t, 60*time.Second, func() error {
		if s := strayProcesses(c.dir, c.agents); len(s) > 0 {
			return fmt.Errorf("%d task processes still running, e.g. %s", len(s), s[0])
		}
		cur := c.sample(t)
		prev := last
		last = cur
		if prev == nil {
			return fmt.Errorf("first sample")
		}
		for i := range cur {
			if cur[i].goroutines != prev[i].goroutines {
				return fmt.Errorf("%s goroutines moving: %v → %v", c.agents[i].name, prev[i].goroutines, cur[i].goroutines)
			}
		}
		return nil
	})
	return last
}

// The soak: many short jobs through a 3-agent cluster. After a
// warm-up batch and after the whole run, goroutines and open descriptors
// are the same (flat), memory stays bounded, and no task process, file
// descriptor or port is left behind.
func TestSoak(t *testing.T) {
	total := envInt("GPUMESH_SOAK_JOBS", 1000)
	warm := total / 10
	if warm < 20 {
		warm = 20
	}
	rng := rand.New(rand.NewPCG(seed(t), 4))
	c := newCluster(t, clusterOpts{n: 3, extraArgs: []string{"--bootstrap-expect", "3"}})
	c.waitLeader(60*time.Second, nil)
	first := c.sample(t)

	lead0, _ := c.leader(context.Background(), nil)
	warmTime := runJobs(t, c, rng, "warm", warm, 4)
	base := c.settle(t)
	half := (total - warm) / 2
	midTime := runJobs(t, c, rng, "soak1", half, 4)
	mid := c.settle(t)
	endTime := runJobs(t, c, rng, "soak2", total-warm-half, 4)
	end := c.settle(t)
	lead1, _ := c.leader(context.Background(), nil)
	runTime := midTime + endTime

	sum := func(gs []gauges) (g gauges) {
		for _, x := range gs {
			g.goroutines += x.goroutines
			g.fds += x.fds
			g.rssMiB += x.rssMiB
			g.heapMiB += x.heapMiB
		}
		return g
	}
	var per []map[string]any
	for i, a := range c.agents {
		per = append(per, map[string]any{
			"agent": a.name, "goroutines": []float64{first[i].goroutines, base[i].goroutines, mid[i].goroutines, end[i].goroutines},
			"fds":      []float64{first[i].fds, base[i].fds, mid[i].fds, end[i].fds},
			"rss_mib":  []float64{first[i].rssMiB, base[i].rssMiB, mid[i].rssMiB, end[i].rssMiB},
			"heap_mib": []float64{first[i].heapMiB, base[i].heapMiB, mid[i].heapMiB, end[i].heapMiB},
		})
	}
	// A leak grows with the jobs: compare the cluster's totals after the
	// second half with those after the first half (same number of jobs,
	// every code path already warm). Leadership may move, so per-agent
	// counts are reported but the totals are compared.
	sm, se := sum(mid), sum(end)
	n2 := float64(total - warm - half)
	if se.goroutines > sm.goroutines+15 {
		t.Errorf("goroutines (3 agents) %v after %d jobs, %v after %d: a leak", se.goroutines, total, sm.goroutines, warm+half)
	}
	if se.fds > sm.fds+10 {
		t.Errorf("open descriptors (3 agents) %v after %d jobs, %v after %d: a leak (files or sockets)", se.fds, total, sm.fds, warm+half)
	}
	// The job table grows with every job (state, not a leak); more than
	// 64 KiB of resident memory per job and agent is not that.
	if limit := sm.rssMiB + 48 + 3*n2/16; se.rssMiB > limit {
		t.Errorf("resident memory (3 agents) %.0f MiB after %d jobs, %.0f MiB after %d (limit %.0f)", se.rssMiB, total, sm.rssMiB, warm+half, limit)
	}
	leaderMoved := lead0 != lead1
	// Every rank ran exactly once: no fault happened, so no allocation may
	// be started twice.
	twice := 0
	for k, n := range c.rankStarts("soak") {
		if n != 1 {
			twice++
			if twice <= 5 {
				t.Errorf("%s was started %d times by the runners (want once)", k, n)
			}
		}
	}
	stray := strayProcesses(c.dir, c.agents)
	if len(stray) > 0 {
		t.Errorf("%d processes left behind: %v", len(stray), stray)
	}
	record(t, "soak", map[string]any{
		"agents": 3, "jobs": total, "warmup_jobs": warm, "clients": 4,
		"warmup_s": warmTime.Seconds(), "run_s": runTime.Seconds(), "jobs_per_s": float64(total-warm) / runTime.Seconds(),
		"samples":           "start, after warm-up, after half, end (each after the tasks ended and goroutines settled)",
		"totals_goroutines": []float64{sum(first).goroutines, sum(base).goroutines, sm.goroutines, se.goroutines},
		"totals_fds":        []float64{sum(first).fds, sum(base).fds, sm.fds, se.fds},
		"totals_rss_mib":    []float64{sum(first).rssMiB, sum(base).rssMiB, sm.rssMiB, se.rssMiB},
		"totals_heap_mib":   []float64{sum(first).heapMiB, sum(base).heapMiB, sm.heapMiB, se.heapMiB},
		"leader_moved":      leaderMoved, "ranks_started_more_than_once": twice, "stray_processes": len(stray), "per_agent": per,
	})
}
