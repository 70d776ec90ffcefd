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

// Issue 20 point 6: a service scaled by load (1..3 replicas, 2 requests in
// flight per replica) grows to max_replicas while a load keeps about 10
// requests in flight through a router, and shrinks back to min_replicas
// once the load falls and the cooldown has passed; a light load that runs
// through both moves sees no failed request.
func TestServiceScalesWithLoad(t *testing.T) {
	needSystemPython(t)
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	procs.Binary(t)
	dir := t.TempDir()
	var as []*procs.Agent
	for i := 1; i <= 3; i++ {
		as = append(as, procs.NewAgent(t, dir, fmt.Sprintf("agent-%d", i), fmt.Sprintf("127.0.0.%d", i+1), "--bootstrap-expect", "3", "--ec2", "off"))
	}
	procs.StartJoined(as)
	router := as[2]
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
placement: spread
exec:
  command: [/usr/bin/python3, %q]
  env: {SERVE_NO_TORCH: "1"}
service:
  min_replicas: 1
  max_replicas: 3
  target_in_flight: 2
  scale_in_cooldown: 5s
  check: {path: /healthz, interval: 250ms, timeout: 200ms, threshold: 2, grace: 30s}
`, server)), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	if _, stderr, err := procs.CLI(ctx, t, router.RPCAddr(), "job", "run", "--detach", spec); err != nil {
		t.Fatalf("job run: %v %s", err, stderr)
	}
	// replicas returns the replicas told to run and how many of them are
	// healthy, and the live replicas told to stop (draining).
	replicas := func() (run, healthy, stopping int, err error) {
		var s serviceJSON
		if err = procs.CLIJSON(ctx, t, router.RPCAddr(), &s, "service", "status", "mlp"); err != nil {
			return
		}
		for _, al := range s.Allocations {
			live := al.ClientStatus == "running" || al.ClientStatus == "pending"
			switch {
			case al.DesiredStatus == "run" && live:
				run++
				if al.Health == "healthy" {
					healthy++
				}
			case live:
				stopping++
			}
		}
		return
	}
	want := func(timeout time.Duration, n int) {
		t.Helper()
		poll.Until(t, timeout, func() error {
			run, healthy, stopping, err := replicas()
			if err != nil {
				return err
			}
			if run != n || healthy != n || stopping != 0 {
				return fmt.Errorf("%d replicas to run, %d healthy, %d stopping; want %d healthy and none stopping", run, healthy, stopping, n)
			}
			return nil
		})
	}
	want(60*time.Second, 1)

	url := "http://" + router.HTTPAddr() + "/svc/mlp/predict"
	// A light load through both moves: about 0.4 requests in flight.
	light := startLoad(t, "light", postTarget(url, `{"x": [1, 2, 3, 4], "delay_ms": 100}`), 4, nil)
	// About 10 requests in flight (50/s of 200 ms each) for a target of 2
	// per replica: max_replicas.
	heavy := startLoad(t, "heavy", postTarget(url, `{"x": [1, 2, 3, 4], "delay_ms": 200}`), 50, nil)
	want(90*time.Second, 3)
	out, stderr, err := procs.CLI(ctx, t, router.RPCAddr(), "service", "status", "mlp")
	if err != nil || !strings.Contains(out, "3 replicas wanted (scaled by load: 1 to 3, 2 requests in flight per replica)") {
		t.Fatalf("service status at max_replicas: %v %s\n%s", err, stderr, out)
	}
	hm := heavy.verdict(t, 50)
	scaledIn := time.Now()
	want(90*time.Second, 1)
	light.waitMore(t, 8, 30*time.Second)
	lm := light.verdict(t, 10)
	t.Logf("heavy load: %d requests at %.0f/s, p99 %s; light load through the scale-out and the scale-in (%s after the heavy load stopped): %d requests, p99 %s",
		hm.Requests, hm.Rate, hm.Latencies.P99, time.Since(scaledIn).Round(time.Second), lm.Requests, lm.Latencies.P99)
}
