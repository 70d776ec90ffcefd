package deploy

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
	"github.com/hashicorp/go-hclog"
)

// ScalePolicy bounds and paces fleet scaling.
type ScalePolicy struct {
	// Min and Max bound the fleet's total target capacity (instances).
	Min, Max int
	// IdleAfter is how long a node must have had no allocations before it
	// counts as surplus. Default 10 min.
	IdleAfter time.Duration
	// ScaleDownCooldown is the least time between the last target change and
	// a lowering, so that nodes launched for a job are not reclaimed before
	// it is placed. Default 5 min.
	ScaleDownCooldown time.Duration
}

// DefaultScalePolicy returns the default pacing with the given bounds.
func DefaultScalePolicy(min, max int) ScalePolicy {
	return ScalePolicy{Min: min, Max: max, IdleAfter: 10 * time.Minute, ScaleDownCooldown: 5 * time.Minute}
}

// Validate checks the policy.
func (p ScalePolicy) Validate() error {
	switch {
	case p.Min < 0:
		return fmt.Errorf("%w: fleet minimum must be >= 0, got %d", ErrInvalidConfig, p.Min)
	case p.Max < 1:
		return fmt.Errorf("%w: fleet maximum must be >= 1, got %d (set --fleet-max)", ErrInvalidConfig, p.Max)
	case p.Min > p.Max:
		return fmt.Errorf("%w: fleet minimum %d is above the maximum %d", ErrInvalidConfig, p.Min, p.Max)
	case p.IdleAfter <= 0:
		return fmt.Errorf("%w: idle-after must be > 0, got %s", ErrInvalidConfig, p.IdleAfter)
	case p.ScaleDownCooldown < 0:
		return fmt.Errorf("%w: scale-down cooldown must be >= 0, got %s", ErrInvalidConfig, p.ScaleDownCooldown)
	}
	return nil
}

// IdleNode is a fleet node that has had no allocations since Since.
type IdleNode struct {
	InstanceID string
	Since      time.Time
}

// ScaleState is what the leader knows when it decides.
type ScaleState struct {
	// Now is the leader's clock.
	Now time.Time
	// Target is the fleet's current total target capacity.
	Target int
	// Joined is how many of the fleet's instances are live cluster members;
	// Target-Joined instances are still launching (or failed to).
	Joined int
	// WaitingJobs is how many gang jobs wait for capacity.
	WaitingJobs int
	// NodesNeeded is how many more nodes those jobs need beyond free
	// capacity (the scheduler's estimate, in fleet units = instances).
	NodesNeeded int
	// Idle lists fleet nodes without allocations.
	Idle []IdleNode
	// LastChange is when the target last changed (zero: never).
	LastChange time.Time
}

// ScaleDecision is what to do. Target == the state's Target means no change.
type ScaleDecision struct {
	Target int
	// Remove are idle instances to terminate once the target is lowered;
	// the leader marks them ineligible before Apply.
	Remove []string
	// Reason says why, for the log and for `gpumesh nodes`.
	Reason string
}

// Changed reports whether the decision changes the target.
func (d ScaleDecision) Changed(s ScaleState) bool { return d.Target != s.Target }

// DecideScale is the pure scaling rule:
//
//   - Outside [Min, Max], the target is brought back inside.
//   - Gang jobs waiting for NodesNeeded nodes raise the target by what is not
//     already launching (Target-Joined), up to Max.
//   - With nothing waiting, nodes idle for IdleAfter are removed (longest
//     idle first), down to Min, once ScaleDownCooldown has passed since the
//     last change. Members beyond the target (Joined > Target) are removed
//     first, from the idle ones, without lowering the target again.
func DecideScale(p ScalePolicy, s ScaleState) ScaleDecision {
	keep := func(format string, a ...any) ScaleDecision {
		return ScaleDecision{Target: s.Target, Reason: fmt.Sprintf(format, a...)}
	}
	if s.Target < p.Min {
		return ScaleDecision{Target: p.Min, Reason: fmt.Sprintf("target %d is below the minimum %d: raising target %d → %d", s.Target, p.Min, s.Target, p.Min)}
	}
	if s.Target > p.Max {
		return ScaleDecision{Target: p.Max, Reason: fmt.Sprintf("target %d is above the maximum %d: lowering target %d → %d", s.Target, p.Max, s.Target, p.Max)}
	}
	pending := s.Target - s.Joined
	if pending < 0 {
		pending = 0
	}
	if s.NodesNeeded > 0 {
		jobs := plural(s.WaitingJobs, "gang job waits", "gang jobs wait")
		need := s.NodesNeeded - pending
		if need <= 0 {
			return keep("%s for %s; %s already launching", jobs, plural(s.NodesNeeded, "node", "nodes"), plural(pending, "is", "are"))
		}
		target := s.Target + need
		if target > p.Max {
			target = p.Max
		}
		if target == s.Target {
			return keep("%s for %s but the fleet is at its maximum %d", jobs, plural(need, "more node", "more nodes"), p.Max)
		}
		r := fmt.Sprintf("%s for %s", jobs, plural(s.NodesNeeded, "node", "nodes"))
		if pending > 0 {
			r += fmt.Sprintf(" (%d launching)", pending)
		}
		r += fmt.Sprintf(": raising target %d → %d", s.Target, target)
		if target < s.Target+need {
			r += fmt.Sprintf(" (capped at the maximum %d)", p.Max)
		}
		return ScaleDecision{Target: target, Reason: r}
	}
	var surplus []IdleNode
	for _, n := range s.Idle {
		if s.Now.Sub(n.Since) >= p.IdleAfter {
			surplus = append(surplus, n)
		}
	}
	if len(surplus) == 0 {
		return keep("no job waits for capacity and no node has been idle for %s", p.IdleAfter)
	}
	sort.Slice(surplus, func(i, j int) bool {
		if !surplus[i].Since.Equal(surplus[j].Since) {
			return surplus[i].Since.Before(surplus[j].Since)
		}
		return surplus[i].InstanceID < surplus[j].InstanceID
	})
	// More members than the target (a lowering whose terminations failed,
	// or instances kept by the no-termination policy): terminate idle ones
	// without lowering the target again.
	if excess := s.Joined - s.Target; excess > 0 {
		if excess > len(surplus) {
			excess = len(surplus)
		}
		ids := idsOf(surplus[:excess])
		return ScaleDecision{Target: s.Target, Remove: ids,
			Reason: fmt.Sprintf("%d members above the target %d: terminating idle %s", s.Joined-s.Target, s.Target, strings.Join(ids, ","))}
	}
	if room := s.Target - p.Min; room <= 0 {
		return keep("%s idle for %s but the fleet is at its minimum %d", plural(len(surplus), "node", "nodes"), p.IdleAfter, p.Min)
	}
	if !s.LastChange.IsZero() && s.Now.Sub(s.LastChange) < p.ScaleDownCooldown {
		return keep("%s idle for %s; waiting for the %s cooldown after the last change", plural(len(surplus), "node", "nodes"), p.IdleAfter, p.ScaleDownCooldown)
	}
	n := len(surplus)
	if room := s.Target - p.Min; n > room {
		n = room
	}
	ids := idsOf(surplus[:n])
	return ScaleDecision{
		Target: s.Target - n,
		Remove: ids,
		Reason: fmt.Sprintf("%s idle for %s and no job waits: lowering target %d → %d, terminating %s",
			plural(n, "node", "nodes"), p.IdleAfter, s.Target, s.Target-n, strings.Join(ids, ",")),
	}
}

func idsOf(nodes []IdleNode) []string {
	ids := make([]string, len(nodes))
	for i, n := range nodes {
		ids[i] = n.InstanceID
	}
	return ids
}

func plural(n int, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return fmt.Sprintf("%d %s", n, many)
}

// FleetAPI is the part of the EC2 API that FleetScaler calls.
type FleetAPI interface {
	DescribeFleets(ctx context.Context, in *ec2.DescribeFleetsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetsOutput, error)
	DescribeFleetInstances(ctx context.Context, in *ec2.DescribeFleetInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetInstancesOutput, error)
	DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error)
	ModifyFleet(ctx context.Context, in *ec2.ModifyFleetInput, optFns ...func(*ec2.Options)) (*ec2.ModifyFleetOutput, error)
	TerminateInstances(ctx context.Context, in *ec2.TerminateInstancesInput, optFns ...func(*ec2.Options)) (*ec2.TerminateInstancesOutput, error)
}

var _ FleetAPI = (*ec2.Client)(nil)

// ScalerConfig configures a FleetScaler.
type ScalerConfig struct {
	// FleetID is the maintain fleet to scale (gpumesh ec2 launch prints it).
	FleetID string
	// Policy bounds and paces the target.
	Policy ScalePolicy
	// OnDemandBase is the on-demand part of the target to keep (the
	// launch's --on-demand-base); the rest follows the fleet's default type.
	OnDemandBase int
	// Logger receives every change with its reason. Default: null logger.
	Logger hclog.Logger
}

// FleetScaler reads and changes a fleet's target capacity for the leader.
// It keeps no state beyond its configuration; the leader calls it from its
// loop (one goroutine), but concurrent calls are safe.
type FleetScaler struct {
	api FleetAPI
	cfg ScalerConfig
	log hclog.Logger
}

// NewFleetScaler validates cfg and returns a scaler.
func NewFleetScaler(api FleetAPI, cfg ScalerConfig) (*FleetScaler, error) {
	if api == nil {
		return nil, fmt.Errorf("%w: the fleet scaler needs an EC2 client", ErrInvalidConfig)
	}
	if !strings.HasPrefix(cfg.FleetID, "fleet-") {
		return nil, fmt.Errorf("%w: fleet ID %q is not an EC2 Fleet ID (fleet-...); gpumesh ec2 launch prints it", ErrInvalidConfig, cfg.FleetID)
	}
	if err := cfg.Policy.Validate(); err != nil {
		return nil, err
	}
	if cfg.OnDemandBase < 0 || cfg.OnDemandBase > cfg.Policy.Max {
		return nil, fmt.Errorf("%w: on-demand base must be 0..max %d, got %d", ErrInvalidConfig, cfg.Policy.Max, cfg.OnDemandBase)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &FleetScaler{api: api, cfg: cfg, log: cfg.Logger.Named("fleet-scaler")}, nil
}

// Policy returns the scaler's policy.
func (s *FleetScaler) Policy() ScalePolicy { return s.cfg.Policy }

// Status describes the fleet (DescribeFleets).
func (s *FleetScaler) Status(ctx context.Context) (FleetStatus, error) {
	return DescribeFleet(ctx, s.api, s.cfg.FleetID)
}

// Instances lists the fleet's active instances (DescribeFleetInstances and
// DescribeInstances), for matching against cluster members by instance ID.
func (s *FleetScaler) Instances(ctx context.Context) ([]FleetInstance, error) {
	return DescribeFleetInstances(ctx, s.api, s.cfg.FleetID)
}

// Decide applies the policy (DecideScale).
func (s *FleetScaler) Decide(st ScaleState) ScaleDecision { return DecideScale(s.cfg.Policy, st) }

// Apply carries out a decision made against current: ModifyFleet to
// d.Target if it differs (excess capacity policy no-termination, so no node
// dies at random), then TerminateInstances for d.Remove. A decision that
// changes nothing makes no call. The target is clamped to the policy's
// bounds; a clamped decision terminates nothing.
func (s *FleetScaler) Apply(ctx context.Context, current int, d ScaleDecision) error {
	target := d.Target
	if target < s.cfg.Policy.Min {
		target = s.cfg.Policy.Min
	}
	if target > s.cfg.Policy.Max {
		target = s.cfg.Policy.Max
	}
	if target != current {
		od := s.cfg.OnDemandBase
		if od > target {
			od = target
		}
		_, err := s.api.ModifyFleet(ctx, &ec2.ModifyFleetInput{
			FleetId: aws.String(s.cfg.FleetID),
			TargetCapacitySpecification: &types.TargetCapacitySpecificationRequest{
				TotalTargetCapacity:    aws.Int32(int32(target)),
				OnDemandTargetCapacity: aws.Int32(int32(od)),
			},
			ExcessCapacityTerminationPolicy: types.FleetExcessCapacityTerminationPolicyNoTermination,
		})
		if err != nil {
			return fmt.Errorf("ec2 ModifyFleet %s to %d: %w", s.cfg.FleetID, target, err)
		}
		s.log.Info("fleet target changed", "fleet", s.cfg.FleetID, "from", current, "to", target, "reason", d.Reason)
	}
	// Terminate only what the decision meant: not after a clamp changed
	// the target it was computed for.
	if len(d.Remove) > 0 && target == d.Target {
		if _, err := s.api.TerminateInstances(ctx, &ec2.TerminateInstancesInput{InstanceIds: d.Remove}); err != nil {
			return fmt.Errorf("ec2 TerminateInstances %s: %w", strings.Join(d.Remove, ","), err)
		}
		s.log.Info("idle instances terminated", "fleet", s.cfg.FleetID, "instances", strings.Join(d.Remove, ","))
	}
	return nil
}
