package deploy

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/deploy/ec2fake"
)

func TestTagDiscovererPaginates(t *testing.T) {
	fake, c := newFakeEC2(t)
	var want []string
	for i := 0; i < 12; i++ {
		ip := fmt.Sprintf("10.1.0.%d", 10+i)
		fake.AddInstance(ec2fake.Instance{PrivateIP: ip, Tags: map[string]string{"gpumesh": "prod"}})
		want = append(want, ip)
	}
	// Not peers: another cluster, untagged, stopped, terminated.
	fake.AddInstance(ec2fake.Instance{PrivateIP: "10.9.0.1", Tags: map[string]string{"gpumesh": "dev"}})
	fake.AddInstance(ec2fake.Instance{PrivateIP: "10.9.0.2"})
	fake.AddInstance(ec2fake.Instance{PrivateIP: "10.9.0.3", State: "stopped", Tags: map[string]string{"gpumesh": "prod"}})
	fake.AddInstance(ec2fake.Instance{PrivateIP: "10.9.0.4", State: "terminated", Tags: map[string]string{"gpumesh": "prod"}})

	d, err := NewTagDiscoverer(c, TagDiscoveryConfig{Tag: Tag{"gpumesh", "prod"}, PageSize: 5})
	if err != nil {
		t.Fatal(err)
	}
	got, err := d.Addrs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("Addrs = %v\nwant %v", got, want)
	}
	reqs := fake.Requests("DescribeInstances")
	// 12 matches at 5 per page: 3 pages, following NextToken.
	if len(reqs) != 3 {
		t.Fatalf("%d DescribeInstances calls, want 3 pages", len(reqs))
	}
	wantForm(t, reqs[0].Form, map[string]string{
		"Filter.1.Name": "tag:gpumesh", "Filter.1.Value.1": "prod",
		"Filter.2.Name": "instance-state-name", "Filter.2.Value.1": "running",
		"MaxResults": "5",
	})
	if reqs[0].Form.Get("NextToken") != "" || reqs[1].Form.Get("NextToken") == "" || reqs[2].Form.Get("NextToken") == "" {
		t.Fatal("pages did not follow NextToken")
	}
}

func TestTagDiscovererErrors(t *testing.T) {
	fake, c := newFakeEC2(t)
	fake.FailNext("DescribeInstances", "UnauthorizedOperation", "not authorized to perform ec2:DescribeInstances")
	d, err := NewTagDiscoverer(c, TagDiscoveryConfig{Tag: Tag{"k", "v"}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Addrs(context.Background()); err == nil || !strings.Contains(err.Error(), "ec2:DescribeInstances") {
		t.Fatalf("err = %v", err)
	}
	// Nothing tagged yet is not an error: the caller retries.
	if got, err := d.Addrs(context.Background()); err != nil || len(got) != 0 {
		t.Fatalf("empty world: %v, %v", got, err)
	}
	if _, err := NewTagDiscoverer(c, TagDiscoveryConfig{Tag: Tag{"k", "v"}, PageSize: 2}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("page size 2: %v", err)
	}
	if _, err := NewTagDiscoverer(nil, TagDiscoveryConfig{Tag: Tag{"k", "v"}}); !errors.Is(err, ErrInvalidConfig) {
		t.Fatalf("nil client: %v", err)
	}
}

func TestParseTag(t *testing.T) {
	for in, want := range map[string]Tag{"a=b": {"a", "b"}, "gpumesh:cluster=prod": {"gpumesh:cluster", "prod"},
		"k=": {"k", ""}, "k=v=w": {"k", "v=w"}} {
		got, err := ParseTag(in)
		if err != nil || got != want {
			t.Errorf("ParseTag(%q) = %v, %v", in, got, err)
		}
	}
	for _, in := range []string{"", "novalue", "=v", "aws:x=y", strings.Repeat("k", 129) + "=v"} {
		if _, err := ParseTag(in); !errors.Is(err, ErrInvalidTag) {
			t.Errorf("ParseTag(%q) = %v, want ErrInvalidTag", in, err)
		}
	}
}
