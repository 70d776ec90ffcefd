// Package deploy is gpumesh's AWS integration: the IMDSv2 identity of the
// instance, spot interruption and rebalance notices, EC2 tag discovery,
// user-data and systemd rendering, EC2 Fleet launch and fleet scaling with
// aws-sdk-go-v2. It imports nothing else of gpumesh; the agent (package
// node) wires it in.
//
// # For the agent
//
// StartAgentEC2 does the three agent-side steps below in one call: identity
// (UnknownIdentity() off EC2, after at most the 1 s probe), the watcher (on
// EC2 only) and the tag discoverer (with --join-ec2-tag; region from the
// identity unless given). AgentEC2.Events is nil off EC2, so a select on it
// is safe.
//
// # Identity
//
// NewIMDS returns an IMDSv2-only client (session tokens, no IMDSv1
// fallback). Identity asks for the instance ID within IMDSConfig.ProbeTimeout
// (1 s); no answer is ErrNotOnEC2 with UnknownIdentity(), so an agent off
// EC2 starts at once with lifecycle "unknown":
//
//	m, _ := deploy.NewIMDS(deploy.IMDSConfig{Endpoint: imdsFlag, SourceAddr: bindIP})
//	id, err := m.Identity(ctx)
//	if errors.Is(err, deploy.ErrNotOnEC2) { /* id is UnknownIdentity() */ }
//
// # Spot notices
//
// StartWatcher polls spot/instance-action and
// events/recommendations/rebalance (every 5 s by default) and sends one
// Event of each kind at most, on a channel with room for both, so it never
// blocks on its reader; the channel closes when the watcher stops (context
// cancelled, Stop, or both notices seen). A 404 means nothing is pending.
//
//	w, _ := deploy.StartWatcher(ctx, m, deploy.WatcherConfig{Logger: log})
//	for ev := range w.Events() {
//		switch ev.Kind {
//		case deploy.EventRebalance:    // make the node ineligible for new work
//		case deploy.EventInterruption: // drain before ev.Deadline()
//		}
//	}
//
// MemMetadata is an in-memory Metadata for tests that inject notices;
// package aemmtest runs the real ec2-metadata-mock.
//
// # Discovery, launch, scaling
//
// NewEC2Client builds an SDK client (region, optional endpoint). A
// TagDiscoverer returns the private IPs of running instances with the join
// tag (DescribeInstances, all pages); it is a Discoverer (Addrs(ctx)).
// RenderUserData renders the boot script, which writes SystemdUnit and
// starts `gpumesh agent --join-ec2-tag`. Launch creates an EC2 Fleet of type
// maintain (BuildCreateFleetInput is the pure request, for --dry-run).
// DecideScale is the pure rule that raises a fleet's target when gang jobs
// wait and lowers it when nodes stay idle; FleetScaler applies decisions
// with ModifyFleet and TerminateInstances; an Autoscaler runs it every 30 s
// against the scheduler's Demand (waiting gang jobs, idle members by
// instance ID) on the leader. AgentPolicy and LauncherPolicy render
// the least privileges all of this needs, scoped to one cluster. Package ec2fake is an EC2 Query
// API server for tests.
package deploy
