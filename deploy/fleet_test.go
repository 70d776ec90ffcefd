package deploy

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

func spotConfig() LaunchConfig {
	return LaunchConfig{
		Count:         5,
		InstanceTypes: []string{"g5.xlarge", "g6.xlarge"},
		Subnets:       []string{"subnet-a", "subnet-b"},
		Spot:          true,
		OnDemandBase:  3,
		Tag:           Tag{"gpumesh", "prod"},
		ExtraTags:     []Tag{{"team", "ml"}},
		Template:      LaunchTemplateRef{Name: "my-agents", Version: "7"},
	}
}

func wantForm(t *testing.T, form map[string][]string, want map[string]string) {
	t.Helper()
	for k, v := range want {
		if got := form[k]; len(got) != 1 || got[0] != v {
			t.Errorf("request %s = %q, want %q", k, got, v)
		}
	}
}

func TestLaunchExistingTemplateSpot(t *testing.T) {
	fake, c := newFakeEC2(t)
	res, err := Launch(context.Background(), c, spotConfig(), 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	reqs := fake.Requests("CreateFleet")
	if len(reqs) != 1 {
		t.Fatalf("%d CreateFleet calls, want 1", len(reqs))
	}
	if n := len(fake.Requests("CreateLaunchTemplate")); n != 0 {
		t.Fatalf("CreateLaunchTemplate called %d times with an existing template", n)
	}
	wantForm(t, reqs[0].Form, map[string]string{
		"Type": "maintain",
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateName": "my-agents",
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version":            "7",
		"LaunchTemplateConfigs.1.Overrides.1.InstanceType":                       "g5.xlarge",
		"LaunchTemplateConfigs.1.Overrides.1.SubnetId":                           "subnet-a",
		"LaunchTemplateConfigs.1.Overrides.2.InstanceType":                       "g5.xlarge",
		"LaunchTemplateConfigs.1.Overrides.2.SubnetId":                           "subnet-b",
		"LaunchTemplateConfigs.1.Overrides.3.InstanceType":                       "g6.xlarge",
		"LaunchTemplateConfigs.1.Overrides.3.SubnetId":                           "subnet-a",
		"LaunchTemplateConfigs.1.Overrides.4.InstanceType":                       "g6.xlarge",
		"LaunchTemplateConfigs.1.Overrides.4.SubnetId":                           "subnet-b",
		"SpotOptions.AllocationStrategy":                                         "price-capacity-optimized",
		"SpotOptions.InstanceInterruptionBehavior":                               "terminate",
		"TargetCapacitySpecification.TotalTargetCapacity":                        "5",
		"TargetCapacitySpecification.OnDemandTargetCapacity":                     "3",
		"TargetCapacitySpecification.SpotTargetCapacity":                         "2",
		"TargetCapacitySpecification.DefaultTargetCapacityType":                  "spot",
		"ExcessCapacityTerminationPolicy":                                        "no-termination",
		"ReplaceUnhealthyInstances":                                              "true",
		"TagSpecification.1.ResourceType":                                        "fleet",
		"TagSpecification.1.Tag.1.Key":                                           "gpumesh",
		"TagSpecification.1.Tag.1.Value":                                         "prod",
		"TagSpecification.1.Tag.2.Key":                                           "gpumesh:cluster",
		"TagSpecification.1.Tag.3.Key":                                           "team",
		"TagSpecification.1.Tag.3.Value":                                         "ml",
	})
	if _, ok := reqs[0].Form["LaunchTemplateConfigs.1.Overrides.5.InstanceType"]; ok {
		t.Error("more than 2×2 overrides")
	}
	if _, ok := reqs[0].Form["SpotOptions.MaintenanceStrategies.CapacityRebalance.ReplacementStrategy"]; ok {
		t.Error("capacity rebalance set without CapacityRebalance")
	}
	// Decoded answers: fleet ID, status, and the instances with lifecycles.
	if !strings.HasPrefix(res.FleetID, "fleet-") || res.CreatedTemplate {
		t.Fatalf("result %+v", res)
	}
	if res.Status.TotalTarget != 5 || res.Status.OnDemandTarget != 3 || res.Status.SpotTarget != 2 ||
		res.Status.Fulfilled != 5 || res.Status.State != "active" {
		t.Fatalf("status %+v", res.Status)
	}
	var spot, od int
	for _, in := range res.Instances {
		if in.PrivateIP == "" || in.State != "running" || !strings.HasPrefix(in.InstanceID, "i-") {
			t.Fatalf("instance %+v", in)
		}
		switch in.Lifecycle {
		case "spot":
			spot++
		case "on-demand":
			od++
		}
	}
	if spot != 2 || od != 3 {
		t.Fatalf("%d spot and %d on-demand instances, want 2 and 3: %+v", spot, od, res.Instances)
	}
}

func TestLaunchNewTemplateTagsInstances(t *testing.T) {
	fake, c := newFakeEC2(t)
	cfg := spotConfig()
	cfg.Template = LaunchTemplateRef{}
	cfg.CapacityRebalance = true
	cfg.NewTemplate = &NewLaunchTemplate{AMI: "ami-0123", UserData: "#!/bin/bash\necho hi\n",
		InstanceProfile: "gpumesh-agent", SecurityGroupIDs: []string{"sg-1"}, KeyName: "ops"}
	res, err := Launch(context.Background(), c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	lt := fake.Requests("CreateLaunchTemplate")
	if len(lt) != 1 {
		t.Fatalf("%d CreateLaunchTemplate calls", len(lt))
	}
	wantForm(t, lt[0].Form, map[string]string{
		"LaunchTemplateName":                                 "gpumesh-prod",
		"LaunchTemplateData.ImageId":                         "ami-0123",
		"LaunchTemplateData.MetadataOptions.HttpTokens":      "required",
		"LaunchTemplateData.IamInstanceProfile.Name":         "gpumesh-agent",
		"LaunchTemplateData.SecurityGroupId.1":               "sg-1",
		"LaunchTemplateData.KeyName":                         "ops",
		"LaunchTemplateData.TagSpecification.1.ResourceType": "instance",
		"LaunchTemplateData.TagSpecification.1.Tag.1.Key":    "gpumesh",
		"LaunchTemplateData.TagSpecification.1.Tag.1.Value":  "prod",
		"LaunchTemplateData.UserData":                        base64.StdEncoding.EncodeToString([]byte(cfg.NewTemplate.UserData)),
	})
	cf := fake.Requests("CreateFleet")[0].Form
	wantForm(t, cf, map[string]string{
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId":    res.LaunchTemplate.ID,
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version":             "1",
		"SpotOptions.MaintenanceStrategies.CapacityRebalance.ReplacementStrategy": "launch",
	})
	if !res.CreatedTemplate || res.LaunchTemplate.Name != "gpumesh-prod" {
		t.Fatalf("result %+v", res)
	}
	// The template's instance tags reach the instances: tag discovery finds
	// every fleet instance.
	d, err := NewTagDiscoverer(c, TagDiscoveryConfig{Tag: cfg.Tag})
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := d.Addrs(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(addrs) != 5 {
		t.Fatalf("discovered %v, want the 5 fleet instances", addrs)
	}
	// A second launch with the same name fails with a hint.
	_, err = Launch(context.Background(), c, cfg, 0, 0)
	if err == nil || !strings.Contains(err.Error(), "--launch-template gpumesh-prod") {
		t.Fatalf("second launch: %v", err)
	}
}

func TestLaunchOnDemandOnlyAndErrors(t *testing.T) {
	fake, c := newFakeEC2(t)
	cfg := LaunchConfig{Count: 3, InstanceTypes: []string{"c7i.large"}, Tag: Tag{"k", "v"}, Template: LaunchTemplateRef{ID: "lt-1"}}
	res, err := Launch(context.Background(), c, cfg, 0, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := fake.Requests("CreateFleet")[0].Form
	wantForm(t, f, map[string]string{
		"TargetCapacitySpecification.DefaultTargetCapacityType":                "on-demand",
		"TargetCapacitySpecification.OnDemandTargetCapacity":                   "3",
		"TargetCapacitySpecification.SpotTargetCapacity":                       "0",
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.LaunchTemplateId": "lt-1",
		"LaunchTemplateConfigs.1.LaunchTemplateSpecification.Version":          "$Default",
		"LaunchTemplateConfigs.1.Overrides.1.InstanceType":                     "c7i.large",
	})
	if _, ok := f["SpotOptions.AllocationStrategy"]; ok {
		t.Error("spot options on an on-demand fleet")
	}
	if _, ok := f["LaunchTemplateConfigs.1.Overrides.1.SubnetId"]; ok {
		t.Error("subnet override without subnets")
	}
	if len(res.Instances) != 3 {
		t.Fatalf("instances %+v", res.Instances)
	}
	fake.FailNext("CreateFleet", "UnauthorizedOperation", "You are not authorized to perform this operation.")
	if _, err := Launch(context.Background(), c, cfg, 0, 0); err == nil || !strings.Contains(err.Error(), "UnauthorizedOperation") {
		t.Fatalf("err = %v, want the EC2 error", err)
	}
}

func TestLaunchConfigValidate(t *testing.T) {
	ok := spotConfig()
	if err := ok.Validate(); err != nil {
		t.Fatal(err)
	}
	cases := map[string]func(*LaunchConfig){
		"count":         func(c *LaunchConfig) { c.Count = 0 },
		"types":         func(c *LaunchConfig) { c.InstanceTypes = nil },
		"bad type":      func(c *LaunchConfig) { c.InstanceTypes = []string{"g5"} },
		"bad subnet":    func(c *LaunchConfig) { c.Subnets = []string{"a"} },
		"base > count":  func(c *LaunchConfig) { c.OnDemandBase = 6 },
		"base no spot":  func(c *LaunchConfig) { c.Spot = false },
		"tag":           func(c *LaunchConfig) { c.Tag = Tag{} },
		"aws tag":       func(c *LaunchConfig) { c.ExtraTags = []Tag{{"aws:x", "y"}} },
		"two templates": func(c *LaunchConfig) { c.Template.ID = "lt-1" },
		"no template":   func(c *LaunchConfig) { c.Template = LaunchTemplateRef{} },
		"new, no ami":   func(c *LaunchConfig) { c.NewTemplate = &NewLaunchTemplate{} },
		"huge user data": func(c *LaunchConfig) {
			c.NewTemplate = &NewLaunchTemplate{AMI: "ami-1", UserData: strings.Repeat("x", 17000)}
		},
	}
	for name, mut := range cases {
		c := spotConfig()
		mut(&c)
		if err := c.Validate(); !errors.Is(err, ErrInvalidConfig) && !errors.Is(err, ErrInvalidTag) {
			t.Errorf("%s: Validate = %v, want an error", name, err)
		}
	}
}

func TestBuildCreateFleetInputIsJSON(t *testing.T) {
	// --dry-run prints this; it must marshal and keep the essentials.
	in, err := BuildCreateFleetInput(spotConfig(), spotConfig().Template)
	if err != nil {
		t.Fatal(err)
	}
	b, err := json.Marshal(in)
	if err != nil {
		t.Fatal(err)
	}
	var back struct {
		Type                        string
		TargetCapacitySpecification struct{ OnDemandTargetCapacity int }
		SpotOptions                 struct{ AllocationStrategy string }
	}
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.Type != "maintain" || back.TargetCapacitySpecification.OnDemandTargetCapacity != 3 ||
		back.SpotOptions.AllocationStrategy != string(types.SpotAllocationStrategyPriceCapacityOptimized) {
		t.Fatalf("dry-run JSON lost fields: %s", b)
	}
	if aws.ToString(in.LaunchTemplateConfigs[0].LaunchTemplateSpecification.LaunchTemplateName) != "my-agents" {
		t.Fatal("template name lost")
	}
}

func TestDescribeFleetNotFound(t *testing.T) {
	_, c := newFakeEC2(t)
	if _, err := DescribeFleet(context.Background(), c, "fleet-nope"); !errors.Is(err, ErrFleetNotFound) {
		t.Fatalf("err = %v, want ErrFleetNotFound", err)
	}
}

func TestMarshalRequestPrunes(t *testing.T) {
	in, err := BuildCreateFleetInput(spotConfig(), spotConfig().Template)
	if err != nil {
		t.Fatal(err)
	}
	b, err := MarshalRequest(in)
	if err != nil {
		t.Fatal(err)
	}
	s := string(b)
	if strings.Contains(s, "null") || strings.Contains(s, `""`) {
		t.Fatalf("unset fields left in:\n%s", s)
	}
	for _, want := range []string{`"Type": "maintain"`, `"AllocationStrategy": "price-capacity-optimized"`,
		`"OnDemandTargetCapacity": 3`, `"SubnetId": "subnet-b"`, `"ReplaceUnhealthyInstances": true`} {
		if !strings.Contains(s, want) {
			t.Errorf("dry-run JSON lacks %s:\n%s", want, s)
		}
	}
}
