package deploy

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"sort"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	"github.com/aws/aws-sdk-go-v2/service/ec2"
	"github.com/aws/aws-sdk-go-v2/service/ec2/types"
)

// LaunchAPI is the part of the EC2 API that Launch calls (*ec2.Client has it).
type LaunchAPI interface {
	CreateLaunchTemplate(ctx context.Context, in *ec2.CreateLaunchTemplateInput, optFns ...func(*ec2.Options)) (*ec2.CreateLaunchTemplateOutput, error)
	CreateFleet(ctx context.Context, in *ec2.CreateFleetInput, optFns ...func(*ec2.Options)) (*ec2.CreateFleetOutput, error)
	DescribeFleets(ctx context.Context, in *ec2.DescribeFleetsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetsOutput, error)
	DescribeFleetInstances(ctx context.Context, in *ec2.DescribeFleetInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetInstancesOutput, error)
	DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error)
}

var _ LaunchAPI = (*ec2.Client)(nil)

// LaunchTemplateRef names an existing launch template: ID or Name (one of
// them), and Version ("$Default", "$Latest" or a number; default
// "$Default").
type LaunchTemplateRef struct {
	ID      string
	Name    string
	Version string
}

func (r LaunchTemplateRef) String() string {
	n := r.ID
	if n == "" {
		n = r.Name
	}
	return n + ":" + r.Version
}

// NewLaunchTemplate describes a launch template that Launch creates before
// the fleet, for operators who do not keep their own. Its instances are
// tagged with the join tag (a maintain fleet cannot tag instances itself),
// require IMDSv2, and run UserData.
type NewLaunchTemplate struct {
	// Name of the template. Default "gpumesh-<join tag value>".
	Name string
	// AMI ID, e.g. an AWS Deep Learning Base AMI (NVIDIA driver included).
	AMI string
	// UserData is the boot script (gpumesh ec2 user-data); plain text.
	UserData string
	// InstanceProfile is the IAM instance profile name or ARN for the agents'
	// role (AgentPolicy).
	InstanceProfile string
	// SecurityGroupIDs allow gossip (7946 TCP+UDP), RPC (7947), Raft (7948)
	// and data plane traffic between members.
	SecurityGroupIDs []string
	// KeyName is an optional EC2 key pair for SSH.
	KeyName string
}

// LaunchConfig describes an EC2 Fleet of gpumesh agents.
type LaunchConfig struct {
	// Count is the total target capacity (instances).
	Count int
	// InstanceTypes to spread over, e.g. g5.xlarge,g6.xlarge,g4dn.xlarge.
	InstanceTypes []string
	// Subnets to spread over (one per availability zone). Empty: the launch
	// template's network settings.
	Subnets []string
	// Spot buys Count-OnDemandBase spot instances; otherwise all on-demand.
	Spot bool
	// OnDemandBase is how many on-demand instances a spot fleet keeps (the
	// Raft voters come from them). 0..Count; only with Spot.
	OnDemandBase int
	// Tag is the join tag the agents discover each other by.
	Tag Tag
	// ExtraTags are added to the fleet (and to a new template's instances).
	ExtraTags []Tag
	// Template is the existing launch template to use; its instances must
	// carry Tag and ClusterTagKey (see docs/ec2.md). Ignored when
	// NewTemplate is set.
	Template LaunchTemplateRef
	// NewTemplate, if set, is created first and used by the fleet.
	NewTemplate *NewLaunchTemplate
	// CapacityRebalance makes the fleet launch a replacement spot instance
	// when one receives a rebalance recommendation (replacement strategy
	// "launch"; the old instance is left to its interruption).
	CapacityRebalance bool
	// ClientToken makes CreateFleet idempotent. Optional.
	ClientToken string
}

// Validate checks the configuration.
func (c LaunchConfig) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidConfig}, a...)...)
	}
	if c.Count < 1 {
		return bad("fleet count must be >= 1, got %d", c.Count)
	}
	if len(c.InstanceTypes) == 0 {
		return bad("give at least one instance type, e.g. --instance-types g5.xlarge,g6.xlarge")
	}
	for _, t := range c.InstanceTypes {
		if !strings.Contains(t, ".") {
			return bad("instance type %q is not of the form family.size, e.g. g5.xlarge", t)
		}
	}
	for _, s := range c.Subnets {
		if !strings.HasPrefix(s, "subnet-") {
			return bad("subnet %q is not a subnet ID (subnet-...)", s)
		}
	}
	if c.OnDemandBase < 0 || c.OnDemandBase > c.Count {
		return bad("on-demand base must be between 0 and the count %d, got %d", c.Count, c.OnDemandBase)
	}
	if !c.Spot && c.OnDemandBase != 0 {
		return bad("on-demand base %d only applies to a spot fleet; add --spot or drop --on-demand-base", c.OnDemandBase)
	}
	if err := c.Tag.Validate(); err != nil {
		return err
	}
	for _, t := range c.ExtraTags {
		if err := t.Validate(); err != nil {
			return err
		}
	}
	if nt := c.NewTemplate; nt != nil {
		if !strings.HasPrefix(nt.AMI, "ami-") {
			return bad("a new launch template needs an AMI ID (ami-...), got %q", nt.AMI)
		}
		if len(nt.UserData) > 16*1024 {
			return bad("user data is %d bytes; EC2 allows 16 KiB", len(nt.UserData))
		}
		return nil
	}
	if (c.Template.ID == "") == (c.Template.Name == "") {
		return bad("give exactly one of a launch template ID or name (--launch-template), or an AMI (--ami) to create one")
	}
	return nil
}

// fleetTags are the tags on the fleet and on a new template's instances.
func (c LaunchConfig) fleetTags() []types.Tag {
	tags := []types.Tag{{Key: aws.String(c.Tag.Key), Value: aws.String(c.Tag.Value)}}
	seen := map[string]bool{c.Tag.Key: true}
	if !seen[ClusterTagKey] {
		tags = append(tags, types.Tag{Key: aws.String(ClusterTagKey), Value: aws.String(c.Tag.Value)})
		seen[ClusterTagKey] = true
	}
	for _, t := range c.ExtraTags {
		if !seen[t.Key] {
			seen[t.Key] = true
			tags = append(tags, types.Tag{Key: aws.String(t.Key), Value: aws.String(t.Value)})
		}
	}
	return tags
}

// NewTemplateName returns the name Launch gives a new template.
func (c LaunchConfig) NewTemplateName() string {
	if c.NewTemplate != nil && c.NewTemplate.Name != "" {
		return c.NewTemplate.Name
	}
	return "gpumesh-" + sanitizeName(c.Tag.Value)
}

func sanitizeName(s string) string {
	var b strings.Builder
	for _, r := range s {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' || r == '_' || r == '.' {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	if b.Len() == 0 {
		return "cluster"
	}
	return b.String()
}

// BuildCreateLaunchTemplateInput returns the CreateLaunchTemplate request
// for c.NewTemplate (nil when c has none).
func BuildCreateLaunchTemplateInput(c LaunchConfig) (*ec2.CreateLaunchTemplateInput, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	nt := c.NewTemplate
	if nt == nil {
		return nil, nil
	}
	tags := c.fleetTags()
	data := &types.RequestLaunchTemplateData{
		ImageId: aws.String(nt.AMI),
		MetadataOptions: &types.LaunchTemplateInstanceMetadataOptionsRequest{
			HttpEndpoint:            types.LaunchTemplateInstanceMetadataEndpointStateEnabled,
			HttpTokens:              types.LaunchTemplateHttpTokensStateRequired,
			HttpPutResponseHopLimit: aws.Int32(2),
		},
		TagSpecifications: []types.LaunchTemplateTagSpecificationRequest{
			{ResourceType: types.ResourceTypeInstance, Tags: tags},
			{ResourceType: types.ResourceTypeVolume, Tags: tags},
		},
	}
	if nt.UserData != "" {
		data.UserData = aws.String(base64.StdEncoding.EncodeToString([]byte(nt.UserData)))
	}
	if nt.InstanceProfile != "" {
		if strings.HasPrefix(nt.InstanceProfile, "arn:") {
			data.IamInstanceProfile = &types.LaunchTemplateIamInstanceProfileSpecificationRequest{Arn: aws.String(nt.InstanceProfile)}
		} else {
			data.IamInstanceProfile = &types.LaunchTemplateIamInstanceProfileSpecificationRequest{Name: aws.String(nt.InstanceProfile)}
		}
	}
	if len(nt.SecurityGroupIDs) > 0 {
		data.SecurityGroupIds = nt.SecurityGroupIDs
	}
	if nt.KeyName != "" {
		data.KeyName = aws.String(nt.KeyName)
	}
	return &ec2.CreateLaunchTemplateInput{
		LaunchTemplateName: aws.String(c.NewTemplateName()),
		LaunchTemplateData: data,
		VersionDescription: aws.String("gpumesh agents for " + c.Tag.String()),
		TagSpecifications: []types.TagSpecification{
			{ResourceType: types.ResourceTypeLaunchTemplate, Tags: tags},
		},
	}, nil
}

// BuildCreateFleetInput returns the CreateFleet request for c using the
// launch template tmpl (c.Template, or the one created for c.NewTemplate):
// type maintain, spot allocation strategy price-capacity-optimized,
// overrides for every instance type × subnet, the on-demand base, and the
// join tag on the fleet. It is pure: --dry-run prints it.
func BuildCreateFleetInput(c LaunchConfig, tmpl LaunchTemplateRef) (*ec2.CreateFleetInput, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	if (tmpl.ID == "") == (tmpl.Name == "") {
		return nil, fmt.Errorf("%w: the fleet needs a launch template ID or name", ErrInvalidConfig)
	}
	if tmpl.Version == "" {
		tmpl.Version = "$Default"
	}
	spec := &types.FleetLaunchTemplateSpecificationRequest{Version: aws.String(tmpl.Version)}
	if tmpl.ID != "" {
		spec.LaunchTemplateId = aws.String(tmpl.ID)
	} else {
		spec.LaunchTemplateName = aws.String(tmpl.Name)
	}
	var overrides []types.FleetLaunchTemplateOverridesRequest
	for _, it := range c.InstanceTypes {
		if len(c.Subnets) == 0 {
			overrides = append(overrides, types.FleetLaunchTemplateOverridesRequest{InstanceType: types.InstanceType(it)})
			continue
		}
		for _, sn := range c.Subnets {
			overrides = append(overrides, types.FleetLaunchTemplateOverridesRequest{
				InstanceType: types.InstanceType(it),
				SubnetId:     aws.String(sn),
			})
		}
	}
	capSpec := &types.TargetCapacitySpecificationRequest{
		TotalTargetCapacity: aws.Int32(int32(c.Count)),
	}
	in := &ec2.CreateFleetInput{
		Type: types.FleetTypeMaintain,
		LaunchTemplateConfigs: []types.FleetLaunchTemplateConfigRequest{
			{LaunchTemplateSpecification: spec, Overrides: overrides},
		},
		TargetCapacitySpecification: capSpec,
		// Lowering the target never kills a node at random: the leader
		// terminates the idle nodes it picked (FleetScaler.Apply).
		ExcessCapacityTerminationPolicy: types.FleetExcessCapacityTerminationPolicyNoTermination,
		ReplaceUnhealthyInstances:       aws.Bool(true),
		OnDemandOptions: &types.OnDemandOptionsRequest{
			AllocationStrategy: types.FleetOnDemandAllocationStrategyLowestPrice,
		},
		TagSpecifications: []types.TagSpecification{
			{ResourceType: types.ResourceTypeFleet, Tags: c.fleetTags()},
		},
	}
	if c.ClientToken != "" {
		in.ClientToken = aws.String(c.ClientToken)
	}
	if c.Spot {
		capSpec.DefaultTargetCapacityType = types.DefaultTargetCapacityTypeSpot
		capSpec.OnDemandTargetCapacity = aws.Int32(int32(c.OnDemandBase))
		capSpec.SpotTargetCapacity = aws.Int32(int32(c.Count - c.OnDemandBase))
		in.SpotOptions = &types.SpotOptionsRequest{
			AllocationStrategy:           types.SpotAllocationStrategyPriceCapacityOptimized,
			InstanceInterruptionBehavior: types.SpotInstanceInterruptionBehaviorTerminate,
		}
		if c.CapacityRebalance {
			in.SpotOptions.MaintenanceStrategies = &types.FleetSpotMaintenanceStrategiesRequest{
				CapacityRebalance: &types.FleetSpotCapacityRebalanceRequest{
					ReplacementStrategy: types.FleetReplacementStrategyLaunch,
				},
			}
		}
	} else {
		capSpec.DefaultTargetCapacityType = types.DefaultTargetCapacityTypeOnDemand
		capSpec.OnDemandTargetCapacity = aws.Int32(int32(c.Count))
		capSpec.SpotTargetCapacity = aws.Int32(0)
	}
	return in, nil
}

// FleetInstance is one instance of a fleet.
type FleetInstance struct {
	InstanceID       string `json:"instance_id"`
	InstanceType     string `json:"instance_type"`
	Lifecycle        string `json:"lifecycle"` // "spot" or "on-demand"
	AvailabilityZone string `json:"availability_zone,omitempty"`
	PrivateIP        string `json:"private_ip,omitempty"`
	State            string `json:"state,omitempty"`
}

// FleetStatus is what DescribeFleets says about a fleet.
type FleetStatus struct {
	FleetID           string   `json:"fleet_id"`
	State             string   `json:"state"`           // submitted, active, modifying, deleted...
	ActivityStatus    string   `json:"activity_status"` // pending_fulfillment, fulfilled, error...
	TotalTarget       int      `json:"total_target_capacity"`
	OnDemandTarget    int      `json:"on_demand_target_capacity"`
	SpotTarget        int      `json:"spot_target_capacity"`
	Fulfilled         float64  `json:"fulfilled_capacity"`
	FulfilledOnDemand float64  `json:"fulfilled_on_demand_capacity"`
	Errors            []string `json:"errors,omitempty"`
}

// LaunchResult is what Launch did.
type LaunchResult struct {
	FleetID        string            `json:"fleet_id"`
	LaunchTemplate LaunchTemplateRef `json:"launch_template"`
	// CreatedTemplate is true when Launch created the template.
	CreatedTemplate bool            `json:"created_template"`
	Status          FleetStatus     `json:"status"`
	Instances       []FleetInstance `json:"instances"`
	// Errors are launch errors CreateFleet reported (capacity, limits).
	Errors []string `json:"errors,omitempty"`
}

// Launch creates the launch template (if c.NewTemplate is set) and the
// fleet, then describes the fleet and its instances. A maintain fleet
// launches asynchronously: with wait > 0, Launch polls every poll until the
// fleet's fulfilled capacity reaches its target or wait has passed (not an
// error: the result says what is there).
func Launch(ctx context.Context, api LaunchAPI, c LaunchConfig, wait, poll time.Duration) (*LaunchResult, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	res := &LaunchResult{LaunchTemplate: c.Template}
	if c.NewTemplate != nil {
		in, err := BuildCreateLaunchTemplateInput(c)
		if err != nil {
			return nil, err
		}
		out, err := api.CreateLaunchTemplate(ctx, in)
		if err != nil {
			return nil, fmt.Errorf("ec2 CreateLaunchTemplate %s: %w (if it exists, pass --launch-template %s instead of --ami)", c.NewTemplateName(), err, c.NewTemplateName())
		}
		lt := out.LaunchTemplate
		if lt == nil || lt.LaunchTemplateId == nil {
			return nil, fmt.Errorf("ec2 CreateLaunchTemplate %s: no template in the answer", c.NewTemplateName())
		}
		res.LaunchTemplate = LaunchTemplateRef{ID: *lt.LaunchTemplateId, Name: aws.ToString(lt.LaunchTemplateName),
			Version: fmt.Sprint(aws.ToInt64(lt.LatestVersionNumber))}
		res.CreatedTemplate = true
	}
	ref := res.LaunchTemplate
	if res.CreatedTemplate {
		ref = LaunchTemplateRef{ID: res.LaunchTemplate.ID, Version: res.LaunchTemplate.Version}
	}
	in, err := BuildCreateFleetInput(c, ref)
	if err != nil {
		return nil, err
	}
	out, err := api.CreateFleet(ctx, in)
	if err != nil {
		return nil, fmt.Errorf("ec2 CreateFleet: %w", err)
	}
	res.FleetID = aws.ToString(out.FleetId)
	for _, e := range out.Errors {
		res.Errors = append(res.Errors, fmt.Sprintf("%s: %s", aws.ToString(e.ErrorCode), aws.ToString(e.ErrorMessage)))
	}
	if res.FleetID == "" {
		return res, fmt.Errorf("ec2 CreateFleet returned no fleet ID; errors: %s", strings.Join(res.Errors, "; "))
	}
	deadline := time.Now().Add(wait)
	for {
		st, err := DescribeFleet(ctx, api, res.FleetID)
		if err != nil {
			return res, err
		}
		res.Status = st
		if wait <= 0 || st.Fulfilled >= float64(st.TotalTarget) || !time.Now().Before(deadline) {
			break
		}
		select {
		case <-ctx.Done():
			return res, ctx.Err()
		case <-time.After(poll):
		}
	}
	res.Instances, err = DescribeFleetInstances(ctx, api, res.FleetID)
	return res, err
}

// DescribeFleetAPI is what DescribeFleet needs.
type DescribeFleetAPI interface {
	DescribeFleets(ctx context.Context, in *ec2.DescribeFleetsInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetsOutput, error)
}

// DescribeFleet returns a fleet's state and capacities.
func DescribeFleet(ctx context.Context, api DescribeFleetAPI, fleetID string) (FleetStatus, error) {
	out, err := api.DescribeFleets(ctx, &ec2.DescribeFleetsInput{FleetIds: []string{fleetID}})
	if err != nil {
		return FleetStatus{}, fmt.Errorf("ec2 DescribeFleets %s: %w", fleetID, err)
	}
	for _, f := range out.Fleets {
		if aws.ToString(f.FleetId) != fleetID {
			continue
		}
		st := FleetStatus{
			FleetID:           fleetID,
			State:             string(f.FleetState),
			ActivityStatus:    string(f.ActivityStatus),
			Fulfilled:         aws.ToFloat64(f.FulfilledCapacity),
			FulfilledOnDemand: aws.ToFloat64(f.FulfilledOnDemandCapacity),
		}
		if t := f.TargetCapacitySpecification; t != nil {
			st.TotalTarget = int(aws.ToInt32(t.TotalTargetCapacity))
			st.OnDemandTarget = int(aws.ToInt32(t.OnDemandTargetCapacity))
			st.SpotTarget = int(aws.ToInt32(t.SpotTargetCapacity))
		}
		for _, e := range f.Errors {
			st.Errors = append(st.Errors, fmt.Sprintf("%s: %s", aws.ToString(e.ErrorCode), aws.ToString(e.ErrorMessage)))
		}
		return st, nil
	}
	return FleetStatus{}, fmt.Errorf("%w: %s (check the ID and the region)", ErrFleetNotFound, fleetID)
}

// FleetInstancesAPI is what DescribeFleetInstances needs.
type FleetInstancesAPI interface {
	DescribeFleetInstances(ctx context.Context, in *ec2.DescribeFleetInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeFleetInstancesOutput, error)
	DescribeInstances(ctx context.Context, in *ec2.DescribeInstancesInput, optFns ...func(*ec2.Options)) (*ec2.DescribeInstancesOutput, error)
}

// DescribeFleetInstances returns the fleet's active instances (all pages),
// with their lifecycle, zone, private IP and state from DescribeInstances,
// sorted by instance ID.
func DescribeFleetInstances(ctx context.Context, api FleetInstancesAPI, fleetID string) ([]FleetInstance, error) {
	ids, byID, err := fleetInstanceIDs(ctx, api, fleetID)
	if err != nil || len(ids) == 0 {
		return nil, err
	}
	p := ec2.NewDescribeInstancesPaginator(api, &ec2.DescribeInstancesInput{InstanceIds: ids})
	for p.HasMorePages() {
		page, err := p.NextPage(ctx)
		if err != nil {
			return nil, fmt.Errorf("ec2 DescribeInstances for fleet %s: %w", fleetID, err)
		}
		for _, r := range page.Reservations {
			for _, in := range r.Instances {
				fi := byID[aws.ToString(in.InstanceId)]
				if fi == nil {
					continue
				}
				fi.PrivateIP = aws.ToString(in.PrivateIpAddress)
				if in.Placement != nil {
					fi.AvailabilityZone = aws.ToString(in.Placement.AvailabilityZone)
				}
				if in.State != nil {
					fi.State = string(in.State.Name)
				}
				if in.InstanceLifecycle == types.InstanceLifecycleTypeSpot {
					fi.Lifecycle = string(LifecycleSpot)
				}
			}
		}
	}
	out := make([]FleetInstance, 0, len(ids))
	for _, id := range ids {
		out = append(out, *byID[id])
	}
	return out, nil
}

func fleetInstanceIDs(ctx context.Context, api FleetInstancesAPI, fleetID string) ([]string, map[string]*FleetInstance, error) {
	byID := map[string]*FleetInstance{}
	var ids []string
	var token *string
	for {
		out, err := api.DescribeFleetInstances(ctx, &ec2.DescribeFleetInstancesInput{FleetId: aws.String(fleetID), NextToken: token})
		if err != nil {
			return nil, nil, fmt.Errorf("ec2 DescribeFleetInstances %s: %w", fleetID, err)
		}
		for _, a := range out.ActiveInstances {
			id := aws.ToString(a.InstanceId)
			if id == "" || byID[id] != nil {
				continue
			}
			lc := string(LifecycleOnDemand)
			if aws.ToString(a.SpotInstanceRequestId) != "" {
				lc = string(LifecycleSpot)
			}
			byID[id] = &FleetInstance{InstanceID: id, InstanceType: aws.ToString(a.InstanceType), Lifecycle: lc}
			ids = append(ids, id)
		}
		token = out.NextToken
		if aws.ToString(token) == "" {
			break
		}
	}
	sort.Strings(ids)
	return ids, byID, nil
}

// MarshalRequest renders an SDK request (BuildCreateFleetInput's, for
// --dry-run) as indented JSON without its unset fields.
func MarshalRequest(v any) ([]byte, error) {
	b, err := json.Marshal(v)
	if err != nil {
		return nil, err
	}
	var tree any
	if err := json.Unmarshal(b, &tree); err != nil {
		return nil, err
	}
	pruned, _ := prune(tree)
	return json.MarshalIndent(pruned, "", "  ")
}

// prune drops nulls, empty strings, empty lists and empty objects.
func prune(v any) (any, bool) {
	switch t := v.(type) {
	case nil:
		return nil, false
	case string:
		return t, t != ""
	case []any:
		out := make([]any, 0, len(t))
		for _, e := range t {
			if p, ok := prune(e); ok {
				out = append(out, p)
			}
		}
		return out, len(out) > 0
	case map[string]any:
		out := map[string]any{}
		for k, e := range t {
			if p, ok := prune(e); ok {
				out[k] = p
			}
		}
		return out, len(out) > 0
	default:
		return t, true
	}
}
