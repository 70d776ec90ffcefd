//go:build reliability

package reliability

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node"
)

// agent is one gpumesh agent process (procs.Agent) with the reads the
// reliability tests make of it.
type agent struct{ *procs.Agent }

// info asks the agent itself (no forwarding) for its role, leader and index.
func (a *agent) info(ctx context.Context) (*pb.AgentInfoResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return a.Client().AgentInfo(ctx, &pb.AgentInfoRequest{})
}

// jobs is the agent's own replica of the job table (a stale read).
func (a *agent) jobs(ctx context.Context) (*pb.ListJobsResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return a.Client().ListJobs(ctx, &pb.ListJobsRequest{Query: &pb.QueryOptions{Stale: true}})
}

// metrics reads a few gauges from the agent's /metrics.
func (a *agent) metrics(ctx context.Context) (map[string]float64, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	if a.Dial != nil {
		tr.DialContext = func(ctx context.Context, _, addr string) (net.Conn, error) { return a.Dial(ctx, addr) }
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.HTTPAddr()+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") {
			continue
		}
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		switch f[0] {
		case "go_goroutines", "process_resident_memory_bytes", "process_open_fds", "go_memstats_heap_inuse_bytes", "go_threads",
			"go_gc_heap_live_bytes", "go_memstats_last_gc_time_seconds":
			v, err := strconv.ParseFloat(f[1], 64)
			if err == nil {
				out[f[0]] = v
			}
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("%s /metrics: no gauges found", a.Name)
	}
	return out, sc.Err()
}

// rankStarts counts, over every agent's log, how many times each
// (job, generation, rank) was started by a runner.
func (c *cluster) rankStarts(prefix string) map[string]int {
	out := map[string]int{}
	for _, a := range c.agents {
		for _, line := range strings.Split(a.Logs(), "\n") {
			i := strings.Index(line, "rank started: job="+prefix)
			if i < 0 {
				continue
			}
			f := strings.Fields(line[i+len("rank started: "):])
			if len(f) >= 3 {
				out[f[0]+" "+f[1]+" "+f[2]]++
			}
		}
	}
	return out
}

// cluster is a set of agents.
type cluster struct {
	t      testing.TB
	dir    string
	agents []*agent
}

// clusterOpts configures newCluster.
type clusterOpts struct {
	n         int
	ips       []string // one per agent; default 127.0.0.(2+i) with free ports
	netns     []string // one per agent, or nil
	dial      func(ns string) func(ctx context.Context, addr string) (net.Conn, error)
	extraArgs []string
}

// newCluster prepares and starts n agents that join each other. Everything
// is killed and the agents' tasks stopped when the test ends.
func newCluster(t *testing.T, o clusterOpts) *cluster {
	t.Helper()
	if testing.Short() {
		t.Skip("reliability: multi-process test; skipped with -short")
	}
	c := &cluster{t: t, dir: t.TempDir()}
	for i := 0; i < o.n; i++ {
		a := &procs.Agent{Name: fmt.Sprintf("r%d", i+1), Args: append([]string{"--ec2", "off"}, o.extraArgs...)}
		a.DataDir = filepath.Join(c.dir, a.Name)
		a.IP = fmt.Sprintf("127.0.0.%d", i+2)
		if o.ips != nil {
			a.IP = o.ips[i]
			a.Ports = procs.Ports{Gossip: node.DefaultGossipPort, RPC: node.DefaultRPCPort, Raft: node.DefaultRaftPort, HTTP: node.DefaultHTTPPort}
		}
		if o.netns != nil {
			a.Netns = o.netns[i]
			a.Dial = o.dial(a.Netns)
		}
		c.agents = append(c.agents, &agent{procs.Prepare(t, a)})
	}
	for i, a := range c.agents {
		for j, b := range c.agents {
			if i != j {
				a.Args = append(a.Args, "--join", b.GossipAddr())
			}
		}
	}
	// Runs before the agents' own cleanups (procs.Prepare) kill them.
	t.Cleanup(func() {
		if !t.Failed() {
			return
		}
		keep := os.Getenv("GPUMESH_RELIABILITY_LOGS")
		for _, a := range c.agents {
			t.Logf("---- %s log (tail) ----\n%s", a.Name, tail(a.Logs(), 3000))
			if keep != "" {
				_ = os.MkdirAll(keep, 0o755)
				dst := filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"-"+a.Name+".log")
				if err := os.WriteFile(dst, []byte(a.Logs()), 0o644); err == nil {
					t.Logf("full log of %s kept in %s", a.Name, dst)
				}
			}
		}
	})
	for _, a := range c.agents {
		a.Start()
	}
	return c
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// leader returns the running agent that every answering running agent
// names as leader, and the agent itself.
func (c *cluster) leader(ctx context.Context, among []*agent) (*agent, error) {
	if among == nil {
		among = c.agents
	}
	var lead *agent
	for _, a := range among {
		if !a.Running() {
			continue
		}
		info, err := a.info(ctx)
		if err != nil {
			continue
		}
		if info.Role == "leader" {
			if lead != nil && lead != a {
				return nil, fmt.Errorf("two agents say they lead: %s and %s", lead.Name, a.Name)
			}
			lead = a
		}
	}
	if lead == nil {
		return nil, fmt.Errorf("no running agent leads")
	}
	return lead, nil
}

// waitLeader polls until one of among leads.
func (c *cluster) waitLeader(timeout time.Duration, among []*agent) *agent {
	c.t.Helper()
	var lead *agent
	poll.Until(c.t, timeout, func() (err error) {
		lead, err = c.leader(context.Background(), among)
		return err
	})
	return lead
}

// waitConverged polls until every agent in among has the same applied
// index and the same job table, and returns that table.
func (c *cluster) waitConverged(timeout time.Duration, among []*agent) []*pb.Job {
	c.t.Helper()
	if among == nil {
		among = c.agents
	}
	var jobs []*pb.Job
	poll.Until(c.t, timeout, func() error {
		var ref *pb.ListJobsResponse
		var refName string
		for _, a := range among {
			r, err := a.jobs(context.Background())
			if err != nil {
				return fmt.Errorf("%s: %v", a.Name, err)
			}
			if ref == nil {
				ref, refName = r, a.Name
				continue
			}
			if r.Index != ref.Index {
				return fmt.Errorf("%s is at index %d, %s at %d", a.Name, r.Index, refName, ref.Index)
			}
			if d := diffJobs(ref.Jobs, r.Jobs); d != "" {
				return fmt.Errorf("DIVERGED at the same index %d: %s vs %s: %s", r.Index, refName, a.Name, d)
			}
		}
		jobs = ref.Jobs
		return nil
	})
	return jobs
}

// diffJobs compares two job tables by id, status and generation.
func diffJobs(a, b []*pb.Job) string {
	key := func(j *pb.Job) string {
		return fmt.Sprintf("%s/%s/g%d/r%d/c%d/m%d", j.Id, j.Status, j.Generation, j.Restarts, j.CreateIndex, j.ModifyIndex)
	}
	ka, kb := make([]string, 0, len(a)), make([]string, 0, len(b))
	for _, j := range a {
		ka = append(ka, key(j))
	}
	for _, j := range b {
		kb = append(kb, key(j))
	}
	sort.Strings(ka)
	sort.Strings(kb)
	if strings.Join(ka, ",") == strings.Join(kb, ",") {
		return ""
	}
	return fmt.Sprintf("%d jobs vs %d jobs (first: %v vs %v)", len(ka), len(kb), first(ka, 3), first(kb, 3))
}

func first(s []string, n int) []string {
	if len(s) > n {
		return s[:n]
	}
	return s
}

// record appends one measured figure to GPUMESH_RELIABILITY_OUT (JSON
// lines) and logs it.
func record(t testing.TB, name string, fields map[string]any) {
	fields["test"] = name
	fields["time"] = time.Now().UTC().Format(time.RFC3339)
	b, _ := json.Marshal(fields)
	t.Logf("FIGURES %s", b)
	if p := os.Getenv("GPUMESH_RELIABILITY_OUT"); p != "" {
		f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Errorf("figures file: %v", err)
			return
		}
		defer f.Close()
		fmt.Fprintf(f, "%s\n", b)
	}
}

func envInt(name string, def int) int {
	if v := os.Getenv(name); v != "" {
		n, err := strconv.Atoi(v)
		if err == nil && n > 0 {
			return n
		}
	}
	return def
}

// durStats summarizes durations: min, median, max in milliseconds.
func durStats(ds []time.Duration) map[string]any {
	if len(ds) == 0 {
		return map[string]any{"n": 0}
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return map[string]any{"n": len(s), "min_ms": s[0].Milliseconds(), "median_ms": s[len(s)/2].Milliseconds(), "max_ms": s[len(s)-1].Milliseconds()}
}

// writeSpec writes a small exec job spec.
func execSpec(name string) *pb.JobSpec {
	return &pb.JobSpec{Name: name, Type: "exec", Ranks: 1, Exec: &pb.ExecSpec{Command: []string{"true"}}}
}
