package node

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/deploy"
	"github.com/gpumesh/gpumesh/deploy/aemmtest"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/ec2test"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// On EC2 (ec2-metadata-mock, IMDSv2 only) the agent reports the instance's
// identity where its config leaves it out, and watches for notices.
func TestEC2Identity(t *testing.T) {
	mock := aemmtest.Start(t, aemmtest.Options{SpotDelay: time.Hour, RebalanceDelay: time.Hour, Values: map[string]string{
		"instance-life-cycle": "spot", "instance-type": "p5.48xlarge", "placement-availability-zone": "us-east-1a",
	}})
	imds := deploy.DefaultIMDSConfig()
	imds.Endpoint = mock
	dc := startCluster(t, 1, func(_ int, c *Config) {
		c.AZ = "configured-az"
		c.EC2 = &EC2Config{AgentConfig: deploy.AgentConfig{IMDS: imds}}
	})
	a := dc.Agents[0]
	if n := a.selfNode(); n.InstanceType != "p5.48xlarge" || n.Az != "configured-az" || n.Region != "us-east-1" || n.Lifecycle != "spot" || n.Name != "node-1" {
		t.Errorf("node record %v: want the instance's type, region and lifecycle, and the configured zone and name", n)
	}
	if a.ec2 == nil || a.ec2.Watcher == nil {
		t.Error("no notice watcher")
	}
}

// A rebalance recommendation keeps new work off the node; an interruption
// notice drains it (notices from an in-memory metadata source, through the
// real watcher).
func TestSpotNotices(t *testing.T) {
	a := startCluster(t, 1, nil).Agents[0]
	md := deploy.NewMemMetadata(deploy.Identity{InstanceID: "i-1", Lifecycle: deploy.LifecycleSpot})
	w, err := deploy.StartWatcher(a.ctx, md, deploy.WatcherConfig{Interval: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(w.Stop)
	a.goFunc(func() { a.spotLoop(w.Events()) })
	self := func() *pb.Node { return a.raft.State().Node(a.NodeID()) }

	md.Rebalance(time.Now())
	poll.Until(t, 20*time.Second, func() error {
		if n := self(); !n.Ineligible || n.Status != consensus.NodeReady {
			return fmt.Errorf("after a rebalance recommendation: ineligible %v, status %s", n.Ineligible, n.Status)
		}
		return nil
	})
	md.Interrupt("terminate", time.Now().Add(2*time.Minute))
	poll.Until(t, 20*time.Second, func() error {
		if n := self(); n.Status != consensus.NodeDraining {
			return fmt.Errorf("after an interruption notice: status %s, want %s", n.Status, consensus.NodeDraining)
		}
		return nil
	})
}

// The leader raises an EC2 Fleet's target (an in-process EC2 API) while a
// gang job waits for GPUs the cluster lacks, and records why.
func TestFleetScalesOutWhileJobWaits(t *testing.T) {
	fl := ec2test.StartFleet(t, 1)
	fake, fleetID := fl.Fake, fl.ID
	dc := startCluster(t, 1, func(_ int, c *Config) {
		c.EC2 = &EC2Config{
			AgentConfig: deploy.AgentConfig{IMDS: deploy.IMDSConfig{Disabled: true}, AWS: deploy.AWSConfig{Region: ec2test.Region, Endpoint: fl.Endpoint}},
			Fleet:       FleetConfig{ID: fleetID, Policy: deploy.DefaultScalePolicy(1, 10), Interval: 100 * time.Millisecond},
		}
	})
	a := dc.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	submitJob(t, client(t, a), "name: needs-gpus\nranks: 4\ngpus_per_rank: 2\nexec: {command: [nvidia-smi]}\n")
	poll.Until(t, 20*time.Second, func() error {
		if f, _ := fake.Fleet(fleetID); f.Total <= 1 {
			return fmt.Errorf("fleet target still %d", f.Total)
		}
		if s := a.lastScale(); !strings.Contains(s, fleetID) {
			return fmt.Errorf("last scale %q does not name the fleet", s)
		}
		return nil
	})
}

// A service scaled by load that needs more replicas than the cluster can
// hold raises the fleet's target: the routers' load (reported here through
// the Control API as if from a router) scales it out to max_replicas, the
// replica slots no node can take count as demand.
func TestFleetScalesOutForAServiceUnderLoad(t *testing.T) {
	needSystemPython(t)
	fl := ec2test.StartFleet(t, 1)
	fake, fleetID := fl.Fake, fl.ID
	dc := startCluster(t, 1, func(_ int, c *Config) {
		c.MaxRanksPerNode = 1
		c.EC2 = &EC2Config{
			AgentConfig: deploy.AgentConfig{IMDS: deploy.IMDSConfig{Disabled: true}, AWS: deploy.AWSConfig{Region: ec2test.Region, Endpoint: fl.Endpoint}},
			Fleet:       FleetConfig{ID: fleetID, Policy: deploy.DefaultScalePolicy(1, 10), Interval: 100 * time.Millisecond},
		}
	})
	a := dc.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	c := client(t, a)
	id := submitJob(t, c, `
name: web
type: service
exec:
  command: [/usr/bin/python3, -c, "import http.server, os; http.server.HTTPServer((os.environ['GPUMESH_HOST'], int(os.environ['GPUMESH_PORT_HTTP'])), http.server.SimpleHTTPRequestHandler).serve_forever()"]
service:
  min_replicas: 1
  max_replicas: 3
  target_in_flight: 2
  check: {type: tcp, interval: 200ms, timeout: 150ms, threshold: 2, grace: 30s}
`)
	waitJob(t, c, id, 30*time.Second, func(r *pb.GetJobResponse) bool {
		return len(r.Allocations) == 1 && r.Allocations[0].Health == HealthHealthy
	})
	if f, _ := fake.Fleet(fleetID); f.Total != 1 {
		t.Fatalf("fleet target %d before any load, want 1", f.Total)
	}
	poll.Until(t, 20*time.Second, func() error {
		if _, err := c.ReportLoad(ctx, &pb.ReportLoadRequest{NodeId: "router", Services: []*pb.ServiceLoad{{JobId: id, InFlight: 6}}}); err != nil {
			return err
		}
		r, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
		if err != nil {
			return err
		}
		if r.Job.WorldSize != 3 {
			return fmt.Errorf("%d replicas wanted, want 3 for 6 in flight at 2 each", r.Job.WorldSize)
		}
		if f, _ := fake.Fleet(fleetID); f.Total <= 1 {
			return fmt.Errorf("fleet target still %d with two replicas unplaced (%s)", f.Total, r.Job.StatusReason)
		}
		return nil
	})
}
