package main

import (
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	ec2types "github.com/aws/aws-sdk-go-v2/service/ec2/types"

	"github.com/gpumesh/gpumesh/deploy"
	"github.com/gpumesh/gpumesh/deploy/ec2fake"
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
	fake := ec2fake.New()
	srv := httptest.NewServer(fake)
	defer srv.Close()
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "secret")
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	client, err := deploy.NewEC2Client(context.Background(), deploy.AWSConfig{Region: "us-east-1", Endpoint: srv.URL})
	if err != nil {
		t.Fatal(err)
	}
	out, err := client.CreateFleet(context.Background(), &ec2.CreateFleetInput{
		Type: ec2types.FleetTypeMaintain,
		LaunchTemplateConfigs: []ec2types.FleetLaunchTemplateConfigRequest{{
			LaunchTemplateSpecification: &ec2types.FleetLaunchTemplateSpecificationRequest{LaunchTemplateId: aws.String("lt-1"), Version: aws.String("$Latest")},
		}},
		TargetCapacitySpecification: &ec2types.TargetCapacitySpecificationRequest{TotalTargetCapacity: aws.Int32(3), DefaultTargetCapacityType: ec2types.DefaultTargetCapacityTypeSpot},
	})
	if err != nil {
		t.Fatal(err)
	}
	fleetID := aws.ToString(out.FleetId)

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
			"--fleet-on-demand-base", "1", "--fleet-interval", "500ms", "--region", "us-east-1", "--ec2-endpoint", srv.URL))
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
