package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// routes reads an agent's routing table.
func routes(t *testing.T, a *Agent) []ServiceRoute {
	t.Helper()
	var out struct {
		Services []ServiceRoute `json:"services"`
	}
	if err := json.Unmarshal([]byte(httpGet(t, "http://"+a.self.HttpAddr+"/v1/services")), &out); err != nil {
		t.Fatal(err)
	}
	return out.Services
}

// A service job's replicas get their ports from the agent, report health,
// and are reached through every agent's /svc/ route, a client node's
// included; a replica that stops passing its check leaves every router.
func TestClusterServiceRoutesFromEveryNode(t *testing.T) {
	needSystemPython(t)
	dc := startCluster(t, 4, func(i int, c *Config) {
		if i == 3 {
			c.Server = false
			c.ServeAddr = net.JoinHostPort(c.BindAddr, "0") // and a serve port
		}
	})
	server, err := filepath.Abs("../examples/service/server.py")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, dc.Agents[0])
	id := submitJob(t, c, fmt.Sprintf(`
name: mlp
type: service
replicas: 2
placement: spread
exec:
  command: [/usr/bin/python3, %q]
  env: {SERVE_NO_TORCH: "1"}
service:
  ports: [http, admin]
  check: {path: /healthz, interval: 200ms, timeout: 150ms, threshold: 2, grace: 30s}
`, server))
	var job *pb.GetJobResponse
	poll.Until(t, 60*time.Second, func() error {
		job = waitJob(t, c, id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "running" })
		n := 0
		for _, al := range job.Allocations {
			if al.Health == HealthHealthy && al.Ports["http"] != 0 && al.Ports["admin"] != 0 && al.Ports["http"] != al.Ports["admin"] {
				n++
			}
		}
		if n != 2 {
			return fmt.Errorf("%d of 2 replicas healthy with two ports: %v", n, job.Allocations)
		}
		return nil
	})
	postTo := func(addr, path string) (int, string) {
		resp, err := http.Post("http://"+addr+"/svc/mlp"+path, "application/json", strings.NewReader(`{"x": [1, 2, 3, 4]}`))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	post := func(a *Agent, path string) (int, string) { return postTo(a.self.HttpAddr, path) }
	for _, a := range dc.Agents {
		poll.Until(t, 20*time.Second, func() error {
			if code, body := post(a, "/predict"); code != http.StatusOK || !strings.Contains(body, `"y": [`) {
				return fmt.Errorf("through %s: %d %s", a.cfg.NodeName, code, body)
			}
			return nil
		})
	}
	// One replica stops passing its check: every router drops it.
	var sick *pb.Allocation
	for _, al := range job.Allocations {
		if al.Health == HealthHealthy {
			sick = al
			break
		}
	}
	resp, err := http.Post(fmt.Sprintf("http://%s:%d/unready", hostOf(sick.RankAddr), sick.Ports["http"]), "text/plain", nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	start := time.Now()
	for _, a := range dc.Agents {
		poll.Until(t, 20*time.Second, func() error {
			for _, s := range routes(t, a) {
				for _, r := range s.Replicas {
					if r.AllocID == sick.Id && r.Health == HealthHealthy {
						return fmt.Errorf("%s still routes to the unready replica", a.cfg.NodeName)
					}
				}
			}
			return nil
		})
	}
	t.Logf("the unready replica left every router %v after it failed (interval 200ms × threshold 2)", time.Since(start).Round(time.Millisecond))
	// The same through agent 3's serve port, which counts in the same
	// metrics.
	for _, addr := range []string{dc.Agents[3].self.HttpAddr, dc.Agents[3].ServeAddr()} {
		for i := 0; i < 10; i++ {
			if code, body := postTo(addr, "/predict"); code != http.StatusOK || strings.Contains(body, fmt.Sprintf(":%d ", sick.Ports["http"])) {
				t.Fatalf("through %s after the replica went unready: %d %s", addr, code, body)
			}
		}
		// Oversized request headers are refused before routing.
		big, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/svc/mlp/", nil)
		big.Header.Set("X-Big", strings.Repeat("a", 2*MaxHeaderBytes))
		if resp, err := http.DefaultClient.Do(big); err != nil {
			t.Fatal(err)
		} else {
			resp.Body.Close()
			if resp.StatusCode != http.StatusRequestHeaderFieldsTooLarge {
				t.Fatalf("through %s, a %d-byte header: %d, want 431", addr, 2*MaxHeaderBytes, resp.StatusCode)
			}
		}
	}
	if n := dc.Agents[3].serveS.served.Load(); n < 10 {
		t.Fatalf("the serve port's front end answered %d requests itself, want 10", n)
	}
	mfs := scrape(t, dc.Agents[3])
	if v, ok := metricValue(mfs, "gpumesh_service_requests_total", map[string]string{"service": "mlp"}); !ok || v < 21 {
		t.Fatalf("gpumesh_service_requests_total{service=mlp} = %v (%v), want >= 21", v, ok)
	}
	if v, ok := metricValue(mfs, "gpumesh_service_port_requests_total", nil); !ok || v < 10 {
		t.Fatalf("gpumesh_service_port_requests_total = %v (%v), want >= 10", v, ok)
	}
	if v, ok := metricValue(mfs, "gpumesh_service_port_handoffs_total", nil); !ok || v < 1 { // the oversized head
		t.Fatalf("gpumesh_service_port_handoffs_total = %v (%v), want >= 1", v, ok)
	}
	for h, want := range map[string]float64{HealthHealthy: 1, HealthUnhealthy: 1} {
		if v, ok := metricValue(mfs, "gpumesh_service_replicas", map[string]string{"service": "mlp", "health": h}); !ok || v != want {
			t.Fatalf("gpumesh_service_replicas{health=%s} = %v (%v), want %v", h, v, ok, want)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.StopJob(ctx, &pb.StopJobRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
}

// A replica killed without notice costs no GET: the router retries on the
// other replica while the dead one's port refuses, the killed replica
// leaves routing when its end is reported, and a replacement comes up.
func TestClusterServiceReplicaKilled(t *testing.T) {
	needSystemPython(t)
	dc := startCluster(t, 3, nil)
	server, err := filepath.Abs("../examples/service/server.py")
	if err != nil {
		t.Fatal(err)
	}
	c := client(t, dc.Agents[0])
	id := submitJob(t, c, fmt.Sprintf(`
name: echo
type: service
replicas: 2
placement: spread
restart: {delay: 1s}
exec:
  command: [/usr/bin/python3, %q]
  env: {SERVE_NO_TORCH: "1"}
service:
  check: {path: /healthz, interval: 500ms, timeout: 500ms, threshold: 3, grace: 30s}
`, server))
	// (A lenient check: the replica left alone serves the test's GETs
	// back to back on a loaded 2-core machine, and must not miss its
	// checks for that; the killed one leaves routing when its end is
	// reported, not by its checks.)
	healthy := func() []*pb.Allocation {
		job := waitJob(t, c, id, 30*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "running" })
		var out []*pb.Allocation
		for _, al := range job.Allocations {
			if al.DesiredStatus == "run" && al.ClientStatus == "running" && al.Health == HealthHealthy {
				out = append(out, al)
			}
		}
		return out
	}
	var first []*pb.Allocation
	poll.Until(t, 60*time.Second, func() error {
		if first = healthy(); len(first) != 2 {
			return fmt.Errorf("%d of 2 replicas healthy", len(first))
		}
		return nil
	})
	// Every router must route to both before one dies: the job's state
	// says healthy a moment before each agent's table does, and a router
	// that still counts only the victim healthy has nowhere to retry (a
	// 503 that says nothing about a killed replica).
	for _, a := range dc.Agents {
		poll.Until(t, 20*time.Second, func() error {
			for _, s := range routes(t, a) {
				if s.Name == "echo" && s.Healthy == 2 {
					return nil
				}
			}
			return fmt.Errorf("%s does not route to 2 healthy replicas yet: %+v", a.cfg.NodeName, routes(t, a))
		})
	}
	victim := first[0]
	var pid int
	for _, a := range dc.Agents {
		if a.NodeID() != victim.NodeId {
			continue
		}
		a.runner.mu.Lock()
		if st, ok := a.runner.tasks[victim.Id].task.(*serviceTask); ok {
			pid = st.task.(*execTask).h.Pid()
		}
		a.runner.mu.Unlock()
	}
	if pid <= 0 {
		t.Fatalf("no process for replica %s", victim.Id)
	}
	// Load through every agent in turn while the replica dies.
	var sent, failed int
	var firstErr string
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; ; i++ {
			select {
			case <-stop:
				return
			default:
			}
			a := dc.Agents[i%len(dc.Agents)]
			resp, err := http.Get("http://" + a.self.HttpAddr + "/svc/echo/")
			sent++
			if err == nil {
				b, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusOK {
					err = fmt.Errorf("status %d through %s: %s", resp.StatusCode, a.cfg.NodeName, bytes.TrimSpace(b))
				}
			}
			if err != nil {
				failed++
				if firstErr == "" {
					firstErr = err.Error()
				}
			}
		}
	}()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		close(stop)
		<-done
		t.Fatal(err)
	}
	poll.Until(t, 60*time.Second, func() error {
		h := healthy()
		if len(h) != 2 {
			return fmt.Errorf("%d of 2 replicas healthy", len(h))
		}
		for _, al := range h {
			if al.Id == victim.Id {
				return fmt.Errorf("the killed replica %s still counts as healthy", victim.Id)
			}
		}
		return nil
	})
	close(stop)
	<-done
	t.Logf("%d GETs while replica %s was killed and replaced, %d failed", sent, victim.Id, failed)
	if failed != 0 {
		t.Fatalf("%d of %d GETs failed; first: %s", failed, sent, firstErr)
	}
}

// needSystemPython skips a test whose replicas run examples/service/server.py
// with Debian's /usr/bin/python3 when this machine has none (a bare Debian
// with Go and gcc), saying so.
func needSystemPython(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("/usr/bin/python3"); err != nil {
		t.Skip("/usr/bin/python3 is not installed (apt-get install python3): the service replicas are a Python server")
	}
}

// Submissions of a brand-new service name at the same instant register one
// service; the others update it (or find nothing to do).
func TestClusterConcurrentSubmitsRegisterOneService(t *testing.T) {
	dc := startCluster(t, 1, nil)
	c := client(t, dc.Agents[0])
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	const n = 8
	ids := make(chan string, n)
	errs := make(chan error, n)
	start := make(chan struct{})
	for i := 0; i < n; i++ {
		spec := mustSpec(t, fmt.Sprintf("name: web\ntype: service\nreplicas: 1\nexec: {command: [sleep, '600'], env: {V: '%d'}}\n", i))
		go func() {
			<-start
			resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec})
			if err != nil {
				errs <- err
				return
			}
			ids <- resp.Id
		}()
	}
	close(start)
	seen := map[string]bool{}
	for i := 0; i < n; i++ {
		select {
		case err := <-errs:
			t.Fatal(err)
		case id := <-ids:
			seen[id] = true
		}
	}
	jobs, err := c.ListJobs(ctx, &pb.ListJobsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var named []string
	for _, j := range jobs.Jobs {
		if j.Spec.GetName() == "web" {
			named = append(named, j.Id)
		}
	}
	if len(named) != 1 || len(seen) != 1 {
		t.Fatalf("%d submissions at once registered jobs %v (answered %v); want one service", n, named, seen)
	}
}

// A service whose replicas exit at once backs off: each replica of its slot
// starts no earlier than the back-off after its predecessor's end (100ms,
// 200ms, 400ms, then the cap of 400ms), carries the slot's failures in a
// row, and the leader's metrics show the count.
func TestClusterServiceCrashLoopBacksOff(t *testing.T) {
	dc := startCluster(t, 1, nil)
	a := dc.Agents[0]
	c := client(t, a)
	id := submitJob(t, c, `
name: crasher
type: service
replicas: 1
restart: {delay: 100ms, max_delay: 400ms}
exec:
  command: [/bin/sh, -c, "exit 3"]
`)
	var job *pb.GetJobResponse
	poll.Until(t, 60*time.Second, func() error {
		job = waitJob(t, c, id, 30*time.Second, func(*pb.GetJobResponse) bool { return true })
		for _, al := range job.Allocations {
			if al.SlotFailures >= 4 {
				return nil
			}
		}
		return fmt.Errorf("no replica with 4 failures in a row yet: generation %d (%s)", job.Job.Generation, job.Job.StatusReason)
	})
	byGen := map[uint64]*pb.Allocation{}
	for _, al := range job.Allocations {
		byGen[al.Generation] = al
	}
	for _, al := range job.Allocations {
		prev := byGen[al.Generation-1]
		if prev == nil || prev.FinishTime == nil || al.StartTime == nil {
			continue
		}
		if al.SlotFailures != prev.SlotFailures+1 {
			t.Fatalf("generation %d carries slot_failures %d after %d", al.Generation, al.SlotFailures, prev.SlotFailures)
		}
		want := min(100*time.Millisecond<<max(al.SlotFailures-1, 0), 400*time.Millisecond)
		if gap := al.StartTime.AsTime().Sub(prev.FinishTime.AsTime()); gap < want {
			t.Fatalf("generation %d (slot_failures %d) started %s after its predecessor ended; the back-off is %s", al.Generation, al.SlotFailures, gap, want)
		}
	}
	poll.Until(t, 20*time.Second, func() error {
		v, ok := metricValue(scrape(t, a), "gpumesh_service_replica_failures_in_a_row", map[string]string{"job_id": id, "replica": "0"})
		if !ok || v < 4 {
			return fmt.Errorf("gpumesh_service_replica_failures_in_a_row = %v (%v), want >= 4", v, ok)
		}
		return nil
	})
}

// A node's serve port is in its record: the gossip metadata, the Raft
// state's node (ListNodes), AgentInfo and the dashboard's members; a node
// without one has none there.
func TestClusterAdvertisesServeAddr(t *testing.T) {
	dc := startCluster(t, 2, func(i int, c *Config) {
		if i == 1 {
			c.ServeAddr = net.JoinHostPort(c.BindAddr, "0")
		}
	})
	plain, serving := dc.Agents[0], dc.Agents[1]
	if plain.ServeAddr() != "" || serving.ServeAddr() == "" || strings.HasSuffix(serving.ServeAddr(), ":0") {
		t.Fatalf("ServeAddr: %q and %q", plain.ServeAddr(), serving.ServeAddr())
	}
	want := map[string]string{plain.NodeID(): "", serving.NodeID(): serving.ServeAddr()}
	c := client(t, plain)
	poll.Until(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := c.ListNodes(ctx, &pb.ListNodesRequest{})
		if err != nil {
			return err
		}
		got := map[string]string{}
		for _, n := range resp.Nodes {
			got[n.Id] = n.ServeAddr
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("serve addresses in the state: %v, want %v", got, want)
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	info, err := client(t, serving).AgentInfo(ctx, &pb.AgentInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if info.Node.GetServeAddr() != serving.ServeAddr() {
		t.Fatalf("AgentInfo's node has serve_addr %q, want %q", info.Node.GetServeAddr(), serving.ServeAddr())
	}
	poll.Until(t, 30*time.Second, func() error {
		var d struct {
			Members []struct {
				ID        string `json:"id"`
				ServeAddr string `json:"serve_addr"`
			} `json:"members"`
		}
		if err := json.Unmarshal([]byte(httpGet(t, "http://"+plain.HTTPAddr()+"/v1/dashboard")), &d); err != nil {
			return err
		}
		got := map[string]string{}
		for _, m := range d.Members {
			got[m.ID] = m.ServeAddr
		}
		if fmt.Sprint(got) != fmt.Sprint(want) {
			return fmt.Errorf("dashboard members' serve addresses: %v, want %v", got, want)
		}
		return nil
	})
	// The advertised address answers: a /svc/ request for no service gets
	// the serve port's 404.
	resp, err := http.Get("http://" + serving.ServeAddr() + "/svc/none/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("GET through the advertised serve address: %d", resp.StatusCode)
	}
}
