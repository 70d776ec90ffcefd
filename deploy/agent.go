package deploy

import (
	"context"
	"errors"
	"fmt"

	"github.com/hashicorp/go-hclog"
)

// AgentConfig is what the agent's EC2 flags say (--imds-endpoint,
// --join-ec2-tag, --region, ...), for StartAgentEC2.
type AgentConfig struct {
	// IMDS configures the identity client and the watcher's source.
	IMDS IMDSConfig
	// Watcher configures the interruption watcher (interval).
	Watcher WatcherConfig
	// JoinTag is "KEY=VALUE" from --join-ec2-tag; empty: no tag discovery.
	JoinTag string
	// AWS says how to reach the EC2 API. An empty Region is taken from the
	// instance identity.
	AWS AWSConfig
	// Logger for all of it. Default: a null logger.
	Logger hclog.Logger
}

// AgentEC2 is everything an agent needs from EC2, started together.
type AgentEC2 struct {
	// Identity is the instance's identity, or UnknownIdentity() off EC2.
	Identity Identity
	// IMDS is the metadata client (nil off EC2).
	IMDS *IMDS
	// Watcher delivers spot and rebalance notices (nil off EC2).
	Watcher *Watcher
	// Discoverer finds peers by the join tag (nil without JoinTag).
	Discoverer *TagDiscoverer
}

// StartAgentEC2 reads the identity (at most IMDS.ProbeTimeout off EC2),
// starts the watcher when IMDS answered, and builds the tag discoverer when
// a join tag is set. Off EC2 it returns UnknownIdentity() and no watcher,
// without error, unless a join tag needs a region that nobody gave. The
// watcher stops when ctx is cancelled or Shutdown is called.
func StartAgentEC2(ctx context.Context, cfg AgentConfig) (*AgentEC2, error) {
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	log = log.Named("ec2")
	m, err := NewIMDS(cfg.IMDS)
	if err != nil {
		return nil, err
	}
	a := &AgentEC2{}
	id, err := m.Identity(ctx)
	switch {
	case errors.Is(err, ErrNotOnEC2):
		log.Info("not on EC2; node identity is unknown", "imds", m.Endpoint(), "error", err)
		m.Close()
		a.Identity = UnknownIdentity()
	case err != nil && !id.OnEC2():
		m.Close()
		return nil, err
	default:
		if err != nil {
			log.Warn("EC2 identity is incomplete", "error", err)
		}
		a.Identity, a.IMDS = id, m
		log.Info("EC2 identity", "instance", id.InstanceID, "type", id.InstanceType, "zone", id.AvailabilityZone,
			"lifecycle", id.Lifecycle, "private_ip", id.PrivateIP)
	}
	if cfg.JoinTag != "" {
		tag, err := ParseTag(cfg.JoinTag)
		if err != nil {
			a.closeIMDS()
			return nil, err
		}
		aws := cfg.AWS
		if aws.Region == "" {
			aws.Region = a.Identity.Region
		}
		if aws.Region == "" {
			a.closeIMDS()
			return nil, fmt.Errorf("%w: --join-ec2-tag %s needs --region when not on EC2", ErrInvalidConfig, tag)
		}
		if aws.Logger == nil {
			aws.Logger = log
		}
		client, err := NewEC2Client(ctx, aws)
		if err != nil {
			a.closeIMDS()
			return nil, err
		}
		if a.Discoverer, err = NewTagDiscoverer(client, TagDiscoveryConfig{Tag: tag}); err != nil {
			a.closeIMDS()
			return nil, err
		}
	}
	if a.IMDS != nil {
		wc := cfg.Watcher
		if wc.Logger == nil {
			wc.Logger = log
		}
		if a.Watcher, err = StartWatcher(ctx, a.IMDS, wc); err != nil {
			a.closeIMDS()
			return nil, err
		}
	}
	return a, nil
}

func (a *AgentEC2) closeIMDS() {
	if a.IMDS != nil {
		a.IMDS.Close()
	}
}

// Events returns the watcher's events, or nil off EC2 (a nil channel never
// delivers, so a select on it is safe).
func (a *AgentEC2) Events() <-chan Event {
	if a.Watcher == nil {
		return nil
	}
	return a.Watcher.Events()
}

// Shutdown stops the watcher and releases connections. Idempotent.
func (a *AgentEC2) Shutdown() {
	if a.Watcher != nil {
		a.Watcher.Stop()
	}
	a.closeIMDS()
}
