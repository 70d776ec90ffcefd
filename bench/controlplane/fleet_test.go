package controlplane

import (
	"context"
	"fmt"
	"io"
	"io/fs"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/hashicorp/go-hclog"
	"google.golang.org/protobuf/proto"
)

// BenchmarkFleet1000 is the control plane under a 1,000-node fleet, in
// one process: 3 servers (consensus.TestCluster: production Raft
// timeouts, the disk log, TCP between them) see 1,000 client nodes in
// their gossip view. Each client runs what a server does for an agent's
// Watch stream and what the agent's runner does with it: wait for a
// change on one of the 3 servers (clients spread over them), build its
// node's view (its record, allocations and their jobs) and encode it as
// the stream would, and report each new allocation running with
// UpdateAllocations through the leader (the status update; membership
// itself comes from gossip, not heartbeats). Two ways of waiting, each a
// sub-benchmark, so both are measured in the same run:
//
//   - watch=index: every watcher wakes on every new state index
//     (StateStore.WaitIndex; the Watch handler before per-node views);
//   - watch=node: a watcher wakes only when its node's view changes
//     (StateStore.WaitNode), and each client also holds the service
//     router's watch (StateStore.WaitServices), which a batch-only load
//     never wakes. (Before, the router watched every allocation on every
//     index; that is left out of watch=index, which is thus a lower
//     bound of the old cost.)
//
// A submitter then runs jobs of one rank:
//
//   - paced: 100 jobs/s for 10 s; p50/p99 of `job run` = submission to
//     the rank's node seeing its allocation (when the agent would start
//     the task); process CPU and heap; Raft entries per second,
//     extrapolated to an hour (not bytes: the log preallocates its
//     segment files, so their size does not grow with it);
//   - burst: 10,000 jobs from 64 submitters; placements/s from the first
//     submission until every rank is reported running.
//
// Snapshot size and time come from the servers' own snapshot log lines
// (SnapshotInterval shortened to 2 s so that one is taken). The process
// CPU holds all 3 servers and the 1,000 watchers: it is an upper bound
// of the leader's. Run:
//
//	go test ./bench/controlplane -run '^$' -bench Fleet1000 -benchtime 1x -v
//	go test ./bench/controlplane -run '^$' -bench 'Fleet1000/watch=node' -benchtime 1x -v
func BenchmarkFleet1000(b *testing.B) {
	b.Run("watch=index", func(b *testing.B) { fleet1000(b, false) })
	b.Run("watch=node", func(b *testing.B) { fleet1000(b, true) })
}

// nodeView is what the Watch handler sends a node (node.watchEvent): its
// record, its allocations and their jobs.
func nodeView(st *consensus.StateStore, id string) *controlpb.WatchEvent {
	ev := &controlpb.WatchEvent{Snapshot: true, Index: st.Index()}
	if n := st.Node(id); n != nil {
		ev.Nodes = append(ev.Nodes, n)
	}
	seen := map[string]bool{}
	for _, a := range st.AllocationsByNode(id) {
		ev.Allocations = append(ev.Allocations, a)
		if !seen[a.JobId] {
			seen[a.JobId] = true
			if j := st.Job(a.JobId); j != nil {
				ev.Jobs = append(ev.Jobs, j)
			}
		}
	}
	return ev
}

func fleet1000(b *testing.B, perNode bool) {
	const clients = 1000
	snaps := &snapLog{}
	var dirs []string
	var dirMu sync.Mutex
	tc := consensus.MakeTestCluster(b, 3, func(c *consensus.Config) {
		d := consensus.DefaultConfig()
		c.HeartbeatTimeout, c.ElectionTimeout, c.LeaderLeaseTimeout = d.HeartbeatTimeout, d.ElectionTimeout, d.LeaderLeaseTimeout
		c.SnapshotInterval = 2 * time.Second
		c.Logger = hclog.New(&hclog.LoggerOptions{Name: c.NodeID, Level: hclog.Info, Output: snaps})
		dirMu.Lock()
		dirs = append(dirs, c.DataDir)
		dirMu.Unlock()
	})
	servers := tc.Live()
	for n := 0; n < clients; n++ {
		id := fmt.Sprintf("c%04d", n)
		tc.AddClient(&controlpb.Node{Id: id, Name: id, RpcAddr: "127.0.0.1:7947", MaxRanks: 16,
			Az: fmt.Sprintf("az-%d", n%3), Lifecycle: consensus.LifecycleOnDemand})
	}
	leader := tc.WaitForLeader(10 * time.Second)
	poll.Until(b, 60*time.Second, func() (bool, string) {
		for _, s := range servers {
			if got := len(s.State().Nodes()); got < clients+3 {
				return false, fmt.Sprintf("a server holds %d nodes, want %d", got, clients+3)
			}
		}
		return true, ""
	})

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var submitted sync.Map // job ID -> submission time
	var mu sync.Mutex
	var lat []time.Duration
	var running atomic.Int64
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	for n := 0; n < clients; n++ {
		id := fmt.Sprintf("c%04d", n)
		st := servers[n%len(servers)].State()
		wg.Add(1)
		go func() {
			defer wg.Done()
			seen := map[string]bool{}
			after := uint64(0)
			if perNode {
				// The service router's watch: never woken by batch jobs.
				wg.Add(1)
				go func() {
					defer wg.Done()
					for after := uint64(0); ; {
						idx, err := st.WaitServices(ctx, after)
						if err != nil {
							return
						}
						after = idx
					}
				}()
			}
			for {
				var err error
				if perNode {
					_, err = st.WaitNode(ctx, id, after)
				} else {
					_, err = st.WaitIndex(ctx, after)
				}
				if err != nil {
					return
				}
				ev := nodeView(st, id)
				after = ev.Index
				if _, err := proto.Marshal(ev); err != nil { // the stream's encoding
					b.Error(err)
					return
				}
				var ups []*controlpb.Allocation
				now := time.Now()
				for _, a := range ev.Allocations {
					if seen[a.Id] || a.ClientStatus != consensus.AllocPending {
						continue
					}
					seen[a.Id] = true
					if t, ok := submitted.Load(a.JobId); ok {
						mu.Lock()
						lat = append(lat, now.Sub(t.(time.Time)))
						mu.Unlock()
					}
					ups = append(ups, &controlpb.Allocation{Id: a.Id, ClientStatus: consensus.AllocRunning})
				}
				if len(ups) == 0 {
					continue
				}
				for try := 0; try < 50; try++ {
					l := tc.Leader()
					if l == nil {
						time.Sleep(20 * time.Millisecond)
						continue
					}
					if _, err := l.UpdateAllocations(ctx, ups); err == nil {
						running.Add(int64(len(ups)))
						break
					} else if ctx.Err() != nil {
						return
					}
				}
			}
		}()
	}

	spec := &controlpb.JobSpec{Name: "fleet", Type: "exec", Ranks: 1, Exec: &controlpb.ExecSpec{Command: []string{"true"}}}
	submit := func() error {
		for try := 0; ; try++ {
			l := tc.Leader()
			if l == nil {
				l = leader
			}
			id, _, err := l.RegisterJob(ctx, spec)
			if err == nil {
				submitted.Store(id, time.Now())
				return nil
			}
			if try == 50 {
				return err
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	// RegisterJob returns after the commit; the submission time is taken
	// just before the call instead, by storing it under the ID afterwards
	// minus the call's own duration.
	submitTimed := func() error {
		t0 := time.Now()
		l := tc.Leader()
		if l == nil {
			l = leader
		}
		id, _, err := l.RegisterJob(ctx, spec)
		if err != nil {
			return submit()
		}
		submitted.Store(id, t0)
		return nil
	}
	b.ResetTimer()

	// Paced phase.
	const rate, secs = 100, 10
	cpu0, wall0 := cpuTime(), time.Now()
	idx0 := leader.AppliedIndex()
	tick := time.NewTicker(time.Second / rate)
	for i := 0; i < rate*secs; i++ {
		<-tick.C
		go func() {
			if err := submitTimed(); err != nil {
				b.Error(err)
			}
		}()
	}
	tick.Stop()
	poll.Until(b, 60*time.Second, func() (bool, string) {
		return running.Load() >= rate*secs, fmt.Sprintf("%d of %d ranks reported running", running.Load(), rate*secs)
	})
	wall := time.Since(wall0)
	cpuPaced := (cpuTime() - cpu0).Seconds() / wall.Seconds()
	l := tc.Leader()
	entries := float64(l.AppliedIndex()-idx0) / wall.Seconds()
	mu.Lock()
	paced := slices.Clone(lat)
	lat = lat[:0]
	mu.Unlock()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	fmt.Printf("\n%s: 1,000 client nodes, 3 servers in one process (GOMAXPROCS %d)\n", b.Name(), runtime.GOMAXPROCS(0))
	fmt.Printf("paced %d jobs/s for %d s: job run (submit -> node sees its allocation) p50 %v p99 %v max %v; process CPU %.2f cores; heap %d MiB; Raft %.0f entries/s (%.2f M entries/h)\n",
		rate, secs, pct(paced, 50), pct(paced, 99), pct(paced, 100), cpuPaced, ms.HeapAlloc>>20,
		entries, entries*3600/1e6)

	// Burst phase.
	const burst, workers = 10000, 64
	base := running.Load()
	cpu0, wall0 = cpuTime(), time.Now()
	var next atomic.Int64
	var swg sync.WaitGroup
	for w := 0; w < workers; w++ {
		swg.Add(1)
		go func() {
			defer swg.Done()
			for next.Add(1) <= burst {
				if err := submitTimed(); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	swg.Wait()
	submitWall := time.Since(wall0)
	poll.Until(b, 120*time.Second, func() (bool, string) {
		return running.Load()-base >= burst, fmt.Sprintf("%d of %d ranks reported running", running.Load()-base, burst)
	})
	wall = time.Since(wall0)
	cpuBurst := (cpuTime() - cpu0).Seconds() / wall.Seconds()
	mu.Lock()
	bl := slices.Clone(lat)
	mu.Unlock()
	runtime.ReadMemStats(&ms)
	fmt.Printf("burst %d jobs from %d submitters: submitted in %v, all running after %v: %.0f placements/s; job run p50 %v p99 %v; process CPU %.2f cores; heap %d MiB\n",
		burst, workers, submitWall.Round(time.Millisecond), wall.Round(time.Millisecond), burst/wall.Seconds(),
		pct(bl, 50), pct(bl, 99), cpuBurst, ms.HeapAlloc>>20)
	// Wait for a snapshot that covers the burst.
	last := l.AppliedIndex() - min(l.AppliedIndex(), 8192)
	poll.Until(b, 60*time.Second, func() (bool, string) {
		return snaps.lastIndex() >= last, "no snapshot covering the burst yet"
	})
	fmt.Printf("snapshots: %s; on disk %s\n", snaps.summary(), snapSizes(dirs))
	b.ReportMetric(float64(pct(paced, 99).Milliseconds()), "paced-p99-ms")
	b.ReportMetric(burst/wall.Seconds(), "placements/s")
	b.ReportMetric(cpuPaced, "paced-cores")
}

func pct(d []time.Duration, p int) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	i := (len(s) - 1) * p / 100
	return s[i].Round(time.Millisecond)
}

func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// snapSizes lists the size of each server's newest snapshot state file.
func snapSizes(dirs []string) string {
	var out []string
	for _, d := range dirs {
		var newest string
		var size int64
		_ = filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err == nil && !e.IsDir() && e.Name() == "state.bin" && p > newest {
				if info, err := e.Info(); err == nil {
					newest, size = p, info.Size()
				}
			}
			return nil
		})
		out = append(out, fmt.Sprintf("%.1f KiB", float64(size)/1024))
	}
	return strings.Join(out, ", ")
}

// snapLog reads raft's "starting snapshot" / "snapshot complete" lines
// to time snapshots.
type snapLog struct {
	mu      sync.Mutex
	started map[string]time.Time
	took    []time.Duration
	index   uint64
}

func (s *snapLog) Write(p []byte) (int, error) {
	line := string(p)
	if !strings.Contains(line, "snapshot") {
		return len(p), nil
	}
	name := strings.Fields(line + " ? ? ?")[2]
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.started == nil {
		s.started = map[string]time.Time{}
	}
	switch {
	case strings.Contains(line, "starting snapshot up to"):
		s.started[name] = now
	case strings.Contains(line, "snapshot complete up to"):
		if t, ok := s.started[name]; ok {
			s.took = append(s.took, now.Sub(t))
			delete(s.started, name)
		}
		var idx uint64
		if i := strings.Index(line, "index="); i >= 0 {
			fmt.Sscanf(line[i+len("index="):], "%d", &idx)
		}
		if idx > s.index {
			s.index = idx
		}
	}
	return len(p), nil
}

func (s *snapLog) lastIndex() uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.index
}

func (s *snapLog) summary() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(s.took) == 0 {
		return "none completed"
	}
	return fmt.Sprintf("%d taken, last up to index %d, durations %v", len(s.took), s.index, s.took)
}

var _ io.Writer = (*snapLog)(nil)
