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
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node/driver"
)

// agent is one gpumesh agent process, on a loopback address or inside a
// network namespace.
type agent struct {
	name    string
	ip      string
	netns   string // empty: the host's namespace (loopback addresses only)
	dataDir string
	logPath string
	ports   procs.Ports
	args    []string

	t      testing.TB
	dial   func(ctx context.Context, addr string) (net.Conn, error)
	mu     sync.Mutex
	cmd    *exec.Cmd
	exited chan struct{}
	logF   *os.File

	connOnce sync.Once
	conn     *grpc.ClientConn
}

func (a *agent) rpcAddr() string    { return net.JoinHostPort(a.ip, strconv.Itoa(a.ports.RPC)) }
func (a *agent) gossipAddr() string { return net.JoinHostPort(a.ip, strconv.Itoa(a.ports.Gossip)) }
func (a *agent) httpAddr() string   { return net.JoinHostPort(a.ip, strconv.Itoa(a.ports.HTTP)) }

// start launches the process (again, after a kill, with the same data dir).
func (a *agent) start() {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		a.t.Fatalf("%s is already running", a.name)
	}
	if err := os.MkdirAll(a.dataDir, 0o755); err != nil {
		a.t.Fatal(err)
	}
	logF, err := os.OpenFile(a.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	args := []string{"agent",
		"--name", a.name, "--bind", a.ip, "--data-dir", a.dataDir,
		"--gossip-port", strconv.Itoa(a.ports.Gossip), "--rpc-port", strconv.Itoa(a.ports.RPC),
		"--raft-port", strconv.Itoa(a.ports.Raft), "--http-port", strconv.Itoa(a.ports.HTTP),
		"--ec2", "off", "--log-level", "debug",
		// Tasks run as the test's user: their scripts and data dirs sit in
		// temporary folders only it can enter.
		"--task-user=",
	}
	args = append(args, a.args...)
	var cmd *exec.Cmd
	if a.netns != "" {
		// ip(8) enters the namespace and execs the agent: the pid is the agent's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", a.netns, procs.Binary(a.t)}, args...)...)
	} else {
		cmd = exec.Command(procs.Binary(a.t), args...)
	}
	cmd.Stdout, cmd.Stderr = logF, logF
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logF.Close()
		a.t.Fatalf("start %s: %v", a.name, err)
	}
	fmt.Fprintf(logF, "==== test harness: started pid %d at %s\n", cmd.Process.Pid, time.Now().UTC().Format(time.RFC3339Nano))
	a.cmd, a.logF = cmd, logF
	a.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(cmd, a.exited)
}

// kill sends SIGKILL to the agent's process group and waits for it.
func (a *agent) kill() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	<-a.exited
	fmt.Fprintf(a.logF, "==== test harness: SIGKILL at %s\n", time.Now().UTC().Format(time.RFC3339Nano))
	a.logF.Close()
	a.cmd = nil
}

// pid is the agent's process id, or 0.
func (a *agent) pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

func (a *agent) running() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return false
	}
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// client is a Control API client of this agent (one connection, reused;
// gRPC reconnects by itself after a restart).
func (a *agent) client() pb.ControlClient {
	a.connOnce.Do(func() {
		opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
		if a.dial != nil {
			opts = append(opts, grpc.WithContextDialer(a.dial))
		}
		c, err := grpc.NewClient(a.rpcAddr(), opts...)
		if err != nil {
			a.t.Fatalf("client of %s: %v", a.name, err)
		}
		a.conn = c
	})
	return pb.NewControlClient(a.conn)
}

func (a *agent) closeClient() {
	if a.conn != nil {
		a.conn.Close()
	}
}

func (a *agent) logs() string {
	b, _ := os.ReadFile(a.logPath)
	return string(b)
}

// info asks the agent itself (no forwarding) for its role, leader and index.
func (a *agent) info(ctx context.Context) (*pb.AgentInfoResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	return a.client().AgentInfo(ctx, &pb.AgentInfoRequest{})
}

// jobs is the agent's own replica of the job table (a stale read).
func (a *agent) jobs(ctx context.Context) (*pb.ListJobsResponse, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	return a.client().ListJobs(ctx, &pb.ListJobsRequest{Query: &pb.QueryOptions{Stale: true}})
}

// metrics reads a few gauges from the agent's /metrics.
func (a *agent) metrics(ctx context.Context) (map[string]float64, error) {
	tr := &http.Transport{DisableKeepAlives: true}
	if a.dial != nil {
		tr.DialContext = func(ctx context.Context, _, addr string) (net.Conn, error) { return a.dial(ctx, addr) }
	}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.httpAddr()+"/metrics", nil)
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
		return nil, fmt.Errorf("%s /metrics: no gauges found", a.name)
	}
	return out, sc.Err()
}

// rankStarts counts, over every agent's log, how many times each
// (job, generation, rank) was started by a runner.
func (c *cluster) rankStarts(prefix string) map[string]int {
	out := map[string]int{}
	for _, a := range c.agents {
		for _, line := range strings.Split(a.logs(), "\n") {
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
		a := &agent{t: t, name: fmt.Sprintf("r%d", i+1)}
		a.dataDir = filepath.Join(c.dir, a.name)
		a.logPath = filepath.Join(c.dir, a.name+".log")
		if o.ips != nil {
			a.ip = o.ips[i]
			a.ports = procs.Ports{Gossip: 7946, RPC: 7947, Raft: 7948, HTTP: 7949}
		} else {
			a.ip = fmt.Sprintf("127.0.0.%d", i+2)
			p := procs.FreePorts(t, a.ip, 4)
			a.ports = procs.Ports{Gossip: p[0], RPC: p[1], Raft: p[2], HTTP: p[3]}
		}
		if o.netns != nil {
			a.netns = o.netns[i]
			a.dial = o.dial(a.netns)
		}
		a.args = append([]string(nil), o.extraArgs...)
		c.agents = append(c.agents, a)
	}
	for i, a := range c.agents {
		for j, b := range c.agents {
			if i != j {
				a.args = append(a.args, "--join", b.gossipAddr())
			}
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			keep := os.Getenv("GPUMESH_RELIABILITY_LOGS")
			for _, a := range c.agents {
				t.Logf("---- %s log (tail) ----\n%s", a.name, tail(a.logs(), 3000))
				if keep != "" {
					_ = os.MkdirAll(keep, 0o755)
					dst := filepath.Join(keep, strings.ReplaceAll(t.Name(), "/", "_")+"-"+a.name+".log")
					if err := os.WriteFile(dst, []byte(a.logs()), 0o644); err == nil {
						t.Logf("full log of %s kept in %s", a.name, dst)
					}
				}
			}
		}
		for _, a := range c.agents {
			a.kill()
			a.closeClient()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		for _, a := range c.agents {
			if err := driver.KillAll(ctx, a.dataDir); err != nil {
				t.Logf("stopping %s's tasks: %v", a.name, err)
			}
		}
	})
	for _, a := range c.agents {
		a.start()
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
		if !a.running() {
			continue
		}
		info, err := a.info(ctx)
		if err != nil {
			continue
		}
		if info.Role == "leader" {
			if lead != nil && lead != a {
				return nil, fmt.Errorf("two agents say they lead: %s and %s", lead.name, a.name)
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
	procs.Eventually(c.t, timeout, func() (err error) {
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
	procs.Eventually(c.t, timeout, func() error {
		var ref *pb.ListJobsResponse
		var refName string
		for _, a := range among {
			r, err := a.jobs(context.Background())
			if err != nil {
				return fmt.Errorf("%s: %v", a.name, err)
			}
			if ref == nil {
				ref, refName = r, a.name
				continue
			}
			if r.Index != ref.Index {
				return fmt.Errorf("%s is at index %d, %s at %d", a.name, r.Index, refName, ref.Index)
			}
			if d := diffJobs(ref.Jobs, r.Jobs); d != "" {
				return fmt.Errorf("DIVERGED at the same index %d: %s vs %s: %s", r.Index, refName, a.name, d)
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
