package main

import (
	"context"

	"github.com/spf13/pflag"

	"github.com/gpumesh/gpumesh/node"
)

// agentExtensions are agent settings that come from the cloud environment
// (EC2 identity, tag join, spot notices) and from security settings.
type agentExtensions struct{}

func (e *agentExtensions) addFlags(fl *pflag.FlagSet) {}

// apply fills the config before the agent starts.
func (e *agentExtensions) apply(ctx context.Context, c *node.Config) error { return nil }

// start runs what needs a running agent; the returned func stops it.
func (e *agentExtensions) start(a *node.Agent) func() { return func() {} }
