package main

import (
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/gpumesh/gpumesh/deploy"
	"github.com/gpumesh/gpumesh/node"
)

// ec2Flags are the agent's EC2 settings: identity from IMDSv2, peers by
// tag, spot interruption and rebalance notices, and fleet scaling. They
// become node.Config.EC2 (ec2Flags.config).
type ec2Flags struct {
	mode string
	c    node.EC2Config
}

func (e *ec2Flags) addFlags(fl *pflag.FlagSet) {
	e.c.IMDS = deploy.DefaultIMDSConfig()
	e.c.Fleet.Policy = deploy.DefaultScalePolicy(3, 0)
	fl.StringVar(&e.mode, "ec2", "auto", "use EC2 instance metadata: auto (when the machine says it is an EC2 instance, or --imds-endpoint is given), on or off")
	fl.StringVar(&e.c.IMDS.Endpoint, "imds-endpoint", "", "instance metadata service URL (default http://169.254.169.254; tests point it at ec2-metadata-mock)")
	fl.DurationVar(&e.c.Watcher.Interval, "imds-poll", 5*time.Second, "how often to poll for spot interruption and rebalance notices")
	fl.StringVar(&e.c.JoinTag, "join-ec2-tag", "", "join the running EC2 instances that carry this tag, KEY=VALUE (retried until joined)")
	fl.StringVar(&e.c.AWS.Region, "region", "", "AWS region for --join-ec2-tag (default: the instance's own)")
	fl.StringVar(&e.c.AWS.Endpoint, "ec2-endpoint", "", "EC2 API endpoint override (a VPC endpoint, or a test server)")
	fl.StringVar(&e.c.Fleet.ID, "fleet-id", "", "EC2 Fleet (type maintain) whose target capacity the leader raises when gang jobs wait and lowers when nodes idle")
	fl.IntVar(&e.c.Fleet.Policy.Min, "fleet-min", e.c.Fleet.Policy.Min, "with --fleet-id: the fewest instances to keep")
	fl.IntVar(&e.c.Fleet.Policy.Max, "fleet-max", 0, "with --fleet-id: the most instances to run (required)")
	fl.IntVar(&e.c.Fleet.OnDemandBase, "fleet-on-demand-base", 3, "with --fleet-id: on-demand instances in the target (the voters)")
	fl.DurationVar(&e.c.Fleet.Interval, "fleet-interval", 30*time.Second, "with --fleet-id: how often the leader reconsiders the target")
	fl.DurationVar(&e.c.Fleet.Policy.IdleAfter, "fleet-idle", e.c.Fleet.Policy.IdleAfter, "with --fleet-id: how long a node must be idle before the fleet shrinks by it")
}

// config turns the flags into the agent's EC2 config; nil when nothing
// EC2 is asked for or detected.
func (e *ec2Flags) config() (*node.EC2Config, error) {
	use := false
	switch e.mode {
	case "on":
		use = true
	case "off":
	case "auto":
		use = e.c.IMDS.Endpoint != "" || onEC2()
	default:
		return nil, fmt.Errorf("--ec2 %q: use auto, on or off", e.mode)
	}
	if !use && e.c.JoinTag == "" && e.c.Fleet.ID == "" {
		return nil, nil
	}
	c := e.c
	if c.IMDS.Endpoint == "" {
		c.IMDS.Endpoint = deploy.DefaultIMDSConfig().Endpoint
	}
	// Without metadata (tag join or fleet only), IMDS is never asked.
	c.IMDS.Disabled = !use
	return &c, nil
}

// onEC2 says whether this machine looks like an EC2 instance, from what
// the hypervisor shows in sysfs (no network traffic).
func onEC2() bool {
	for _, p := range []string{"/sys/devices/virtual/dmi/id/sys_vendor", "/sys/devices/virtual/dmi/id/board_vendor", "/sys/devices/virtual/dmi/id/bios_vendor"} {
		if b, err := os.ReadFile(p); err == nil && strings.Contains(string(b), "Amazon") {
			return true
		}
	}
	if b, err := os.ReadFile("/sys/hypervisor/uuid"); err == nil && strings.HasPrefix(strings.ToLower(string(b)), "ec2") {
		return true
	}
	return false
}
