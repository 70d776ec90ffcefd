package node

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/gpumesh/gpumesh/deploy"
)

// EC2Config is how the agent uses EC2 (Config.EC2; nil: not at all).
type EC2Config struct {
	// AgentConfig reads the instance's identity and its spot interruption
	// and rebalance notices from IMDSv2 (unless IMDS.Disabled), finds peers
	// by JoinTag, and says how to reach the EC2 API (AWS; an empty region
	// is the instance's own). Its Logger is ignored: the agent's is used.
	deploy.AgentConfig
	// Fleet, when its ID is set, makes the leader scale an EC2 Fleet by
	// demand.
	Fleet FleetConfig
}

// FleetConfig is the fleet autoscaler that runs on the leader.
type FleetConfig struct {
	// ID is the EC2 Fleet (type maintain) to scale; empty: no scaling.
	ID string
	// Policy bounds the fleet's target capacity and says when an idle node
	// may go (start from deploy.DefaultScalePolicy).
	Policy deploy.ScalePolicy
	// OnDemandBase is how many instances of the target are on-demand (the
	// voters).
	OnDemandBase int
	// Interval is how often the leader reconsiders the target; zero means
	// the autoscaler's default (30 s).
	Interval time.Duration
}

// validate checks the fleet settings (when a fleet is named).
func (c *EC2Config) validate() error {
	if c == nil || c.Fleet.ID == "" {
		return nil
	}
	if err := c.Fleet.Policy.Validate(); err != nil {
		return fmt.Errorf("fleet %s: %w", c.Fleet.ID, err)
	}
	if c.Fleet.OnDemandBase < 0 || c.Fleet.Interval < 0 {
		return fmt.Errorf("fleet %s: on-demand base (%d) and interval (%s) must be >= 0", c.Fleet.ID, c.Fleet.OnDemandBase, c.Fleet.Interval)
	}
	return nil
}

// startEC2 reads the instance identity into cfg (fields the caller left
// empty), takes the tag discoverer and starts the notice watcher. It runs in
// NewAgent before the node record is built.
func (a *Agent) startEC2(cfg *Config) error {
	e := cfg.EC2
	if e == nil {
		return nil
	}
	if e.Fleet.ID != "" {
		a.onLeader = a.scaleFleet
	}
	if e.IMDS.Disabled && e.JoinTag == "" {
		return nil
	}
	ac := e.AgentConfig
	ac.Logger = a.logger
	if ac.IMDS.SourceAddr == "" && strings.HasPrefix(cfg.BindAddr, "127.") {
		ac.IMDS.SourceAddr = cfg.BindAddr
	}
	ec2, err := deploy.StartAgentEC2(a.ctx, ac)
	if err != nil {
		return err
	}
	a.ec2 = ec2
	if id := ec2.Identity; id.OnEC2() {
		if cfg.InstanceType == "" {
			cfg.InstanceType = id.InstanceType
		}
		if cfg.AZ == "" {
			cfg.AZ = id.AvailabilityZone
		}
		if cfg.Region == "" {
			cfg.Region = id.Region
		}
		if cfg.Lifecycle == "" || cfg.Lifecycle == "unknown" {
			cfg.Lifecycle = string(id.Lifecycle)
		}
		if cfg.NodeName == "" {
			cfg.NodeName = id.InstanceID
		}
		if cfg.AdvertiseAddr == "" && id.PrivateIP != "" && (cfg.BindAddr == "" || cfg.BindAddr == "0.0.0.0") {
			cfg.AdvertiseAddr = id.PrivateIP
		}
	}
	if ec2.Discoverer != nil {
		a.discoverer = ec2.Discoverer
	}
	return nil
}

// spotLoop reacts to the instance's notices (deploy.Watcher.Events): a
// rebalance recommendation keeps new work off this node, an interruption
// notice drains it.
func (a *Agent) spotLoop(events <-chan deploy.Event) {
	logger := a.logger.Named("ec2")
	for {
		select {
		case <-a.ctx.Done():
			return
		case ev, ok := <-events:
			if !ok {
				return
			}
			switch ev.Kind {
			case deploy.EventRebalance:
				if err := a.MarkIneligible("EC2 rebalance recommendation"); err != nil {
					logger.Error("could not keep new work off this node after a rebalance recommendation", "error", err)
				}
			case deploy.EventInterruption:
				// Keep a margin so tasks are stopped before AWS does it.
				ctx, cancel := context.WithDeadline(a.ctx, ev.Deadline())
				err := a.Drain(ctx, ev.Deadline().Add(-10*time.Second), "spot interruption notice ("+ev.Action+" at "+ev.Deadline().UTC().Format(time.RFC3339)+")")
				cancel()
				if err != nil {
					logger.Error("spot interruption: drain failed", "error", err)
				}
			}
		}
	}
}

// scaleFleet runs the fleet autoscaler while this agent leads (onLeader).
func (a *Agent) scaleFleet(ctx context.Context) {
	f := a.cfg.EC2.Fleet
	logger := a.logger.Named("fleet")
	aws := a.cfg.EC2.AWS
	if aws.Region == "" {
		aws.Region = a.cfg.Region
	}
	aws.Logger = logger
	client, err := deploy.NewEC2Client(ctx, aws)
	if err != nil {
		logger.Error("fleet scaling off: no EC2 client", "error", err)
		return
	}
	scaler, err := deploy.NewFleetScaler(client, deploy.ScalerConfig{FleetID: f.ID, Policy: f.Policy, OnDemandBase: f.OnDemandBase, Logger: logger})
	if err != nil {
		logger.Error("fleet scaling off", "error", err)
		return
	}
	as, err := deploy.NewAutoscaler(scaler, func(context.Context) (deploy.Demand, error) { return a.Demand(), nil }, deploy.AutoscalerConfig{
		Interval: f.Interval,
		Logger:   logger,
		OnChange: func(d deploy.ScaleDecision) {
			a.RecordScale(fmt.Sprintf("fleet %s target %d: %s", f.ID, d.Target, d.Reason))
			for _, name := range d.Remove {
				a.goFunc(func() {
					ctx, cancel := context.WithTimeout(a.ctx, 30*time.Second)
					defer cancel()
					if err := a.DrainByName(ctx, name, "scale-in: "+d.Reason); err != nil {
						logger.Warn("scale-in: drain failed", "node", name, "error", err)
					}
				})
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
