package main

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/spf13/pflag"

	"github.com/gpumesh/gpumesh/deploy"
	"github.com/gpumesh/gpumesh/node"
)

// agentExtensions are the agent's EC2 settings: identity from IMDSv2, peers
// by tag, and spot interruption and rebalance notices.
type agentExtensions struct {
	imdsEndpoint string
	imdsPoll     time.Duration
	ec2Mode      string
	joinTag      string
	region       string
	ec2Endpoint  string

	fleetID      string
	fleetMin     int
	fleetMax     int
	fleetODBase  int
	fleetEvery   time.Duration
	fleetIdleFor time.Duration

	ec2 *deploy.AgentEC2
	ctx context.Context
	cnl context.CancelFunc
}

func (e *agentExtensions) addFlags(fl *pflag.FlagSet) {
	fl.StringVar(&e.ec2Mode, "ec2", "auto", "use EC2 instance metadata: auto (when the machine says it is an EC2 instance, or --imds-endpoint is given), on or off")
	fl.StringVar(&e.imdsEndpoint, "imds-endpoint", "", "instance metadata service URL (default http://169.254.169.254; tests point it at ec2-metadata-mock)")
	fl.DurationVar(&e.imdsPoll, "imds-poll", 5*time.Second, "how often to poll for spot interruption and rebalance notices")
	fl.StringVar(&e.joinTag, "join-ec2-tag", "", "join the running EC2 instances that carry this tag, KEY=VALUE (retried until joined)")
	fl.StringVar(&e.region, "region", "", "AWS region for --join-ec2-tag (default: the instance's own)")
	fl.StringVar(&e.ec2Endpoint, "ec2-endpoint", "", "EC2 API endpoint override (a VPC endpoint, or a test server)")
	fl.StringVar(&e.fleetID, "fleet-id", "", "EC2 Fleet (type maintain) whose target capacity the leader raises when gang jobs wait and lowers when nodes idle")
	fl.IntVar(&e.fleetMin, "fleet-min", 3, "with --fleet-id: the fewest instances to keep")
	fl.IntVar(&e.fleetMax, "fleet-max", 0, "with --fleet-id: the most instances to run (required)")
	fl.IntVar(&e.fleetODBase, "fleet-on-demand-base", 3, "with --fleet-id: on-demand instances in the target (the voters)")
	fl.DurationVar(&e.fleetEvery, "fleet-interval", 30*time.Second, "with --fleet-id: how often the leader reconsiders the target")
	fl.DurationVar(&e.fleetIdleFor, "fleet-idle", 10*time.Minute, "with --fleet-id: how long a node must be idle before the fleet shrinks by it")
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

// apply reads the EC2 identity into the config before the agent starts.
func (e *agentExtensions) apply(ctx context.Context, c *node.Config) error {
	use := false
	switch e.ec2Mode {
	case "on":
		use = true
	case "off":
	case "auto":
		use = e.imdsEndpoint != "" || onEC2()
	default:
		return fmt.Errorf("--ec2 %q: use auto, on or off", e.ec2Mode)
	}
	if e.fleetID != "" {
		if err := e.setupFleet(c); err != nil {
			return err
		}
	}
	if !use && e.joinTag == "" {
		return nil
	}
	e.ctx, e.cnl = context.WithCancel(context.Background())
	cfg := deploy.AgentConfig{
		IMDS:    deploy.DefaultIMDSConfig(),
		Watcher: deploy.WatcherConfig{Interval: e.imdsPoll},
		JoinTag: e.joinTag,
		AWS:     deploy.AWSConfig{Region: e.region, Endpoint: e.ec2Endpoint},
		Logger:  c.Logger,
	}
	if e.imdsEndpoint != "" {
		cfg.IMDS.Endpoint = e.imdsEndpoint
	}
	if !use {
		// Tag join without metadata: IMDS is never asked.
		cfg.IMDS.Disabled = true
	}
	if c.BindAddr != "" && c.BindAddr != "0.0.0.0" && strings.HasPrefix(c.BindAddr, "127.") {
		cfg.IMDS.SourceAddr = c.BindAddr
	}
	a, err := deploy.StartAgentEC2(e.ctx, cfg)
	if err != nil {
		e.cnl()
		return err
	}
	e.ec2 = a
	id := a.Identity
	if id.OnEC2() {
		if c.InstanceType == "" {
			c.InstanceType = id.InstanceType
		}
		if c.AZ == "" {
			c.AZ = id.AvailabilityZone
		}
		if c.Region == "" {
			c.Region = id.Region
		}
		if c.Lifecycle == "" || c.Lifecycle == "unknown" {
			c.Lifecycle = string(id.Lifecycle)
		}
		if c.NodeName == "" {
			c.NodeName = id.InstanceID
		}
		if c.AdvertiseAddr == "" && id.PrivateIP != "" && (c.BindAddr == "" || c.BindAddr == "0.0.0.0") {
			c.AdvertiseAddr = id.PrivateIP
		}
	}
	if a.Discoverer != nil {
		c.Discoverer = a.Discoverer
	}
	return nil
}

// start reacts to spot notices once the agent runs.
func (e *agentExtensions) start(ag *node.Agent) func() {
	if e.ec2 == nil {
		return func() {}
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			select {
			case <-e.ctx.Done():
				return
			case ev, ok := <-e.ec2.Events():
				if !ok {
					return
				}
				switch ev.Kind {
				case deploy.EventRebalance:
					if err := ag.MarkIneligible("EC2 rebalance recommendation"); err != nil {
						fmt.Fprintln(os.Stderr, "rebalance:", err)
					}
				case deploy.EventInterruption:
					// Keep a margin so tasks are stopped before AWS does it.
					deadline := ev.Deadline().Add(-10 * time.Second)
					ctx, cancel := context.WithTimeout(e.ctx, time.Until(ev.Deadline()))
					if err := ag.Drain(ctx, deadline, "spot interruption notice ("+ev.Action+" at "+ev.Deadline().UTC().Format(time.RFC3339)+")"); err != nil {
						fmt.Fprintln(os.Stderr, "spot drain:", err)
					}
					cancel()
				}
			}
		}
	}()
	return func() {
		e.cnl()
		e.ec2.Shutdown()
		<-done
	}
}

// setupFleet makes the leader scale the EC2 Fleet by demand.
func (e *agentExtensions) setupFleet(c *node.Config) error {
	if e.fleetMax < 1 || e.fleetMax < e.fleetMin {
		return fmt.Errorf("--fleet-id needs --fleet-max >= --fleet-min (%d), got %d", e.fleetMin, e.fleetMax)
	}
	policy := deploy.DefaultScalePolicy(e.fleetMin, e.fleetMax)
	policy.IdleAfter = e.fleetIdleFor
	if err := policy.Validate(); err != nil {
		return err
	}
	logger := c.Logger
	c.OnLeader = func(ctx context.Context, a *node.Agent) {
		region := e.region
		if region == "" {
			region = c.Region
		}
		client, err := deploy.NewEC2Client(ctx, deploy.AWSConfig{Region: region, Endpoint: e.ec2Endpoint, Logger: logger})
		if err != nil {
			logger.Error("fleet scaling off: no EC2 client", "error", err)
			return
		}
		scaler, err := deploy.NewFleetScaler(client, deploy.ScalerConfig{FleetID: e.fleetID, Policy: policy, OnDemandBase: e.fleetODBase, Logger: logger})
		if err != nil {
			logger.Error("fleet scaling off", "error", err)
			return
		}
		as, err := deploy.NewAutoscaler(scaler, func(context.Context) (deploy.Demand, error) {
			d := a.Demand()
			return deploy.Demand{WaitingJobs: d.WaitingJobs, NodesNeeded: d.NodesNeeded, Members: d.IdleSince}, nil
		}, deploy.AutoscalerConfig{
			Interval: e.fleetEvery,
			Logger:   logger,
			OnChange: func(d deploy.ScaleDecision) {
				a.RecordScale(fmt.Sprintf("fleet %s target %d: %s", e.fleetID, d.Target, d.Reason))
				for _, id := range d.Remove {
					go func(name string) {
						ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
						defer cancel()
						_ = a.DrainByName(ctx, name, "scale-in: "+d.Reason)
					}(id)
				}
			},
		})
		if err != nil {
			logger.Error("fleet scaling off", "error", err)
			return
		}
		as.Start(ctx)
		<-ctx.Done()
		as.Stop()
	}
	return nil
}
