//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// strayProcesses lists processes (other than the agents) whose command
// line names dir: task supervisors and their tasks.
func strayProcesses(dir string, agents []*agent) []string {
	skip := map[string]bool{}
	for _, a := range agents {
		if p := a.Pid(); p > 0 {
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

// gauges is one agent's sample at a checkpoint.
type gauges struct {
	goroutines, fds                float64
	rssMiB, heapInuseMiB, heapLive float64 // MiB
	raftMiB, allocMiB, dataMiB     float64 // on disk (apparent sizes)
	allocDirs                      float64 // task directories under alloc/
	walSegments, snapshots         float64 // raft-wal segment files, retained Raft snapshots
	lastGC                         float64 // unix seconds of the last GC
}

func (c *cluster) sample(t *testing.T) []gauges {
	t.Helper()
	var out []gauges
	for _, a := range c.agents {
		m, err := a.metrics(context.Background())
		if err != nil {
			t.Fatalf("%s /metrics: %v", a.Name, err)
		}
		if _, ok := m["go_gc_heap_live_bytes"]; !ok {
			t.Fatalf("%s /metrics has no go_gc_heap_live_bytes (the live heap after the last GC; node/metrics.go exports it)", a.Name)
		}
		g := gauges{
			goroutines: m["go_goroutines"], fds: m["process_open_fds"],
			rssMiB: m["process_resident_memory_bytes"] / (1 << 20), heapInuseMiB: m["go_memstats_heap_inuse_bytes"] / (1 << 20),
			heapLive: m["go_gc_heap_live_bytes"] / (1 << 20), lastGC: m["go_memstats_last_gc_time_seconds"],
		}
		g.dataMiB = dirMiB(a.DataDir, nil)
		g.raftMiB = dirMiB(filepath.Join(a.DataDir, "raft"), nil)
		g.allocMiB = dirMiB(filepath.Join(a.DataDir, "alloc"), &g.allocDirs)
		segs, _ := filepath.Glob(filepath.Join(a.DataDir, "raft", "wal", "*.wal"))
		snaps, _ := filepath.Glob(filepath.Join(a.DataDir, "raft", "snapshots", "*", "meta.json"))
		g.walSegments, g.snapshots = float64(len(segs)), float64(len(snaps))
		out = append(out, g)
	}
	return out
}

// dirMiB sums the apparent sizes of the files under dir; dirs, if not nil,
// receives the number of task directories (alloc/<job>/<gen>/<rank>).
func dirMiB(dir string, dirs *float64) float64 {
	var n int64
	_ = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() {
			if dirs != nil {
				if rel, err := filepath.Rel(dir, p); err == nil && strings.Count(rel, string(filepath.Separator)) == 2 {
					*dirs++
				}
			}
			return nil
		}
		if info, err := d.Info(); err == nil {
			n += info.Size()
		}
		return nil
	})
	return float64(n) / (1 << 20)
}

// jobWatch follows the leader's job table for the soak's jobs, polling it
// far more often than the job GC age, and keeps what it saw of each job.
// It is the judge of "no acknowledged job lost before it finished" while
// the leader purges ended jobs (a purged job is NotFound):
//
//   - every acknowledged job must be seen complete at least once (a purge
//     takes only ended jobs, and only after the GC age, so a complete
//     status stays visible for the whole GC age: with polls every 100 ms
//     and a GC age of seconds, a job that vanishes unseen was lost);
//   - a job may vanish only after it was seen ended, and not before its
//     end time plus the GC age (else the purge was early);
//   - once ended, every job must be gone within the GC age plus a margin
//     (the state stays bounded);
//   - a job acknowledged but never seen at all is counted neither complete
//     nor gone, and fails the run.
//
// Polls that return an older index than one already seen (a new leader
// that has not applied everything yet) are skipped.
type jobWatch struct {
	c      *cluster
	prefix string
	gcAge  time.Duration

	mu       sync.Mutex
	obs      map[string]*watched
	index    uint64
	polls    int
	maxGap   time.Duration
	lastPoll time.Time
	lastErr  error

	cancel context.CancelFunc
	done   chan struct{}
}

type watched struct {
	status  string    // last status seen
	ended   time.Time // the job's status time when first seen complete/failed/stopped
	endSeen bool
	goneAt  time.Time // first poll that no longer had it (zero while present)
	gone    bool
}

func newJobWatch(c *cluster, prefix string, gcAge time.Duration) *jobWatch {
	ctx, cancel := context.WithCancel(context.Background())
	w := &jobWatch{c: c, prefix: prefix, gcAge: gcAge, obs: map[string]*watched{}, cancel: cancel, done: make(chan struct{})}
	go w.loop(ctx)
	return w
}

func (w *jobWatch) stop() { w.cancel(); <-w.done }

func (w *jobWatch) loop(ctx context.Context) {
	defer close(w.done)
	var lead *agent
	tick := time.NewTicker(100 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		if lead == nil {
			l, err := w.c.leader(ctx, nil)
			if err != nil {
				w.setErr(err)
				continue
			}
			lead = l
		}
		r, err := lead.jobs(ctx)
		if err != nil {
			w.setErr(err)
			lead = nil
			continue
		}
		w.observe(r, time.Now())
		if w.polls%50 == 0 {
			lead = nil // look again now and then: leadership may move
		}
	}
}

func (w *jobWatch) setErr(err error) {
	w.mu.Lock()
	w.lastErr = err
	w.mu.Unlock()
}

func (w *jobWatch) observe(r *pb.ListJobsResponse, now time.Time) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if r.Index < w.index {
		return
	}
	w.index = r.Index
	if !w.lastPoll.IsZero() && now.Sub(w.lastPoll) > w.maxGap {
		w.maxGap = now.Sub(w.lastPoll)
	}
	w.lastPoll = now
	w.polls++
	present := map[string]bool{}
	for _, j := range r.Jobs {
		if !strings.HasPrefix(j.Id, w.prefix) {
			continue
		}
		present[j.Id] = true
		o := w.obs[j.Id]
		if o == nil {
			o = &watched{}
			w.obs[j.Id] = o
		}
		o.status = j.Status
		o.gone, o.goneAt = false, time.Time{} // back (a lagging view hid it)
		switch j.Status {
		case "complete", "failed", "stopped":
			if !o.endSeen {
				o.endSeen = true
				o.ended = j.StatusTime.AsTime()
			}
		}
	}
	for id, o := range w.obs {
		if !present[id] && !o.gone {
			o.gone, o.goneAt = true, now
		}
	}
}

// check reports, for ids, how many were seen complete and how many gone
// (purged), and the problems: a job gone before it was seen ended, purged
// early, or ended otherwise than complete.
func (w *jobWatch) check(ids []string) (complete, gone int, problems []string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, id := range ids {
		o := w.obs[id]
		if o == nil {
			continue
		}
		if o.endSeen {
			if o.status == "complete" {
				complete++
			}
			if o.status == "failed" || o.status == "stopped" {
				problems = append(problems, fmt.Sprintf("job %s ended %s in a fault-free soak", id, o.status))
			}
		}
		if o.gone {
			gone++
			if !o.endSeen {
				problems = append(problems, fmt.Sprintf("LOST: acknowledged job %s vanished from the leader's table before it was seen ended (last status %q; max gap between polls %s, GC age %s)", id, o.status, w.maxGap, w.gcAge))
			} else if o.goneAt.Before(o.ended.Add(w.gcAge)) {
				problems = append(problems, fmt.Sprintf("job %s purged early: ended %s, gone by %s (GC age %s)", id, o.ended.Format(time.RFC3339Nano), o.goneAt.Format(time.RFC3339Nano), w.gcAge))
			}
		}
	}
	return complete, gone, problems
}

// waitBatch waits until every id was seen complete and then purged.
func (w *jobWatch) waitBatch(t *testing.T, ids []string) {
	t.Helper()
	poll.Until(t, w.gcAge+3*time.Minute, func() error {
		complete, gone, problems := w.check(ids)
		if len(problems) > 0 {
			t.Fatalf("%d problems, e.g. %s", len(problems), problems[0])
		}
		if complete < len(ids) || gone < len(ids) {
			w.mu.Lock()
			le := w.lastErr
			w.mu.Unlock()
			return fmt.Errorf("of %d acknowledged jobs %d seen complete, %d purged (GC age %s; last poll error: %v)", len(ids), complete, gone, w.gcAge, le)
		}
		return nil
	})
}

// submitBatch submits ids prefix-from..prefix-(to-1) with a few concurrent
// clients to random agents; every submission must be acknowledged.
func submitBatch(t *testing.T, c *cluster, rng *rand.Rand, prefix string, from, to, clients int) []string {
	t.Helper()
	var next atomic.Int64
	next.Store(int64(from))
	var wg sync.WaitGroup
	var mu sync.Mutex
	var errs []error
	var ids []string
	seeds := make([]uint64, clients)
	for i := range seeds {
		seeds[i] = rng.Uint64()
	}
	for k := 0; k < clients; k++ {
		wg.Add(1)
		go func(r *rand.Rand) {
			defer wg.Done()
			for {
				i := next.Add(1) - 1
				if i >= int64(to) {
					return
				}
				id := fmt.Sprintf("%s-%05d", prefix, i)
				a := c.agents[r.IntN(len(c.agents))]
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				_, err := a.Client().SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: execSpec(prefix)})
				cancel()
				mu.Lock()
				if err != nil {
					errs = append(errs, fmt.Errorf("%s via %s: %w", id, a.Name, err))
				} else {
					ids = append(ids, id)
				}
				mu.Unlock()
			}
		}(rand.New(rand.NewPCG(seeds[k], 3)))
	}
	wg.Wait()
	if len(errs) > 0 {
		t.Fatalf("%d of %d submissions failed in a fault-free soak, e.g. %v", len(errs), to-from, errs[0])
	}
	sort.Strings(ids)
	return ids
}

// settle waits until no task process is left, the agents' goroutine counts
// stop moving and every agent has run a GC after `after` (so the live heap
// reflects the state now), and returns that sample.
func (c *cluster) settle(t *testing.T, after time.Time) []gauges {
	t.Helper()
	var last []gauges
	poll.Until(t, 120*time.Second, func() error {
		if s := strayProcesses(c.dir, c.agents); len(s) > 0 {
			return fmt.Errorf("%d task processes still running, e.g. %s", len(s), s[0])
		}
		cur := c.sample(t)
		prev := last
		last = cur
		for i := range cur {
			if cur[i].lastGC < float64(after.UnixNano())/1e9 {
				return fmt.Errorf("%s has not collected garbage since the checkpoint began", c.agents[i].Name)
			}
		}
		if prev == nil {
			return fmt.Errorf("first sample")
		}
		for i := range cur {
			if cur[i].goroutines != prev[i].goroutines {
				return fmt.Errorf("%s goroutines moving: %v → %v", c.agents[i].Name, prev[i].goroutines, cur[i].goroutines)
			}
		}
		return nil
	})
	return last
}

func sumGauges(gs []gauges) (g gauges) {
	for _, x := range gs {
		g.goroutines += x.goroutines
		g.fds += x.fds
		g.rssMiB += x.rssMiB
		g.heapInuseMiB += x.heapInuseMiB
		g.heapLive += x.heapLive
		g.raftMiB += x.raftMiB
		g.allocMiB += x.allocMiB
		g.dataMiB += x.dataMiB
		g.allocDirs += x.allocDirs
		g.walSegments += x.walSegments
		g.snapshots += x.snapshots
	}
	return g
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// The soak: many short jobs through a 3-agent cluster whose leader
// purges ended jobs after a short GC age (--job-gc-age). Jobs go in
// batches; after each batch (a checkpoint) the test waits until every job
// of it was seen complete and then purged, the tasks are gone and every
// agent has collected garbage, and samples each agent: goroutines, open
// descriptors, resident memory, heap in use, live heap after GC, and the
// size of the data dir (raft/ and alloc/). With the job state purged, the
// same state is in memory at every checkpoint, so memory must be flat: the
// median of the checkpoints in the last quarter of the run may exceed the
// median of those in the second quarter (both after the warm-up batch)
// only by the tolerances below.
//
//	GPUMESH_SOAK_JOBS        jobs in all (default 1000; the full soak is 10000)
//	GPUMESH_SOAK_CHECKPOINT  jobs per batch (default max(jobs/10, 200))
//	GPUMESH_SOAK_GC_AGE      the agents' --job-gc-age (default 3s; 10s for 5000 jobs or more)
func TestSoak(t *testing.T) {
	total := envInt("GPUMESH_SOAK_JOBS", 1000)
	batch := envInt("GPUMESH_SOAK_CHECKPOINT", max(total/10, 200))
	gcAge := 3 * time.Second
	if total >= 5000 {
		gcAge = 10 * time.Second
	}
	if v := os.Getenv("GPUMESH_SOAK_GC_AGE"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("GPUMESH_SOAK_GC_AGE=%q: want a positive duration such as 10s", v)
		}
		gcAge = d
	}
	if total < 4*batch {
		t.Fatalf("soak: %d jobs in batches of %d gives fewer than 4 checkpoints; raise GPUMESH_SOAK_JOBS or lower GPUMESH_SOAK_CHECKPOINT", total, batch)
	}
	const clients = 4
	rng := rand.New(rand.NewPCG(seed(t), 4))
	c := newCluster(t, clusterOpts{n: 3, extraArgs: []string{"--bootstrap-expect", "3", "--job-gc-age", gcAge.String()}})
	c.waitLeader(60*time.Second, nil)
	first := c.sample(t)
	lead0, _ := c.leader(context.Background(), nil)
	w := newJobWatch(c, "soak-", gcAge)
	defer w.stop()

	type checkpoint struct {
		jobs   int
		index  uint64        // the Raft index the watcher last saw
		at     time.Duration // since the soak began
		runS   float64       // submitting until every job of the batch was seen complete
		purgeS float64       // from then until every job of the batch was purged
		per    []gauges
		sum    gauges
	}
	var cps []checkpoint
	var allIDs []string
	start := time.Now()
	var busy time.Duration
	for from := 0; from < total; from += batch {
		to := min(from+batch, total)
		b0 := time.Now()
		ids := submitBatch(t, c, rng, "soak", from, to, clients)
		allIDs = append(allIDs, ids...)
		poll.Until(t, 10*time.Minute, func() error {
			complete, _, problems := w.check(ids)
			if len(problems) > 0 {
				t.Fatalf("%d problems, e.g. %s", len(problems), problems[0])
			}
			if complete < len(ids) {
				return fmt.Errorf("%d of %d jobs of the batch seen complete", complete, len(ids))
			}
			return nil
		})
		ran := time.Since(b0)
		busy += ran
		p0 := time.Now()
		w.waitBatch(t, ids)
		purged := time.Since(p0)
		per := c.settle(t, time.Now())
		w.mu.Lock()
		idx := w.index
		w.mu.Unlock()
		cps = append(cps, checkpoint{jobs: to, index: idx, at: time.Since(start), runS: ran.Seconds(), purgeS: purged.Seconds(), per: per, sum: sumGauges(per)})
		s := cps[len(cps)-1].sum
		t.Logf("checkpoint %5d jobs (raft index %d): batch %.1fs, purged %.1fs later; goroutines %.0f fds %.0f rss %.0f MiB heap in use %.1f MiB live %.1f MiB; raft dir %.1f MiB (%.0f segments, %.0f snapshots), alloc dir %.1f MiB (%.0f task dirs)",
			to, idx, ran.Seconds(), purged.Seconds(), s.goroutines, s.fds, s.rssMiB, s.heapInuseMiB, s.heapLive, s.raftMiB, s.walSegments, s.snapshots, s.allocMiB, s.allocDirs)
	}
	w.stop()
	_, gone, problems := w.check(allIDs)
	for i, p := range problems {
		if i < 5 {
			t.Error(p)
		}
	}
	if gone != len(allIDs) || len(allIDs) != total {
		t.Errorf("%d acknowledged of %d submitted, %d seen complete and purged", len(allIDs), total, gone)
	}
	lead1, _ := c.leader(context.Background(), nil)

	// Flatness: the checkpoints after the warm-up batch, in the second
	// quarter of the run (jobs in (total/4, total/2]) and the last
	// (3*total/4, total]; every checkpoint is taken with the job state
	// empty (purged) and after a GC, so a leak is the only thing that grows
	// between them. Cluster totals (3 agents): leadership may move.
	var q2, q4 []checkpoint
	for _, cp := range cps[1:] {
		switch {
		case cp.jobs > total/4 && cp.jobs <= total/2:
			q2 = append(q2, cp)
		case cp.jobs > 3*total/4:
			q4 = append(q4, cp)
		}
	}
	if len(q2) == 0 {
		q2 = cps[1:2]
	}
	med := func(cs []checkpoint, f func(gauges) float64) float64 {
		var v []float64
		for _, cp := range cs {
			v = append(v, f(cp.sum))
		}
		return median(v)
	}
	n := float64(len(c.agents))
	type limit struct {
		name     string
		f        func(gauges) float64
		rel, abs float64 // allowed growth: rel*q2 + abs (abs per agent)
		why      string
		q2m, q4m float64
		exceeded bool
	}
	limits := []limit{
		{name: "live heap MiB", f: func(g gauges) float64 { return g.heapLive }, rel: 0.10, abs: 1,
			why: "the live heap after a GC with the same (empty) job state; 10% + 1 MiB per agent catches a leak of ~200 B/job/agent over a 10,000-job run"},
		{name: "heap in use MiB", f: func(g gauges) float64 { return g.heapInuseMiB }, rel: 0.25, abs: 2,
			why: "in-use spans also hold garbage allocated since the last GC, hence looser than the live heap"},
		{name: "RSS MiB", f: func(g gauges) float64 { return g.rssMiB }, rel: 0.20, abs: 8,
			why: "RSS follows the heap goal (2x live at GOGC=100) plus what the scavenger has not returned yet"},
		{name: "goroutines", f: func(g gauges) float64 { return g.goroutines }, rel: 0, abs: 5,
			why: "a handful of timers/streams may be mid-flight; one leaked goroutine per job would be hundreds"},
		{name: "open fds", f: func(g gauges) float64 { return g.fds }, rel: 0, abs: 4,
			why: "a few connections may be mid-redial; one leaked descriptor per job would be hundreds"},
		{name: "raft dir MiB", f: func(g gauges) float64 { return g.raftMiB }, rel: 0.50, abs: 16,
			why: "snapshots and log truncation bound the Raft data: at most two snapshots and TrailingLogs+SnapshotThreshold entries, written in WAL segments"},
	}
	for i := range limits {
		l := &limits[i]
		l.q2m, l.q4m = med(q2, l.f), med(q4, l.f)
		if l.q4m > l.q2m*(1+l.rel)+l.abs*n {
			l.exceeded = true
			t.Errorf("%s not flat: median %.1f over the last quarter vs %.1f over the second (allowed +%.0f%% +%.0f per agent: %s)", l.name, l.q4m, l.q2m, 100*l.rel, l.abs, l.why)
		}
	}
	// No leaked files: at every checkpoint every job so far was purged, so
	// no task directory (alloc/<job>/<generation>/<rank>, its logs and
	// state) may be left for it.
	if last := cps[len(cps)-1].sum.allocDirs; last > 0 {
		t.Errorf("%.0f task directories (%.1f MiB) of purged jobs left under the agents' alloc/ dirs after %d jobs: files leak with every job (the runner keeps the driver's handle and directory of a task after its job is purged)", last, cps[len(cps)-1].sum.allocMiB, total)
	}
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
	table := []map[string]any{}
	for _, cp := range cps {
		var perAgent []map[string]any
		for i, g := range cp.per {
			perAgent = append(perAgent, map[string]any{"agent": c.agents[i].Name, "goroutines": g.goroutines, "fds": g.fds, "rss_mib": r1(g.rssMiB), "heap_inuse_mib": r1(g.heapInuseMiB), "heap_live_mib": r1(g.heapLive), "raft_mib": r1(g.raftMiB), "alloc_mib": r1(g.allocMiB), "alloc_dirs": g.allocDirs})
		}
		table = append(table, map[string]any{
			"jobs": cp.jobs, "raft_index": cp.index, "wal_segments": cp.sum.walSegments, "snapshots": cp.sum.snapshots, "at_s": r1(cp.at.Seconds()), "batch_s": r1(cp.runS), "purge_s": r1(cp.purgeS),
			"goroutines": cp.sum.goroutines, "fds": cp.sum.fds, "rss_mib": r1(cp.sum.rssMiB), "heap_inuse_mib": r1(cp.sum.heapInuseMiB),
			"heap_live_mib": r1(cp.sum.heapLive), "raft_mib": r1(cp.sum.raftMiB), "alloc_mib": r1(cp.sum.allocMiB), "alloc_dirs": cp.sum.allocDirs, "data_mib": r1(cp.sum.dataMiB),
			"per_agent": perAgent,
		})
	}
	var flat []map[string]any
	for _, l := range limits {
		flat = append(flat, map[string]any{"gauge": l.name, "q2_median": r1(l.q2m), "q4_median": r1(l.q4m), "allowed": r1(l.q2m*(1+l.rel) + l.abs*n), "ok": !l.exceeded})
	}
	w.mu.Lock()
	polls, maxGap := w.polls, w.maxGap
	w.mu.Unlock()
	record(t, "soak", map[string]any{
		"agents": 3, "jobs": total, "batch": batch, "clients": clients, "job_gc_age_s": gcAge.Seconds(),
		"acknowledged": len(allIDs), "seen_complete_then_purged": gone, "lost": len(problems),
		"watch_polls": polls, "watch_max_gap_ms": maxGap.Milliseconds(),
		"wall_s": r1(time.Since(start).Seconds()), "jobs_per_s_while_submitting": r1(float64(total) / busy.Seconds()),
		"start_totals": map[string]any{"goroutines": sumGauges(first).goroutines, "fds": sumGauges(first).fds, "rss_mib": r1(sumGauges(first).rssMiB), "heap_live_mib": r1(sumGauges(first).heapLive)},
		"checkpoints":  table, "flatness": flat,
		"leader_moved": lead0 != lead1, "ranks_started_more_than_once": twice, "stray_processes": len(stray),
	})
}

func r1(x float64) float64 { return float64(int64(x*10+0.5)) / 10 }
