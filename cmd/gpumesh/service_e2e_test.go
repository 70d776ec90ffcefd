package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"

	"github.com/gpumesh/gpumesh/deploy/aemmtest"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// serviceJSON is what `gpumesh service status NAME --json` prints.
type serviceJSON struct {
	Job struct {
		ID string `json:"id"`
	} `json:"job"`
	Allocations []struct {
		ID            string `json:"id"`
		Rank          int    `json:"rank"`
		NodeName      string `json:"node_name"`
		DesiredStatus string `json:"desired_status"`
		ClientStatus  string `json:"client_status"`
		Health        string `json:"health"`
	} `json:"allocations"`
}

// healthyOn returns the nodes of the service's healthy replicas that are
// to run, and whether any replica (live or not yet stopped) is on node.
func (s *serviceJSON) healthyOn(node string) (healthy []string, on bool) {
	for _, al := range s.Allocations {
		live := al.ClientStatus == "running" || al.ClientStatus == "pending"
		if al.NodeName == node && live {
			on = true
		}
		if al.DesiredStatus == "run" && al.ClientStatus == "running" && al.Health == "healthy" {
			healthy = append(healthy, al.NodeName)
		}
	}
	sort.Strings(healthy)
	return healthy, on
}

// Issue 20's acceptance: three agents, a 2-replica service on the two spot
// nodes, a steady load through the on-demand node (which has no replica);
// the ec2-metadata-mock interrupts one replica's node. Its replica is moved
// and not one request fails.
func TestServiceSpotNoticeLosesNoRequest(t *testing.T) {
	needSystemPython(t)
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	const noticeDelay = 30 * time.Second
	rate := loadRate(t, 100)
	procs.Binary(t)
	aemmtest.Binary(t)
	mock := aemmtest.Start(t, aemmtest.Options{SpotDelay: noticeDelay, RebalanceDelay: time.Hour, IPCount: -1, Values: map[string]string{
		"instance-life-cycle": "spot", "instance-type": "g5.xlarge", "placement-availability-zone": "us-east-1a",
	}})
	noticeAt := time.Now().Add(noticeDelay)
	dir := t.TempDir()
	victim := procs.NewAgent(t, dir, "agent-1", "127.0.0.2", "--bootstrap-expect", "3", "--imds-endpoint", mock, "--imds-poll", "500ms")
	spot := procs.NewAgent(t, dir, "agent-2", "127.0.0.3", "--bootstrap-expect", "3", "--ec2", "off", "--lifecycle", "spot", "--az", "us-east-1a")
	router := procs.NewAgent(t, dir, "agent-3", "127.0.0.4", "--bootstrap-expect", "3", "--ec2", "off", "--lifecycle", "on-demand", "--az", "us-east-1a")
	as := []*procs.Agent{victim, spot, router}
	procs.StartJoined(as)
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 6000))
			}
		}
	})
	server, err := filepath.Abs("../../examples/service/server.py")
	if err != nil {
		t.Fatal(err)
	}
	spec := filepath.Join(t.TempDir(), "mlp.yaml")
	if err := os.WriteFile(spec, []byte(fmt.Sprintf(`
name: mlp
type: service
replicas: 2
placement: spread
constraints: {lifecycle: spot}
exec:
  command: [/usr/bin/python3, %q]
  env: {SERVE_NO_TORCH: "1"}
service:
  check: {path: /healthz, interval: 250ms, timeout: 200ms, threshold: 2, grace: 30s}
`, server)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	if _, stderr, err := procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", spec); err != nil {
		t.Fatalf("job run: %v %s", err, stderr)
	}
	status := func() (*serviceJSON, error) {
		var s serviceJSON
		err := procs.CLIJSON(ctx, t, router.RPCAddr(), &s, "service", "status", "mlp")
		return &s, err
	}
	poll.Until(t, 60*time.Second, func() error {
		s, err := status()
		if err != nil {
			return err
		}
		if h, _ := s.healthyOn(""); strings.Join(h, ",") != "agent-1,agent-2" {
			return fmt.Errorf("healthy replicas on %v, want agent-1 and agent-2", h)
		}
		return nil
	})
	if time.Now().After(noticeAt) {
		t.Fatalf("the cluster took too long to set up: the notice has fired already")
	}

	// A steady load through the node without a replica: steady holds the
	// requests sent before the notice, moving those from the notice until
	// the old replica has stopped.
	var steady, moving vegeta.Metrics
	var movedAt time.Time
	load := startLoad(t, "spot", postTarget("http://"+router.HTTPAddr()+"/svc/mlp/predict", `{"x": [1, 2, 3, 4]}`), rate, func(res *vegeta.Result) {
		switch {
		case res.Timestamp.Before(noticeAt):
			steady.Add(res)
		case movedAt.IsZero() || res.Timestamp.Before(movedAt):
			moving.Add(res)
		}
	})

	// The notice fires: the replica moves off agent-1.
	poll.Until(t, 90*time.Second, func() error {
		if time.Now().Before(noticeAt) {
			return fmt.Errorf("notice not due yet")
		}
		s, err := status()
		if err != nil {
			return err
		}
		h, on := s.healthyOn(victim.Name)
		if on || len(h) != 2 {
			return fmt.Errorf("healthy replicas on %v, a replica still on %s: %v", h, victim.Name, on)
		}
		return nil
	})
	// 200 more requests on the moved service, then the verdict.
	load.locked(func() { movedAt = time.Now() })
	load.waitMore(t, 200, 30*time.Second)
	m := load.verdict(t, 100)
	load.locked(func() {
		steady.Close()
		moving.Close()
		t.Logf("%d requests at %.0f/s through %s: success %.4f, latency p50 %s p99 %s max %s; before the notice p99 %s (%d requests); from the notice until the old replica stopped (%s) p99 %s (%d requests)",
			m.Requests, m.Rate, router.Name, m.Success, m.Latencies.P50, m.Latencies.P99, m.Latencies.Max,
			steady.Latencies.P99, steady.Requests, movedAt.Sub(noticeAt).Round(time.Millisecond), moving.Latencies.P99, moving.Requests)
	})
}

// loadRate returns the requests/s of a service test's load:
// $GPUMESH_SERVICE_RATE when set (a measurement at another rate), else def.
func loadRate(t *testing.T, def int) int {
	t.Helper()
	v := os.Getenv("GPUMESH_SERVICE_RATE")
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("GPUMESH_SERVICE_RATE=%q: want a number of requests per second >= 1", v)
	}
	return n
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
