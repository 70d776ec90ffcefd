package node

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node/driver"
)

// testLogger sends agent logs to t.Log, shown only when a test fails.
func testLogger(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: &tWriter{t: t}})
}

type tWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *tWriter) stop() { w.mu.Lock(); w.done = true; w.mu.Unlock() }

// startCluster starts n agents in this process with fixed ports, so that an
// agent can be restarted at the same addresses.
func startCluster(t *testing.T, n int, configure func(i int, c *Config)) *DevCluster {
	t.Helper()
	SupervisorPath = procs.Binary(t)
	w := &tWriter{t: t}
	logger := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Debug, Output: w})
	dc, err := NewDevCluster(DevConfig{
		Nodes: n, DataDir: t.TempDir(), Logger: logger,
		Configure: func(i int, c *Config) {
			p := procs.FreePorts(t, "127.0.0.1", 4)
			c.GossipPort, c.RPCPort, c.RaftPort, c.HTTPPort = p[0], p[1], p[2], p[3]
			c.CollectiveTimeout = 10 * time.Second
			if configure != nil {
				configure(i, c)
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		dc.Shutdown()
		// Agents shut down abruptly may leave tasks; none may outlive the test.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		// Each agent's own data dir: KillAll of the cluster's folder, which
		// holds one per agent, would find no allocations.
		for _, a := range dc.Agents {
			if a != nil {
				_ = driver.KillAll(ctx, mustAbs(a.cfg.DataDir))
			}
		}
		w.stop()
	})
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	return dc
}

func client(t *testing.T, a *Agent) pb.ControlClient {
	t.Helper()
	conn, err := grpc.NewClient(a.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return pb.NewControlClient(conn)
}

func follower(dc *DevCluster) *Agent {
	for _, a := range dc.Agents {
		if a != nil && !a.IsLeader() && a.raft != nil {
			return a
		}
	}
	return nil
}

func mustSpec(t *testing.T, y string) *pb.JobSpec {
	t.Helper()
	s, err := jobspec.Parse([]byte(y))
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func waitJob(t *testing.T, c pb.ControlClient, id string, timeout time.Duration, cond func(*pb.GetJobResponse) bool) *pb.GetJobResponse {
	t.Helper()
	var last *pb.GetJobResponse
	poll.Until(t, timeout, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
		if err != nil {
			return err
		}
		last = resp
		if cond(resp) {
			return nil
		}
		return fmt.Errorf("job %s: status %s (%s) generation %d", id, resp.Job.Status, resp.Job.StatusReason, resp.Job.Generation)
	})
	return last
}

func readLogs(t *testing.T, c pb.ControlClient, id string, rank int32, gen uint64) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: rank, Generation: gen})
	if err != nil {
		t.Fatal(err)
	}
	var b strings.Builder
	for {
		ch, err := st.Recv()
		if err == io.EOF {
			return b.String()
		}
		if err != nil {
			t.Fatalf("logs: %v", err)
		}
		b.Write(ch.Data)
	}
}

func TestClusterRunsExecJobThroughFollower(t *testing.T) {
	dc := startCluster(t, 3, nil)
	f := follower(dc)
	c := client(t, f)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, `
name: hello
ranks: 2
exec:
  command: ["sh", "-c", "echo rank $RANK of $WORLD_SIZE local $LOCAL_RANK/$LOCAL_WORLD_SIZE master $MASTER_ADDR:$MASTER_PORT job $GPUMESH_JOB_ID gen $GPUMESH_GENERATION"]
`)})
	if err != nil {
		t.Fatal(err)
	}
	final := waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	for _, al := range final.Allocations {
		if al.ExitCode != 0 || al.ClientStatus != "complete" {
			t.Fatalf("rank %d: %s exit %d %s", al.Rank, al.ClientStatus, al.ExitCode, al.Message)
		}
	}
	for r := int32(0); r < 2; r++ {
		out := readLogs(t, c, resp.Id, r, 0)
		want := fmt.Sprintf("rank %d of 2", r)
		if !strings.Contains(out, want) || !strings.Contains(out, "job "+resp.Id+" gen 1") {
			t.Fatalf("rank %d log %q does not contain %q and the job id", r, out, want)
		}
	}
	// The same id again is the same job (an idempotent retry).
	again, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: final.Job.Spec, Id: resp.Id})
	if err != nil || again.Id != resp.Id {
		t.Fatalf("resubmitting with the same id: %v %v", again, err)
	}
	list, err := c.ListJobs(ctx, &pb.ListJobsRequest{})
	if err != nil || len(list.Jobs) != 1 {
		t.Fatalf("want exactly one job after a retried submission, got %v (%v)", list, err)
	}
}

func TestClusterRefusesBadSpecs(t *testing.T) {
	dc := startCluster(t, 3, nil)
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	bad := []*pb.JobSpec{
		{Name: "x", Type: "exec", Ranks: 0, Exec: &pb.ExecSpec{Command: []string{"true"}}},
		{Name: "x", Type: "exec", Ranks: 1},
		{Name: "x", Type: "mpi", Ranks: 1},
		{Name: "x", Type: "exec", Ranks: 1, Exec: &pb.ExecSpec{Command: []string{strings.Repeat("x", 1<<20)}}},
	}
	for _, s := range bad {
		if _, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: s}); err == nil {
			t.Fatalf("spec %v accepted", s)
		} else if !strings.Contains(err.Error(), "job spec") {
			t.Fatalf("error %q does not say what is wrong with the spec", err)
		}
	}
	list, err := c.ListJobs(ctx, &pb.ListJobsRequest{})
	if err != nil || len(list.Jobs) != 0 {
		t.Fatalf("invalid specs were stored: %v %v", list, err)
	}
}

func TestClusterLeaderLossKeepsAcceptingJobs(t *testing.T) {
	dc := startCluster(t, 3, nil)
	old := dc.Leader()
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	first, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "name: before\nranks: 1\nexec: {command: [sleep, '600']}\n")})
	if err != nil {
		t.Fatal(err)
	}
	for i, a := range dc.Agents {
		if a == old {
			_ = a.Shutdown()
			dc.Agents[i] = nil
		}
	}
	poll.Until(t, 15*time.Second, func() error {
		if dc.Leader() == nil {
			return fmt.Errorf("no new leader yet")
		}
		return nil
	})
	var survivor *Agent
	for _, a := range dc.Agents {
		if a != nil {
			survivor = a
		}
	}
	c2 := client(t, survivor)
	second, err := c2.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "name: after\nranks: 1\nexec: {command: [true]}\n")})
	if err != nil {
		t.Fatalf("submission after the leader died: %v", err)
	}
	// Both jobs are in the new leader's log.
	for _, id := range []string{first.Id, second.Id} {
		if _, err := c2.GetJob(ctx, &pb.GetJobRequest{Id: id}); err != nil {
			t.Fatalf("job %s lost with the leader: %v", id, err)
		}
	}
	waitJob(t, c2, second.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	_, _ = c2.StopJob(ctx, &pb.StopJobRequest{Id: first.Id})
}

func TestClusterRestartFromDataDir(t *testing.T) {
	var cfgs []*Config
	dc := startCluster(t, 3, func(i int, c *Config) { cfgs = append(cfgs, c) })
	c := client(t, dc.Agents[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	job, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "name: keep\nranks: 1\nexec: {command: [true]}\n")})
	if err != nil {
		t.Fatal(err)
	}
	// Restart a follower with its data dir and addresses.
	idx := -1
	for i, a := range dc.Agents {
		if !a.IsLeader() {
			idx = i
			break
		}
	}
	id := dc.Agents[idx].NodeID()
	_ = dc.Agents[idx].Shutdown()
	cfg := *cfgs[idx]
	cfg.NodeID = ""
	a, err := NewAgent(&cfg)
	if err != nil {
		t.Fatal(err)
	}
	dc.Agents[idx] = a
	if a.NodeID() != id {
		t.Fatalf("restarted agent has id %s, want %s from its data dir", a.NodeID(), id)
	}
	poll.Until(t, 20*time.Second, func() error {
		if !a.raft.HasState() {
			return fmt.Errorf("not back in the raft group (role %s)", a.Role())
		}
		if a.raft.State().Job(job.Id) == nil {
			return fmt.Errorf("job %s not in the restarted replica", job.Id)
		}
		return nil
	})
}

// A node that is not server-eligible never joins Raft; it learns its ranks
// through a watch stream to a server and reports through it.
func TestClusterClientNodeRunsRanks(t *testing.T) {
	dc := startCluster(t, 4, func(i int, c *Config) {
		if i == 3 {
			c.Server = false
		}
	})
	cl := dc.Agents[3]
	if cl.Role() != "client" || cl.raft != nil {
		t.Fatalf("node-4 should be a client, is %s", cl.Role())
	}
	c := client(t, cl)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "name: wide\nranks: 4\nplacement: spread\nexec: {command: [sh, -c, 'echo rank $RANK on $GPUMESH_ADDR']}\n")})
	if err != nil {
		t.Fatalf("submission through a client node: %v", err)
	}
	final := waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	onClient := false
	for _, al := range final.Allocations {
		if al.NodeId == cl.NodeID() && al.ClientStatus == "complete" {
			onClient = true
			if out := readLogs(t, c, resp.Id, al.Rank, 0); !strings.Contains(out, cl.RPCAddr()) {
				t.Fatalf("client rank's log %q lacks its agent address", out)
			}
		}
	}
	if !onClient {
		t.Fatalf("no rank completed on the client node: %v", final.Allocations)
	}
	peers, err := c.RaftPeers(ctx, &pb.RaftPeersRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range peers.Peers {
		if p.Id == cl.NodeID() {
			t.Fatalf("client node is a raft peer: %v", p)
		}
	}
}

// The built-in jobs run inside the agents over the data plane.
func TestClusterRunsBuiltinJobs(t *testing.T) {
	dc := startCluster(t, 3, nil)
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ar, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "type: allreduce\nranks: 3\nplacement: spread\nallreduce: {sizes: [4KiB, 1MiB], dtype: int32, iters: 2, device: cpu}\n")})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "type: pipeline\nranks: 3\nplacement: spread\npipeline: {layers: [8, 16, 16, 4], microbatches: 4, microbatch_size: 4, steps: 3}\n")})
	if err != nil {
		t.Fatal(err)
	}
	final := waitJob(t, c, ar.Id, 40*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
	if final.Job.Status != "complete" {
		t.Fatalf("allreduce job %s: %s", final.Job.Status, final.Job.StatusReason)
	}
	for _, al := range final.Allocations {
		m := al.Result.AsMap()
		if ok, _ := m["ok"].(bool); !ok {
			t.Fatalf("rank %d report not ok: %v", al.Rank, m)
		}
		if rows, _ := m["sizes"].([]any); len(rows) != 2 {
			t.Fatalf("rank %d reported %d sizes, want 2: %v", al.Rank, len(rows), m)
		}
	}
	if out := readLogs(t, c, ar.Id, 1, 0); !strings.Contains(out, "busbw_gbps") {
		t.Fatalf("allreduce rank log lacks busbw: %q", out)
	}
	pfinal := waitJob(t, c, pl.Id, 40*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
	if pfinal.Job.Status != "complete" {
		t.Fatalf("pipeline job %s: %s", pfinal.Job.Status, pfinal.Job.StatusReason)
	}
	// Both jobs' frames took lanes (the default data plane); between agents
	// of one host (127.0.0.1 here) every lane rides the same-host Unix
	// socket.
	var lanes, unix uint64
	for _, a := range dc.Agents {
		lanes += a.data.svc.LanesAccepted()
		unix += a.data.svc.UnixLanesAccepted()
	}
	if lanes == 0 {
		t.Fatal("the built-in jobs used no data-plane lanes")
	}
	if unix != lanes {
		t.Fatalf("%d of %d lanes between agents of one host took the same-host Unix socket, want all", unix, lanes)
	}
	for _, al := range pfinal.Allocations {
		m := al.Result.AsMap()
		if al.Rank == 2 {
			if l, _ := m["losses"].([]any); len(l) != 3 {
				t.Fatalf("last stage reported %d losses, want 3: %v", len(l), m)
			}
		}
	}
}

// A script written for torchrun runs unchanged: it reads the environment
// and meets its peers at MASTER_ADDR:MASTER_PORT.
func TestClusterRunsTorchrunScript(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	script, err := filepath.Abs("../examples/torchrun_env.py")
	if err != nil {
		t.Fatal(err)
	}
	dc := startCluster(t, 3, nil)
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := &pb.JobSpec{Name: "torchrun", Type: "exec", Ranks: 3, Placement: "spread", Exec: &pb.ExecSpec{Command: []string{py, script}}}
	jobspec.ApplyDefaults(spec)
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
	if err != nil {
		t.Fatal(err)
	}
	final := waitJob(t, c, resp.Id, 60*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
	for r := int32(0); r < 3; r++ {
		out := readLogs(t, c, resp.Id, r, 0)
		if !strings.Contains(out, fmt.Sprintf("rank %d/3", r)) || !strings.Contains(out, "ok") {
			errOut, _ := c.Logs(ctx, &pb.LogsRequest{JobId: resp.Id, Rank: r, Stderr: true})
			var b strings.Builder
			for {
				ch, err := errOut.Recv()
				if err != nil {
					break
				}
				b.Write(ch.Data)
			}
			t.Fatalf("rank %d: %q (stderr %q), job %s", r, out, b.String(), final.Job.Status)
		}
	}
	if final.Job.Status != "complete" {
		t.Fatalf("job %s: %s", final.Job.Status, final.Job.StatusReason)
	}
}

// Two torchrun-style jobs at once on a cluster of one machine (every node
// on 127.0.0.1): each gets its own MASTER_PORT, so both rank 0s listen at
// once and both rendezvous. Rank 1 of each job waits until both rank 0s
// listen, so the two jobs overlap for sure. With one port per node (not
// per host), both could get the same port and the second rank 0 could not
// listen.
func TestClusterTwoTorchJobsAtOnce(t *testing.T) {
	py, err := exec.LookPath("python3")
	if err != nil {
		t.Skip("python3 not installed")
	}
	script, err := filepath.Abs("../examples/torchrun_env.py")
	if err != nil {
		t.Fatal(err)
	}
	azs := []string{"az-a", "az-b", "az-c"}
	dc := startCluster(t, 3, func(i int, c *Config) { c.AZ = azs[i] })
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	gate := filepath.Join(t.TempDir(), "go")
	var ids []string
	for _, az := range azs[:2] {
		spec := &pb.JobSpec{Name: "torch-" + az, Type: "exec", Ranks: 2, Constraints: &pb.Constraints{Az: az},
			Exec: &pb.ExecSpec{Command: []string{"sh", "-c",
				`if [ "$RANK" != 0 ]; then while [ ! -e "$0" ]; do sleep 0.05; done; fi; exec "$1" "$2"`, gate, py, script}}}
		jobspec.ApplyDefaults(spec)
		resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
		if err != nil {
			t.Fatal(err)
		}
		ids = append(ids, resp.Id)
	}
	type master struct {
		addr string
		port int32
	}
	masters := map[string]master{}
	for _, id := range ids {
		r := waitJob(t, c, id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "running" })
		for _, al := range r.Allocations {
			if al.Rank == 0 && al.Generation == r.Job.Generation {
				masters[id] = master{al.MasterAddr, al.MasterPort}
			}
		}
	}
	if masters[ids[0]] == masters[ids[1]] {
		t.Fatalf("both jobs rendezvous at %s:%d", masters[ids[0]].addr, masters[ids[0]].port)
	}
	for _, id := range ids {
		m := masters[id]
		poll.Until(t, 30*time.Second, func() error {
			if !tcpListening(t, m.port) {
				return fmt.Errorf("rank 0 of %s does not listen on %s:%d yet", id, m.addr, m.port)
			}
			return nil
		})
	}
	if err := os.WriteFile(gate, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, id := range ids {
		final := waitJob(t, c, id, 60*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
		if final.Job.Status != "complete" || final.Job.Generation != 1 {
			t.Fatalf("job %s: %s at generation %d (%s)", id, final.Job.Status, final.Job.Generation, final.Job.StatusReason)
		}
		if out := readLogs(t, c, id, 0, 0); !strings.Contains(out, "rendezvous ok") {
			t.Fatalf("job %s rank 0: %q", id, out)
		}
	}
}

// tcpListening reports whether a TCP socket listens on port (any address),
// from /proc/net/tcp, without connecting to it.
func tcpListening(t *testing.T, port int32) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/net/tcp")
	if err != nil {
		t.Skipf("no /proc/net/tcp: %v", err)
	}
	want := fmt.Sprintf(":%04X", port)
	for _, line := range strings.Split(string(b), "\n")[1:] {
		f := strings.Fields(line)
		if len(f) > 3 && strings.HasSuffix(f[1], want) && f[3] == "0A" { // 0A: LISTEN
			return true
		}
	}
	return false
}

// gRPC health checking and server reflection answer on the RPC port, so
// grpcurl and load balancers work; /v1/health answers on the HTTP port.
func TestClusterHealthAndReflection(t *testing.T) {
	dc := startCluster(t, 3, nil)
	a := dc.Agents[1]
	conn, err := grpc.NewClient(a.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	hr, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hr.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health: %v %v", hr, err)
	}
	rc, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	rr, err := rc.Recv()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, s := range rr.GetListServicesResponse().GetService() {
		if s.Name == "gpumesh.v1.Control" {
			found = true
		}
	}
	if !found {
		t.Fatalf("reflection does not list gpumesh.v1.Control: %v", rr)
	}
	resp, err := http.Get("http://" + a.HTTPAddr() + "/v1/health")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || !strings.Contains(string(body), `"status":"ok"`) {
		t.Fatalf("/v1/health: %d %s", resp.StatusCode, body)
	}

	// Per service, and in step with /v1/health: without a leader the
	// server and the Control API are NOT_SERVING, the data plane serves on.
	hc := healthpb.NewHealthClient(conn)
	status := func(svc string) healthpb.HealthCheckResponse_ServingStatus {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil {
			t.Fatalf("health of %q: %v", svc, err)
		}
		return r.Status
	}
	const control, data = "gpumesh.v1.Control", "gpumesh.collective.v1.DataPlane"
	for _, svc := range []string{control, data} {
		if st := status(svc); st != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %s with a leader: %v", svc, st)
		}
	}
	for i, o := range dc.Agents {
		if i != 1 {
			o.Shutdown()
		}
	}
	poll.Until(t, 30*time.Second, func() error {
		if st := status(control); st != healthpb.HealthCheckResponse_NOT_SERVING {
			return fmt.Errorf("%s is %v with no leader", control, st)
		}
		return nil
	})
	if st := status(""); st != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("overall health with no leader: %v", st)
	}
	if st := status(data); st != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("data plane with no leader: %v", st)
	}
	resp, err = http.Get("http://" + a.HTTPAddr() + "/v1/health")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable || !strings.Contains(string(body), `"no leader"`) {
		t.Fatalf("/v1/health with no leader: %d %s", resp.StatusCode, body)
	}
}

// A node with --data-plane grpc and one with the default (tcp lanes) run
// built-in jobs together: the lane-asking node's requests are answered
// "none" and every frame stays on the gRPC streams.
func TestClusterMixedDataPlanes(t *testing.T) {
	dc := startCluster(t, 2, func(i int, c *Config) {
		if i == 0 {
			c.DataPlane = "grpc"
		}
	})
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ar, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "type: allreduce\nranks: 2\nplacement: spread\nallreduce: {sizes: [1MiB], dtype: float32, iters: 2, device: cpu}\n")})
	if err != nil {
		t.Fatal(err)
	}
	pl, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, "type: pipeline\nranks: 2\nplacement: spread\npipeline: {layers: [8, 16, 4], microbatches: 4, microbatch_size: 4, steps: 2}\n")})
	if err != nil {
		t.Fatal(err)
	}
	for _, id := range []string{ar.Id, pl.Id} {
		final := waitJob(t, c, id, 40*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
		if final.Job.Status != "complete" {
			t.Fatalf("job %s: %s (%s)", id, final.Job.Status, final.Job.StatusReason)
		}
	}
	for i, a := range dc.Agents {
		if n := a.data.svc.LanesAccepted(); n != 0 {
			t.Fatalf("agent %d accepted %d lanes with a gRPC-only peer", i, n)
		}
	}
}

// Purging an ended job removes what its ranks left on every node: the
// allocation directories of exec and built-in ranks (logs included) and the
// job's own directory, so a long-lived cluster's disk does not grow with
// every job.
func TestClusterPurgeRemovesRankDirectories(t *testing.T) {
	const gcAge = 5 * time.Second // the margin for seeing the directories before the purge
	dc := startCluster(t, 3, func(i int, c *Config) { c.JobGCAge = gcAge })
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	jobDirs := func(id string) []string {
		var out []string
		for _, a := range dc.Agents {
			d := filepath.Join(mustAbs(a.cfg.DataDir), "alloc", id)
			if _, err := os.Stat(d); err == nil {
				out = append(out, d)
			}
		}
		return out
	}
	var ids []string
	for _, y := range []string{
		"type: allreduce\nranks: 3\nplacement: spread\nallreduce: {sizes: [4KiB], dtype: int32, iters: 1, device: cpu}\n",
		"ranks: 3\nplacement: spread\nexec:\n  command: [\"sh\", \"-c\", \"echo rank $RANK\"]\n",
	} {
		resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, y)})
		if err != nil {
			t.Fatal(err)
		}
		final := waitJob(t, c, resp.Id, 40*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" || r.Job.Status == "failed" })
		if final.Job.Status != "complete" {
			t.Fatalf("job %s: %s (%s)", resp.Id, final.Job.Status, final.Job.StatusReason)
		}
		if got := jobDirs(resp.Id); len(got) != 3 {
			t.Fatalf("job %s (%s): rank directories on %d nodes after it completed, want 3: %v", resp.Id, final.Job.Spec.GetType(), len(got), got)
		}
		ids = append(ids, resp.Id)
	}
	for _, id := range ids {
		poll.Until(t, 30*time.Second, func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			if _, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id}); status.Code(err) != codes.NotFound {
				return fmt.Errorf("job %s not purged yet (GetJob: %v)", id, err)
			}
			if left := jobDirs(id); len(left) > 0 {
				return fmt.Errorf("job %s purged but its directories remain: %v", id, left)
			}
			return nil
		})
	}
}
