package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/ec2test"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// A gang job that waits for GPUs makes the leader raise the EC2 Fleet's
// target capacity (through an httptest server speaking the EC2 Query API),
// and `gpumesh nodes` shows why.
func TestFleetScalesOutForWaitingJob(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	f := ec2test.StartFleet(t, 3)
	fake, fleetID := f.Fake, f.ID

	// The agents are the fleet's three instances (on EC2 a node is named by
	// its instance ID), so the autoscaler sees them joined.
	fl, ok := fake.Fleet(fleetID)
	if !ok || len(fl.Instances) != 3 {
		t.Fatalf("fake fleet: %+v", fl)
	}
	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < 3; i++ {
		as = append(as, procs.NewAgent(t, dir, fl.Instances[i], fmt.Sprintf("127.0.0.%d", i+2),
			"--bootstrap-expect", "3", "--ec2", "off", "--fleet-id", fleetID, "--fleet-min", "3", "--fleet-max", "10",
			"--fleet-on-demand-base", "1", "--fleet-interval", "500ms", "--region", ec2test.Region, "--ec2-endpoint", f.Endpoint))
	}
	procs.StartJoined(as)
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 4000))
			}
		}
	})
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	spec := filepath.Join(t.TempDir(), "gpu.yaml")
	if err := os.WriteFile(spec, []byte("name: needs-gpus\nranks: 4\ngpus_per_rank: 2\nexec: {command: [nvidia-smi]}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if _, stderr, err := procs.CLI(ctx, t, as[0].RPCAddr(), "job", "run", "--detach", spec); err != nil {
		t.Fatalf("%v %s", err, stderr)
	}
	poll.Until(t, 30*time.Second, func() error {
		f, ok := fake.Fleet(fleetID)
		if !ok || f.Total <= 3 {
			return fmt.Errorf("fleet target still %d", f.Total)
		}
		if len(fake.Requests("ModifyFleet")) == 0 {
			return fmt.Errorf("no ModifyFleet request")
		}
		return nil
	})
	poll.Until(t, 10*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, as[1].RPCAddr(), "nodes")
		if err != nil || !strings.Contains(out, "fleet: ") || !strings.Contains(out, fleetID) {
			return fmt.Errorf("nodes shows no fleet change: %q %s %v", out, stderr, err)
		}
		return nil
	})
}
