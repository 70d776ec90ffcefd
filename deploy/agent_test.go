package deploy

import (
	"context"
	"errors"
	"strconv"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/gpumesh/gpumesh/deploy/ec2fake"
)

func TestStartAgentEC2OnEC2(t *testing.T) {
	endpoint := startAEMM(t, aemmOptions{spotDelay: 2 * time.Second, rebalanceDelay: time.Hour,
		values: map[string]string{"instance-life-cycle": "spot", "placement-region": "eu-west-1", "placement-availability-zone": "eu-west-1b"}})
	fake, _ := newFakeEC2(t) // also makes the AWS environment hermetic
	fake.AddInstance(ec2fake.Instance{PrivateIP: "10.0.0.5", Tags: map[string]string{"gpumesh:cluster": "t"}})
	srvURL := fakeURL(t, fake)
	a, err := StartAgentEC2(context.Background(), AgentConfig{
		IMDS:    IMDSConfig{Endpoint: endpoint},
		Watcher: WatcherConfig{Interval: 100 * time.Millisecond},
		JoinTag: "gpumesh:cluster=t",
		AWS:     AWSConfig{Endpoint: srvURL, Credentials: credentials.NewStaticCredentialsProvider("a", "b", "")},
		Logger:  testLogger(t),
	})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown()
	if !a.Identity.OnEC2() || a.Identity.Lifecycle != LifecycleSpot || a.Identity.Region != "eu-west-1" {
		t.Fatalf("identity %+v", a.Identity)
	}
	addrs, err := a.Discoverer.Addrs(context.Background())
	if err != nil || len(addrs) != 1 || addrs[0] != "10.0.0.5" {
		t.Fatalf("addrs %v, %v", addrs, err)
	}
	// The region came from the identity.
	if reqs := fake.Requests("DescribeInstances"); len(reqs) != 1 {
		t.Fatalf("%d DescribeInstances", len(reqs))
	}
	ev := recv(t, a.Events(), 30*time.Second)
	if ev.Kind != EventInterruption {
		t.Fatalf("event %+v", ev)
	}
	a.Shutdown()
	a.Shutdown() // idempotent
}

func TestStartAgentEC2OffEC2(t *testing.T) {
	closed := "http://127.0.0.1:" + strconv.Itoa(freePort(t))
	a, err := StartAgentEC2(context.Background(), AgentConfig{IMDS: IMDSConfig{Endpoint: closed, ProbeTimeout: 200 * time.Millisecond}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown()
	if a.Identity != UnknownIdentity() || a.Watcher != nil || a.Discoverer != nil || a.Events() != nil {
		t.Fatalf("off EC2: %+v", a)
	}
	// A join tag off EC2 needs a region.
	_, err = StartAgentEC2(context.Background(), AgentConfig{IMDS: IMDSConfig{Endpoint: closed, ProbeTimeout: 200 * time.Millisecond},
		JoinTag: "k=v"})
	if !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("join tag without region: %v", err)
	}
	if _, err := StartAgentEC2(context.Background(), AgentConfig{IMDS: IMDSConfig{Endpoint: closed, ProbeTimeout: 200 * time.Millisecond},
		JoinTag: "novalue", AWS: AWSConfig{Region: "us-east-1"}}); !errors.Is(err, ErrInvalidTag) {
		t.Fatalf("bad tag: %v", err)
	}
}

func TestStartAgentEC2Disabled(t *testing.T) {
	// Even with a live mock, a disabled IMDS is never asked.
	endpoint := startAEMM(t, aemmOptions{})
	a, err := StartAgentEC2(context.Background(), AgentConfig{IMDS: IMDSConfig{Endpoint: endpoint, Disabled: true}})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Shutdown()
	if a.Identity.OnEC2() || a.Watcher != nil {
		t.Fatalf("disabled IMDS was used: %+v", a)
	}
	m, _ := NewIMDS(IMDSConfig{Endpoint: endpoint, Disabled: true})
	if _, err := m.Get(context.Background(), "instance-id"); !errors.Is(err, ErrNotOnEC2) {
		t.Fatalf("Get on a disabled IMDS: %v", err)
	}
}
