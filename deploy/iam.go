package deploy

import (
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
)

// IAM policies, rendered per cluster. Two documents, for two principals:
//
//   - AgentPolicy goes on the agents' instance role: the describe calls of
//     tag discovery and fleet reads, reading this cluster's boot secrets
//     from SSM Parameter Store or Secrets Manager, and (with Scale, for
//     agents started with --fleet-id) changing this cluster's fleet and
//     terminating this cluster's idle instances.
//   - LauncherPolicy goes on whoever runs `gpumesh ec2 launch`: creating
//     launch templates and fleets tagged for this cluster, passing exactly
//     the instance role the launch names to EC2, and the same scale and
//     describe rights.
//
// Every mutating statement is scoped: by aws:ResourceTag/gpumesh:cluster
// (existing resources) or aws:RequestTag/gpumesh:cluster (resources being
// created) equal to the cluster's name, by a resource ARN naming one role or
// one parameter path, or, for what a launch only references (AMIs, subnets,
// security groups, key pairs, network interfaces), by resource type. None
// has a "*" resource. docs/ec2.md gives each statement's reason.

// IAMPolicyConfig names what the policies are scoped to.
type IAMPolicyConfig struct {
	// Cluster is the value of the gpumesh:cluster tag (ClusterTagKey) on the
	// cluster's fleets, templates and instances: the join tag's value.
	// Required.
	Cluster string
	// Role is the agents' instance role (name, or path/name), the only role
	// a launch may pass to EC2. Required for LauncherPolicy.
	Role string
	// Account is the 12-digit AWS account ID for role and parameter ARNs.
	// Default "*" (any account: the role name still pins the role).
	Account string
	// Partition is the ARN partition. Default "aws".
	Partition string
	// Scale adds the fleet scaling statements (ModifyFleet,
	// TerminateInstances) to AgentPolicy, for agents run with --fleet-id.
	Scale bool
	// SecretsPath is the SSM parameter path and Secrets Manager name prefix
	// under which the boot secrets live. Default "/gpumesh/<Cluster>/"
	// (SSM) and "gpumesh/<Cluster>/" (Secrets Manager).
	SecretsPath string
}

// PolicyDocument is an IAM policy document.
type PolicyDocument struct {
	Version   string
	Statement []PolicyStatement
}

// PolicyStatement is one statement. Action and Resource are always lists.
type PolicyStatement struct {
	Sid       string
	Effect    string
	Action    []string
	Resource  []string
	Condition map[string]map[string][]string `json:",omitempty"`
}

var (
	iamNameRe    = regexp.MustCompile(`^[\w+=,.@/-]{1,512}$`)
	accountRe    = regexp.MustCompile(`^(\*|[0-9]{12})$`)
	partitionRe  = regexp.MustCompile(`^aws(-[a-z]+)*$`)
	secretPathRe = regexp.MustCompile(`^/?[\w.\-/]+/$`)
)

func (c IAMPolicyConfig) withDefaults() IAMPolicyConfig {
	if c.Account == "" {
		c.Account = "*"
	}
	if c.Partition == "" {
		c.Partition = "aws"
	}
	if c.SecretsPath == "" {
		c.SecretsPath = "/gpumesh/" + c.Cluster + "/"
	}
	return c
}

// Validate checks the names that go into ARNs and conditions.
func (c IAMPolicyConfig) Validate() error {
	bad := func(format string, a ...any) error {
		return fmt.Errorf("%w: iam policy: "+format, append([]any{ErrInvalidConfig}, a...)...)
	}
	c = c.withDefaults()
	if c.Cluster == "" || strings.ContainsAny(c.Cluster, "*?\"") || len(c.Cluster) > 256 {
		return bad("cluster %q: give the value of the %s tag (the join tag's value, e.g. prod) with --cluster; no wildcards", c.Cluster, ClusterTagKey)
	}
	if c.Role != "" && (!iamNameRe.MatchString(c.Role) || strings.Contains(c.Role, "*")) {
		return bad("role %q is not an IAM role name (letters, digits and +=,.@_-/; no wildcards)", c.Role)
	}
	if !accountRe.MatchString(c.Account) {
		return bad("account %q must be a 12-digit AWS account ID", c.Account)
	}
	if !partitionRe.MatchString(c.Partition) {
		return bad("partition %q must be aws, aws-cn or aws-us-gov", c.Partition)
	}
	if !secretPathRe.MatchString(c.SecretsPath) || strings.Contains(c.SecretsPath, "..") {
		return bad("secrets path %q must be a parameter path ending in / such as /gpumesh/prod/", c.SecretsPath)
	}
	return nil
}

func (c IAMPolicyConfig) ec2ARN(resource string) string {
	return fmt.Sprintf("arn:%s:ec2:*:%s:%s", c.Partition, c.Account, resource)
}

// clusterIs conditions a statement on a tag equal to the cluster's name.
func (c IAMPolicyConfig) clusterIs(kind string) map[string]map[string][]string {
	return map[string]map[string][]string{"StringEquals": {kind + "/" + ClusterTagKey: {c.Cluster}}}
}

func (c IAMPolicyConfig) describe() PolicyStatement {
	// EC2 Describe* calls support no resource-level permissions: "*" is the
	// only resource they accept. They change nothing.
	return PolicyStatement{Sid: "DescribeInstancesAndFleets", Effect: "Allow",
		Action:   []string{"ec2:DescribeInstances", "ec2:DescribeFleets", "ec2:DescribeFleetInstances"},
		Resource: []string{"*"}}
}

func (c IAMPolicyConfig) scale() []PolicyStatement {
	return []PolicyStatement{
		{Sid: "ScaleThisClustersFleet", Effect: "Allow", Action: []string{"ec2:ModifyFleet"},
			Resource: []string{c.ec2ARN("fleet/*")}, Condition: c.clusterIs("aws:ResourceTag")},
		{Sid: "TerminateThisClustersInstances", Effect: "Allow", Action: []string{"ec2:TerminateInstances"},
			Resource: []string{c.ec2ARN("instance/*")}, Condition: c.clusterIs("aws:ResourceTag")},
	}
}

// AgentPolicy is the instance role's policy (see IAMPolicyConfig).
func AgentPolicy(c IAMPolicyConfig) (PolicyDocument, error) {
	if err := c.Validate(); err != nil {
		return PolicyDocument{}, err
	}
	c = c.withDefaults()
	path := strings.TrimPrefix(c.SecretsPath, "/")
	st := []PolicyStatement{
		c.describe(),
		{Sid: "ReadThisClustersBootSecrets", Effect: "Allow",
			Action: []string{"ssm:GetParameter", "secretsmanager:GetSecretValue"},
			Resource: []string{
				fmt.Sprintf("arn:%s:ssm:*:%s:parameter/%s*", c.Partition, c.Account, path),
				fmt.Sprintf("arn:%s:secretsmanager:*:%s:secret:%s*", c.Partition, c.Account, path),
			}},
	}
	if c.Scale {
		st = append(st, c.scale()...)
	}
	return PolicyDocument{Version: "2012-10-17", Statement: st}, nil
}

// LauncherPolicy is the policy of whoever runs `gpumesh ec2 launch` (see
// IAMPolicyConfig). It needs Role.
func LauncherPolicy(c IAMPolicyConfig) (PolicyDocument, error) {
	if err := c.Validate(); err != nil {
		return PolicyDocument{}, err
	}
	if c.Role == "" {
		return PolicyDocument{}, fmt.Errorf("%w: iam policy: the launcher policy needs the instance role a launch passes to EC2 (--role gpumesh-agent)", ErrInvalidConfig)
	}
	c = c.withDefaults()
	st := []PolicyStatement{
		c.describe(),
		{Sid: "CreateTemplatesTaggedForThisCluster", Effect: "Allow", Action: []string{"ec2:CreateLaunchTemplate"},
			Resource: []string{c.ec2ARN("launch-template/*")}, Condition: c.clusterIs("aws:RequestTag")},
		{Sid: "CreateFleetsAndInstancesTaggedForThisCluster", Effect: "Allow",
			Action: []string{"ec2:CreateFleet", "ec2:RunInstances"},
			Resource: []string{c.ec2ARN("fleet/*"), c.ec2ARN("instance/*"), c.ec2ARN("volume/*"),
				c.ec2ARN("spot-instances-request/*")},
			Condition: c.clusterIs("aws:RequestTag")},
		{Sid: "LaunchFromThisClustersTemplates", Effect: "Allow",
			Action:   []string{"ec2:CreateFleet", "ec2:RunInstances"},
			Resource: []string{c.ec2ARN("launch-template/*")}, Condition: c.clusterIs("aws:ResourceTag")},
		{Sid: "LaunchReferencesNetworkAndImage", Effect: "Allow",
			Action: []string{"ec2:CreateFleet", "ec2:RunInstances"},
			Resource: []string{c.ec2ARN("subnet/*"), c.ec2ARN("security-group/*"), c.ec2ARN("network-interface/*"),
				c.ec2ARN("key-pair/*"), fmt.Sprintf("arn:%s:ec2:*::image/*", c.Partition)}},
		{Sid: "TagOnlyWhileCreatingForThisCluster", Effect: "Allow", Action: []string{"ec2:CreateTags"},
			Resource: []string{c.ec2ARN("fleet/*"), c.ec2ARN("instance/*"), c.ec2ARN("volume/*"),
				c.ec2ARN("launch-template/*"), c.ec2ARN("spot-instances-request/*")},
			Condition: map[string]map[string][]string{"StringEquals": {
				"ec2:CreateAction":                {"CreateFleet", "RunInstances", "CreateLaunchTemplate"},
				"aws:RequestTag/" + ClusterTagKey: {c.Cluster},
			}}},
		{Sid: "PassOnlyTheInstanceRoleToEC2", Effect: "Allow", Action: []string{"iam:PassRole"},
			Resource:  []string{fmt.Sprintf("arn:%s:iam::%s:role/%s", c.Partition, c.Account, strings.TrimPrefix(c.Role, "/"))},
			Condition: map[string]map[string][]string{"StringEquals": {"iam:PassedToService": {"ec2.amazonaws.com"}}}},
		{Sid: "FleetServiceLinkedRolesOnFirstUse", Effect: "Allow", Action: []string{"iam:CreateServiceLinkedRole"},
			Resource: []string{
				fmt.Sprintf("arn:%s:iam::%s:role/aws-service-role/ec2fleet.amazonaws.com/*", c.Partition, c.Account),
				fmt.Sprintf("arn:%s:iam::%s:role/aws-service-role/spot.amazonaws.com/*", c.Partition, c.Account),
			},
			Condition: map[string]map[string][]string{"StringEquals": {"iam:AWSServiceName": {"ec2fleet.amazonaws.com", "spot.amazonaws.com"}}}},
	}
	st = append(st, c.scale()...)
	return PolicyDocument{Version: "2012-10-17", Statement: st}, nil
}

// JSON renders the document, indented, with a final newline.
func (d PolicyDocument) JSON() string {
	b, err := json.MarshalIndent(d, "", "  ")
	if err != nil {
		panic(err) // only strings, slices and maps: cannot fail
	}
	return string(b) + "\n"
}
