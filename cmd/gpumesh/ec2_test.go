package main

import (
	"bytes"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/deploy/ec2fake"
)

func runCLI(t *testing.T, args ...string) (string, error) {
	t.Helper()
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(args)
	err := root.Execute()
	return out.String(), err
}

func TestEC2UserDataCLI(t *testing.T) {
	out, err := runCLI(t, "ec2", "user-data", "--tag", "gpumesh:cluster=prod", "--binary-url", "https://example.com/gpumesh-{arch}",
		"--agent-arg=--bootstrap-expect=3", "--cuda", "on")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"#!/bin/bash", "--join-ec2-tag=gpumesh:cluster=prod --task-user=dynamic --bootstrap-expect=3", "CUDA_MODE='on'",
		"BINARY_URL='https://example.com/gpumesh-{arch}'", "Restart=always"} {
		if !strings.Contains(out, want) {
			t.Errorf("user-data lacks %q", want)
		}
	}
	if _, err := runCLI(t, "ec2", "user-data"); err == nil || !strings.Contains(err.Error(), "--tag") {
		t.Fatalf("missing --tag: %v", err)
	}
	// A flag the agent does not have would crash-loop every instance.
	_, err = runCLI(t, "ec2", "user-data", "--tag", "gpumesh:cluster=prod", "--agent-arg=--bootstrap-expct=3")
	if err == nil || !strings.Contains(err.Error(), "bootstrap-expct") {
		t.Fatalf("unknown agent flag: %v", err)
	}
	_, err = runCLI(t, "ec2", "user-data", "--tag", "gpumesh:cluster=prod", "--agent-arg=--bootstrap-expect=three")
	if err == nil || !strings.Contains(err.Error(), "three") {
		t.Fatalf("bad agent flag value: %v", err)
	}
	out, err = runCLI(t, "ec2", "user-data", "--tag", "gpumesh:cluster=prod", "--acl-token-secret", "/gpumesh/prod/token")
	if err != nil || !strings.Contains(out, "SECRET_ACL_TOKEN='/gpumesh/prod/token'") {
		t.Fatalf("token secret: %v", err)
	}
}

func TestEC2LaunchDryRunCLI(t *testing.T) {
	out, err := runCLI(t, "ec2", "launch", "--count", "5", "--instance-types", "g5.xlarge,g6.xlarge", "--subnets", "subnet-a,subnet-b",
		"--spot", "--on-demand-base", "3", "--tag", "gpumesh:cluster=prod", "--launch-template", "lt-0abc:4", "--dry-run")
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"Type": "maintain"`, `"LaunchTemplateId": "lt-0abc"`, `"Version": "4"`,
		`"OnDemandTargetCapacity": 3`, `"SpotTargetCapacity": 2`, `"price-capacity-optimized"`} {
		if !strings.Contains(out, want) {
			t.Errorf("dry run lacks %s:\n%s", want, out)
		}
	}
	if strings.Contains(out, "CreateLaunchTemplate") {
		t.Error("dry run with an existing template shows CreateLaunchTemplate")
	}
}

func TestEC2LaunchCLIAgainstFakeEC2(t *testing.T) {
	dir := t.TempDir()
	t.Setenv("AWS_EC2_METADATA_DISABLED", "true")
	t.Setenv("AWS_CONFIG_FILE", filepath.Join(dir, "config"))
	t.Setenv("AWS_SHARED_CREDENTIALS_FILE", filepath.Join(dir, "credentials"))
	t.Setenv("AWS_CA_BUNDLE", "")
	t.Setenv("AWS_ACCESS_KEY_ID", "AKIDTEST")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "SECRETTEST")
	fake := ec2fake.New()
	srv := httptest.NewServer(fake)
	defer srv.Close()
	out, err := runCLI(t, "ec2", "launch", "--count", "3", "--instance-types", "g5.xlarge", "--subnets", "subnet-a",
		"--spot", "--on-demand-base", "1", "--tag", "gpumesh:cluster=dev", "--ami", "ami-0123", "--region", "us-east-1",
		"--ec2-endpoint", srv.URL)
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(out, "Fleet fleet-") || !strings.Contains(out, "(created)") || strings.Count(out, "running") != 3 {
		t.Fatalf("output:\n%s", out)
	}
	if n := len(fake.Requests("CreateFleet")); n != 1 {
		t.Fatalf("%d CreateFleet calls", n)
	}
	id := strings.Fields(out[strings.Index(out, "Fleet fleet-"):])[1]
	out, err = runCLI(t, "ec2", "fleet", id, "--region", "us-east-1", "--ec2-endpoint", srv.URL, "--json")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if !strings.Contains(out, `"total_target_capacity": 3`) || strings.Count(out, `"instance_id"`) != 3 {
		t.Fatalf("fleet status:\n%s", out)
	}
	if _, err := runCLI(t, "ec2", "fleet", "fleet-nope", "--region", "us-east-1", "--ec2-endpoint", srv.URL); err == nil ||
		!strings.Contains(err.Error(), "not found") {
		t.Fatalf("unknown fleet: %v", err)
	}
}

func TestEC2IAMPolicyCLI(t *testing.T) {
	out, err := runCLI(t, "ec2", "iam-policy", "--cluster", "prod")
	if err != nil || !strings.Contains(out, "ec2:DescribeInstances") || strings.Contains(out, "ec2:TerminateInstances") {
		t.Fatalf("%v\n%s", err, out)
	}
	out, err = runCLI(t, "ec2", "iam-policy", "--for", "launcher", "--cluster", "prod", "--role", "gpumesh-agent")
	if err != nil || !strings.Contains(out, `"arn:aws:iam::*:role/gpumesh-agent"`) || !strings.Contains(out, `"aws:RequestTag/gpumesh:cluster": [`) {
		t.Fatalf("%v\n%s", err, out)
	}
	if _, err := runCLI(t, "ec2", "iam-policy", "--for", "launcher", "--cluster", "prod"); err == nil || !strings.Contains(err.Error(), "--role") {
		t.Fatalf("launcher without --role: %v", err)
	}
}

func TestParseTemplateRef(t *testing.T) {
	for in, want := range map[string]string{"lt-1": "lt-1:", "name": "name:", "name:3": "name:3", "lt-1:$Latest": "lt-1:$Latest"} {
		if got := parseTemplateRef(in).String(); got != want {
			t.Errorf("parseTemplateRef(%q) = %q, want %q", in, got, want)
		}
	}
	if r := parseTemplateRef("lt-9:2"); r.ID != "lt-9" || r.Name != "" || r.Version != "2" {
		t.Fatalf("%+v", r)
	}
}
