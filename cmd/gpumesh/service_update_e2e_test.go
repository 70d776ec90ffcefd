package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// Issue 20 point 5: `job run` of a changed spec for a running service
// updates it in place (the same job), its replicas are replaced one at a
// time while a steady load goes through a node without a replica, and not
// one request fails. Running the same spec again is a no-op that says so.
func TestServiceRollingUpdateLosesNoRequest(t *testing.T) {
	needSystemPython(t)
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	procs.Binary(t)
	dir := t.TempDir()
	a1 := procs.NewAgent(t, dir, "agent-1", "127.0.0.2", "--bootstrap-expect", "3", "--ec2", "off", "--lifecycle", "spot")
	a2 := procs.NewAgent(t, dir, "agent-2", "127.0.0.3", "--bootstrap-expect", "3", "--ec2", "off", "--lifecycle", "spot")
	router := procs.NewAgent(t, dir, "agent-3", "127.0.0.4", "--bootstrap-expect", "3", "--ec2", "off", "--lifecycle", "on-demand")
	as := []*procs.Agent{a1, a2, router}
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
	writeSpec := func(version string, replicas int) string {
		p := filepath.Join(t.TempDir(), "mlp.yaml")
		if err := os.WriteFile(p, []byte(fmt.Sprintf(`
name: mlp
type: service
replicas: %d
placement: spread
constraints: {lifecycle: spot}
exec:
  command: [/usr/bin/python3, %q]
  env: {SERVE_NO_TORCH: "1", MODEL_VERSION: %q}
service:
  check: {path: /healthz, interval: 250ms, timeout: 200ms, threshold: 2, grace: 30s}
`, replicas, server, version)), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	v1, v2 := writeSpec("1", 2), writeSpec("2", 2)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	if _, stderr, err := procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", v1); err != nil {
		t.Fatalf("job run: %v %s", err, stderr)
	}
	type status struct {
		Job struct {
			ID             string `json:"id"`
			SpecGeneration uint64 `json:"spec_generation"`
		} `json:"job"`
		Allocations []struct {
			ID            string `json:"id"`
			Generation    uint64 `json:"generation"`
			DesiredStatus string `json:"desired_status"`
			ClientStatus  string `json:"client_status"`
			Health        string `json:"health"`
		} `json:"allocations"`
	}
	// serving returns the service and how many of its replicas to run are
	// healthy on the current spec and on an older one.
	serving := func() (s status, cur, old int, err error) {
		if err = procs.CLIJSON(ctx, t, router.RPCAddr(), &s, "service", "status", "mlp"); err != nil {
			return
		}
		for _, al := range s.Allocations {
			if al.DesiredStatus != "run" || al.ClientStatus != "running" || al.Health != "healthy" {
				continue
			}
			if al.Generation >= s.Job.SpecGeneration {
				cur++
			} else {
				old++
			}
		}
		return
	}
	var jobID string
	poll.Until(t, 60*time.Second, func() error {
		s, cur, _, err := serving()
		if err != nil {
			return err
		}
		if cur != 2 {
			return fmt.Errorf("%d healthy replicas, want 2", cur)
		}
		jobID = s.Job.ID
		return nil
	})

	load := startLoad(t, "update", postTarget("http://"+router.HTTPAddr()+"/svc/mlp/predict", `{"x": [1, 2, 3, 4]}`), 100, nil)

	out, stderr, err := procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", v2)
	if err != nil || !strings.Contains(out, "updated") || !strings.Contains(out, jobID) {
		t.Fatalf("job run of the changed spec: %v %q %s; want an update of job %s", err, out, stderr, jobID)
	}
	poll.Until(t, 90*time.Second, func() error {
		s, cur, old, err := serving()
		if err != nil {
			return err
		}
		if s.Job.ID != jobID || s.Job.SpecGeneration == 0 || cur != 2 || old != 0 {
			return fmt.Errorf("job %s (spec generation %d): %d healthy replicas on the new spec, %d on the old", s.Job.ID, s.Job.SpecGeneration, cur, old)
		}
		return nil
	})
	// 200 more requests on the updated service, then the verdict.
	load.waitMore(t, 200, 30*time.Second)
	m := load.verdict(t, 100)
	t.Logf("%d requests at %.0f/s through %s during the rolling update: success %.4f, latency p50 %s p99 %s max %s",
		m.Requests, m.Rate, router.Name, m.Success, m.Latencies.P50, m.Latencies.P99, m.Latencies.Max)
	out, stderr, err = procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", v2)
	if err != nil || !strings.Contains(out, "nothing to do") {
		t.Fatalf("job run of the same spec again: %v %q %s; want it to say there is nothing to do", err, out, stderr)
	}
	// The same spec with another replica count scales: no replica is
	// replaced, one of the two serving ones is stopped.
	s, _, _, err := serving()
	if err != nil {
		t.Fatal(err)
	}
	// running returns the IDs of the replicas told to run that are running.
	running := func(s status) []string {
		var ids []string
		for _, al := range s.Allocations {
			if al.DesiredStatus == "run" && al.ClientStatus == "running" {
				ids = append(ids, al.ID)
			}
		}
		return ids
	}
	before, gen := map[string]bool{}, s.Job.SpecGeneration
	for _, id := range running(s) {
		before[id] = true
	}
	out, stderr, err = procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", writeSpec("2", 1))
	if err != nil || !strings.Contains(out, "scaled") || !strings.Contains(out, jobID) {
		t.Fatalf("job run with only replicas changed: %v %q %s; want job %s scaled", err, out, stderr, jobID)
	}
	poll.Until(t, 60*time.Second, func() error {
		s, cur, old, err := serving()
		if err != nil {
			return err
		}
		run := running(s)
		if s.Job.SpecGeneration != gen || cur != 1 || old != 0 || len(run) != 1 || !before[run[0]] {
			return fmt.Errorf("spec generation %d (was %d), healthy %d current %d old, running %v (before %v)", s.Job.SpecGeneration, gen, cur, old, run, before)
		}
		return nil
	})
}
