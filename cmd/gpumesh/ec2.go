package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/deploy"
)

func init() { registerCommand(newEC2Command) }

func newEC2Command() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "ec2",
		Short: "Run gpumesh on EC2: boot scripts, fleets, IAM policy, instance identity",
		Long: `Run gpumesh on EC2.

  gpumesh ec2 user-data   renders the boot script that installs and starts the agent
  gpumesh ec2 launch      creates an EC2 Fleet (type maintain) of agents
  gpumesh ec2 fleet       shows a fleet's capacity and instances
  gpumesh ec2 iam-policy  prints the least-privilege IAM policies (agent role, launcher)
  gpumesh ec2 identity    prints what the instance metadata service says about this host

See docs/ec2.md for a walk-through.`,
		Example: `  gpumesh ec2 user-data --tag gpumesh:cluster=prod --binary-url https://example.com/gpumesh-linux-{arch} > user-data.sh
  gpumesh ec2 launch --count 8 --instance-types g5.xlarge,g6.xlarge --subnets subnet-a,subnet-b \
      --spot --on-demand-base 3 --tag gpumesh:cluster=prod --launch-template gpumesh-prod`,
	}
	cmd.AddCommand(newEC2UserDataCommand(), newEC2LaunchCommand(), newEC2FleetCommand(), newEC2IAMPolicyCommand(), newEC2IdentityCommand())
	return cmd
}

// userDataFlags are shared by user-data and launch --ami.
type userDataFlags struct {
	tag, region, binaryURL, cudaBinaryURL, sha, cudaSha, cuda string
	agentArgs                                                 []string
	taskUser, secretsFrom                                     string
	secrets                                                   deploy.BootSecrets
}

func (f *userDataFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.tag, "tag", "", "join tag KEY=VALUE the agents find each other by (required)")
	fl.StringVar(&f.region, "region", "", "AWS region (default: $AWS_REGION, or the instance's region on EC2)")
	fl.StringVar(&f.binaryURL, "binary-url", "", "URL of the default gpumesh build; {arch} becomes amd64 or arm64 (empty: the AMI has /usr/local/bin/gpumesh)")
	fl.StringVar(&f.cudaBinaryURL, "cuda-binary-url", "", "URL of the CUDA build (default: <binary-url>-cuda)")
	fl.StringVar(&f.sha, "binary-sha256", "", "SHA-256 the default build must have")
	fl.StringVar(&f.cudaSha, "cuda-binary-sha256", "", "SHA-256 the CUDA build must have")
	fl.StringVar(&f.cuda, "cuda", "auto", "which build to install: auto (CUDA where an NVIDIA GPU and driver are found), on, off")
	fl.StringArrayVar(&f.agentArgs, "agent-arg", nil, "an extra `FLAG` for the agent's command line, e.g. --agent-arg=--bootstrap-expect=3 (repeatable; checked against the agent's flags)")
	fl.StringVar(&f.taskUser, "task-user", deploy.DefaultTaskUser, "`USER` tasks run as; created at boot when the AMI lacks it")
	fl.StringVar(&f.secretsFrom, "secrets-from", deploy.SecretsSSM, "where the *-secret names live: ssm (Parameter Store, SecureString) or secretsmanager")
	fl.StringVar(&f.secrets.TLSCA, "tls-ca-secret", "", "`NAME` of the secret holding the cluster's CA certificate (PEM), e.g. /gpumesh/prod/tls-ca")
	fl.StringVar(&f.secrets.TLSCert, "tls-cert-secret", "", "`NAME` of the secret holding the agents' certificate (PEM; one for all, made with gpumesh tls cert create)")
	fl.StringVar(&f.secrets.TLSKey, "tls-key-secret", "", "`NAME` of the secret holding that certificate's key (PEM)")
	fl.StringVar(&f.secrets.ACLToken, "acl-token-secret", "", "`NAME` of the secret holding the ACL token mutating calls must carry")
	fl.StringVar(&f.secrets.GossipKey, "gossip-key-secret", "", "`NAME` of the secret holding the gossip encryption key (base64, 32 bytes)")
}

func (f *userDataFlags) config() (deploy.UserDataConfig, error) {
	if f.tag == "" {
		return deploy.UserDataConfig{}, errors.New("--tag KEY=VALUE is required (e.g. --tag gpumesh:cluster=prod)")
	}
	tag, err := deploy.ParseTag(f.tag)
	if err != nil {
		return deploy.UserDataConfig{}, err
	}
	return deploy.UserDataConfig{
		Tag: tag, Region: f.region, BinaryURL: f.binaryURL, CUDABinaryURL: f.cudaBinaryURL,
		BinarySHA256: f.sha, CUDABinarySHA256: f.cudaSha, CUDA: deploy.CUDAMode(f.cuda), AgentArgs: f.agentArgs,
		CheckAgentArgs: checkAgentArgs, TaskUser: f.taskUser, SecretsFrom: f.secretsFrom, Secrets: f.secrets,
	}, nil
}

// checkAgentArgs parses args with the agent's own flag set, as the agent
// will at boot.
func checkAgentArgs(args []string) error {
	cmd := newAgentCommand()
	cmd.Flags().SetOutput(io.Discard)
	if err := cmd.Flags().Parse(args); err != nil {
		return err
	}
	if rest := cmd.Flags().Args(); len(rest) > 0 {
		return fmt.Errorf("the agent takes no arguments, got %q", rest)
	}
	return nil
}

func newEC2UserDataCommand() *cobra.Command {
	var f userDataFlags
	var output string
	cmd := &cobra.Command{
		Use:   "user-data",
		Short: "Render the EC2 user-data that installs and starts the gpumesh agent",
		Long: `Render a cloud-init user-data script (bash) that downloads the gpumesh binary
(the CUDA build on instances with an NVIDIA GPU and driver, with --cuda auto),
writes the systemd unit gpumesh.service and /etc/gpumesh/gpumesh.env, and starts
"gpumesh agent --join-ec2-tag KEY=VALUE" with its data in /var/lib/gpumesh.

Secrets never go into user-data (anyone allowed to describe the instance reads
it): --tls-ca-secret, --tls-cert-secret, --tls-key-secret, --acl-token-secret and
--gossip-key-secret name parameters in SSM Parameter Store (or, with
--secrets-from secretsmanager, secrets in Secrets Manager) that the script fetches
at boot with the instance role and the aws CLI, into /etc/gpumesh/secrets (0600).`,
		Example: `  gpumesh ec2 user-data --tag gpumesh:cluster=prod \
      --binary-url https://releases.example.com/gpumesh-linux-{arch} \
      --agent-arg=--bootstrap-expect=3 > user-data.sh
  gpumesh ec2 user-data --tag gpumesh:cluster=prod --tls-ca-secret /gpumesh/prod/tls-ca \
      --tls-cert-secret /gpumesh/prod/tls-cert --tls-key-secret /gpumesh/prod/tls-key \
      --acl-token-secret /gpumesh/prod/acl-token --gossip-key-secret /gpumesh/prod/gossip-key`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, err := f.config()
			if err != nil {
				return err
			}
			script, err := deploy.RenderUserData(c)
			if err != nil {
				return err
			}
			if output == "" || output == "-" {
				_, err = io.WriteString(cmd.OutOrStdout(), script)
				return err
			}
			return os.WriteFile(output, []byte(script), 0o644)
		},
	}
	f.register(cmd)
	cmd.Flags().StringVarP(&output, "output", "o", "", "write the script to this file instead of stdout")
	return cmd
}

func newEC2LaunchCommand() *cobra.Command {
	var (
		ud                                 userDataFlags
		count, onDemandBase                int
		instanceTypes, subnets, extraTags  []string
		securityGroups                     []string
		spot, dryRun, asJSON, rebalance    bool
		template, ami, profile, keyName    string
		templateName, endpoint, awsProfile string
		clientToken                        string
		wait                               time.Duration
	)
	cmd := &cobra.Command{
		Use:   "launch",
		Short: "Create an EC2 Fleet (type maintain) of gpumesh agents",
		Long: `Create an EC2 Fleet of type "maintain" (AWS replaces reclaimed spot capacity)
across the instance types × subnets, spot allocation strategy
price-capacity-optimized, with --on-demand-base on-demand instances for the Raft
voters, tagged with the join tag. Prints the fleet and its instances.

A fleet needs a launch template. Either name yours with --launch-template
(ID lt-... or name, optionally :VERSION; its instances must be tagged with the
join tag and gpumesh:cluster, see docs/ec2.md), or give --ami and gpumesh creates
one ("gpumesh-<tag value>") with the user-data rendered from the user-data flags,
IMDSv2 required, and the join tag on instances and volumes.`,
		Example: `  # With your own launch template:
  gpumesh ec2 launch --count 8 --instance-types g5.xlarge,g6.xlarge,g4dn.xlarge \
      --subnets subnet-0a,subnet-0b,subnet-0c --spot --on-demand-base 3 \
      --tag gpumesh:cluster=prod --launch-template gpumesh-prod:3

  # Let gpumesh create the template (and print the requests first):
  gpumesh ec2 launch --count 4 --instance-types g5.xlarge --subnets subnet-0a --spot --on-demand-base 3 \
      --tag gpumesh:cluster=dev --ami ami-0123456789abcdef0 --instance-profile gpumesh-agent \
      --security-groups sg-0123 --binary-url https://releases.example.com/gpumesh-linux-{arch} --dry-run`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if ud.tag == "" {
				return errors.New("--tag KEY=VALUE is required (e.g. --tag gpumesh:cluster=prod)")
			}
			tag, err := deploy.ParseTag(ud.tag)
			if err != nil {
				return err
			}
			c := deploy.LaunchConfig{
				Count: count, InstanceTypes: splitList(instanceTypes), Subnets: splitList(subnets),
				Spot: spot, OnDemandBase: onDemandBase, Tag: tag, CapacityRebalance: rebalance, ClientToken: clientToken,
			}
			for _, s := range extraTags {
				t, err := deploy.ParseTag(s)
				if err != nil {
					return err
				}
				c.ExtraTags = append(c.ExtraTags, t)
			}
			switch {
			case ami != "" && template != "":
				return errors.New("give either --launch-template or --ami, not both")
			case ami != "":
				udc, err := ud.config()
				if err != nil {
					return err
				}
				script, err := deploy.RenderUserData(udc)
				if err != nil {
					return err
				}
				c.NewTemplate = &deploy.NewLaunchTemplate{Name: templateName, AMI: ami, UserData: script,
					InstanceProfile: profile, SecurityGroupIDs: splitList(securityGroups), KeyName: keyName}
			case template != "":
				c.Template = parseTemplateRef(template)
			default:
				return errors.New("a fleet needs a launch template: pass --launch-template ID|NAME[:VERSION], or --ami AMI to create one")
			}
			if err := c.Validate(); err != nil {
				return err
			}
			if dryRun {
				return printLaunchDryRun(cmd.OutOrStdout(), c)
			}
			ctx := cmd.Context()
			region, err := resolveRegion(ctx, ud.region)
			if err != nil {
				return err
			}
			client, err := deploy.NewEC2Client(ctx, deploy.AWSConfig{Region: region, Endpoint: endpoint, Profile: awsProfile,
				Logger: cliLogger(cmd.ErrOrStderr())})
			if err != nil {
				return err
			}
			res, err := deploy.Launch(ctx, client, c, wait, 5*time.Second)
			if res != nil && res.FleetID != "" {
				if perr := printLaunchResult(cmd.OutOrStdout(), res, asJSON); perr != nil && err == nil {
					err = perr
				}
			}
			return err
		},
	}
	ud.register(cmd)
	fl := cmd.Flags()
	fl.IntVar(&count, "count", 0, "total number of instances (the fleet's target capacity)")
	fl.StringSliceVar(&instanceTypes, "instance-types", nil, "instance types to spread over, comma-separated")
	fl.StringSliceVar(&subnets, "subnets", nil, "subnet IDs to spread over (one per availability zone), comma-separated")
	fl.BoolVar(&spot, "spot", false, "buy spot instances beyond the on-demand base (default: all on-demand)")
	fl.IntVar(&onDemandBase, "on-demand-base", 0, "on-demand instances in a spot fleet (the Raft voters come from these)")
	fl.StringArrayVar(&extraTags, "extra-tag", nil, "another `KEY=VALUE` tag for the fleet and a new template's instances (repeatable)")
	fl.StringVar(&template, "launch-template", "", "existing launch template: ID (lt-...) or name, optionally :VERSION (default $Default)")
	fl.StringVar(&ami, "ami", "", "create a launch template from this AMI (use one with the NVIDIA driver for GPU types)")
	fl.StringVar(&templateName, "template-name", "", "name of the launch template --ami creates (default gpumesh-<tag value>)")
	fl.StringVar(&profile, "instance-profile", "", "IAM instance profile (name or ARN) for a new template; its role needs the policy of \"gpumesh ec2 iam-policy --for agent\"")
	fl.StringSliceVar(&securityGroups, "security-groups", nil, "security group IDs for a new template (allow 7946-7949 and the data plane between members)")
	fl.StringVar(&keyName, "key-name", "", "EC2 key pair for a new template (optional)")
	fl.BoolVar(&rebalance, "capacity-rebalance", false, "launch a replacement when a spot instance gets a rebalance recommendation")
	fl.StringVar(&clientToken, "client-token", "", "idempotency token for CreateFleet (optional)")
	fl.DurationVar(&wait, "wait", 0, "wait up to this long for the fleet to reach its target before printing (e.g. 5m)")
	fl.BoolVar(&dryRun, "dry-run", false, "print the requests as JSON instead of sending them")
	fl.BoolVar(&asJSON, "json", false, "print the result as JSON")
	fl.StringVar(&endpoint, "ec2-endpoint", "", "EC2 API endpoint override (a VPC endpoint or a test server)")
	fl.StringVar(&awsProfile, "profile", "", "AWS shared-config profile")
	return cmd
}

func newEC2FleetCommand() *cobra.Command {
	var region, endpoint, awsProfile string
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "fleet FLEET_ID",
		Short: "Show an EC2 Fleet's target and fulfilled capacity and its instances",
		Example: `  gpumesh ec2 fleet fleet-0123abcd-4567-89ef-0123-456789abcdef --region us-east-1
  gpumesh ec2 fleet fleet-0123abcd-4567-89ef-0123-456789abcdef --json`,
		Args: oneArg(""),
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx := cmd.Context()
			r, err := resolveRegion(ctx, region)
			if err != nil {
				return err
			}
			client, err := deploy.NewEC2Client(ctx, deploy.AWSConfig{Region: r, Endpoint: endpoint, Profile: awsProfile,
				Logger: cliLogger(cmd.ErrOrStderr())})
			if err != nil {
				return err
			}
			st, err := deploy.DescribeFleet(ctx, client, args[0])
			if err != nil {
				return err
			}
			insts, err := deploy.DescribeFleetInstances(ctx, client, args[0])
			if err != nil {
				return err
			}
			return printLaunchResult(cmd.OutOrStdout(), &deploy.LaunchResult{FleetID: args[0], Status: st, Instances: insts}, asJSON)
		},
	}
	cmd.Flags().StringVar(&region, "region", "", "AWS region (default: $AWS_REGION, or the instance's region on EC2)")
	cmd.Flags().StringVar(&endpoint, "ec2-endpoint", "", "EC2 API endpoint override (a VPC endpoint or a test server)")
	cmd.Flags().StringVar(&awsProfile, "profile", "", "AWS shared-config profile")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

func newEC2IAMPolicyCommand() *cobra.Command {
	var c deploy.IAMPolicyConfig
	var forWhom string
	cmd := &cobra.Command{
		Use:   "iam-policy",
		Short: "Print the least-privilege IAM policy for the agents' role or for the launcher",
		Long: `Print an IAM policy document scoped to one cluster (the value of its
gpumesh:cluster tag, which is the join tag's value).

  --for agent     the agents' instance role: describe instances and fleets, read
                  the cluster's boot secrets under /gpumesh/CLUSTER/; with --scale
                  also ModifyFleet and TerminateInstances on resources tagged
                  gpumesh:cluster=CLUSTER (agents run with --fleet-id)
  --for launcher  whoever runs "gpumesh ec2 launch": create templates, fleets and
                  instances tagged gpumesh:cluster=CLUSTER, pass only --role to
                  EC2, and scale and terminate this cluster's fleet and instances

No mutating statement has a "*" resource. docs/ec2.md gives each statement's reason.`,
		Example: `  gpumesh ec2 iam-policy --for agent --cluster prod > agent-policy.json
  aws iam put-role-policy --role-name gpumesh-agent --policy-name gpumesh --policy-document file://agent-policy.json
  gpumesh ec2 iam-policy --for launcher --cluster prod --role gpumesh-agent --account 123456789012 > launcher-policy.json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			var doc deploy.PolicyDocument
			var err error
			switch forWhom {
			case "agent":
				doc, err = deploy.AgentPolicy(c)
			case "launcher":
				doc, err = deploy.LauncherPolicy(c)
			default:
				return fmt.Errorf("--for %q: use agent (the instance role) or launcher (who runs gpumesh ec2 launch)", forWhom)
			}
			if err != nil {
				return err
			}
			_, err = io.WriteString(cmd.OutOrStdout(), doc.JSON())
			return err
		},
	}
	fl := cmd.Flags()
	fl.StringVar(&forWhom, "for", "agent", "agent (the instance role) or launcher (who runs gpumesh ec2 launch)")
	fl.StringVar(&c.Cluster, "cluster", "", "the cluster's name: the value of its gpumesh:cluster tag, i.e. the join tag's value (required)")
	fl.StringVar(&c.Role, "role", "", "the agents' instance role, the only role a launch may pass to EC2 (required with --for launcher)")
	fl.StringVar(&c.Account, "account", "", "AWS account ID for the ARNs (default: any account)")
	fl.StringVar(&c.Partition, "partition", "", "ARN partition: aws, aws-cn, aws-us-gov (default aws)")
	fl.StringVar(&c.SecretsPath, "secrets-path", "", "SSM parameter path / Secrets Manager prefix of the boot secrets (default /gpumesh/CLUSTER/)")
	fl.BoolVar(&c.Scale, "scale", false, "with --for agent: let the leader scale the fleet and terminate idle instances (agents run with --fleet-id)")
	return cmd
}

func newEC2IdentityCommand() *cobra.Command {
	var endpoint string
	var probe time.Duration
	var asJSON bool
	cmd := &cobra.Command{
		Use:   "identity",
		Short: "Print this instance's identity from the instance metadata service (IMDSv2)",
		Example: `  gpumesh ec2 identity
  gpumesh ec2 identity --imds-endpoint http://127.0.0.1:1338 --json`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			m, err := deploy.NewIMDS(deploy.IMDSConfig{Endpoint: endpoint, ProbeTimeout: probe})
			if err != nil {
				return err
			}
			defer m.Close()
			id, err := m.Identity(cmd.Context())
			if err != nil && !errors.Is(err, deploy.ErrNotOnEC2) {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				return enc.Encode(map[string]any{
					"on_ec2": id.OnEC2(), "instance_id": id.InstanceID, "instance_type": id.InstanceType,
					"availability_zone": id.AvailabilityZone, "region": id.Region, "private_ip": id.PrivateIP,
					"lifecycle": id.Lifecycle,
				})
			}
			if !id.OnEC2() {
				fmt.Fprintln(cmd.OutOrStdout(), err)
				return nil
			}
			w := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
			fmt.Fprintf(w, "Instance ID\t%s\nInstance type\t%s\nAvailability zone\t%s\nRegion\t%s\nPrivate IP\t%s\nLifecycle\t%s\n",
				id.InstanceID, id.InstanceType, id.AvailabilityZone, id.Region, id.PrivateIP, id.Lifecycle)
			return w.Flush()
		},
	}
	cmd.Flags().StringVar(&endpoint, "imds-endpoint", deploy.DefaultIMDSEndpoint, "instance metadata service URL")
	cmd.Flags().DurationVar(&probe, "probe-timeout", time.Second, "how long to wait for IMDS before deciding this is not EC2")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	return cmd
}

// cliLogger shows the AWS SDK's warnings on stderr.
func cliLogger(w io.Writer) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "gpumesh", Output: w, Level: hclog.Warn})
}

// splitList trims and drops empty items of a comma-separated flag.
func splitList(in []string) []string {
	var out []string
	for _, s := range in {
		if s = strings.TrimSpace(s); s != "" {
			out = append(out, s)
		}
	}
	return out
}

// parseTemplateRef parses "lt-0abc", "name", "name:3" or "lt-0abc:$Latest".
func parseTemplateRef(s string) deploy.LaunchTemplateRef {
	ref := deploy.LaunchTemplateRef{}
	if i := strings.LastIndex(s, ":"); i > 0 {
		s, ref.Version = s[:i], s[i+1:]
	}
	if strings.HasPrefix(s, "lt-") {
		ref.ID = s
	} else {
		ref.Name = s
	}
	return ref
}

// resolveRegion takes --region, then $AWS_REGION/$AWS_DEFAULT_REGION, then
// the instance's region from IMDS (1 s probe).
func resolveRegion(ctx context.Context, flag string) (string, error) {
	for _, r := range []string{flag, os.Getenv("AWS_REGION"), os.Getenv("AWS_DEFAULT_REGION")} {
		if r != "" {
			return r, nil
		}
	}
	m, err := deploy.NewIMDS(deploy.DefaultIMDSConfig())
	if err == nil {
		defer m.Close()
		if id, err := m.Identity(ctx); err == nil && id.Region != "" {
			return id.Region, nil
		}
	}
	return "", errors.New("no AWS region: pass --region or set AWS_REGION")
}

func printLaunchDryRun(w io.Writer, c deploy.LaunchConfig) error {
	out := map[string]any{}
	ref := c.Template
	if c.NewTemplate != nil {
		lt, err := deploy.BuildCreateLaunchTemplateInput(c)
		if err != nil {
			return err
		}
		out["CreateLaunchTemplate"] = lt
		ref = deploy.LaunchTemplateRef{Name: c.NewTemplateName(), Version: "1"}
	}
	fleet, err := deploy.BuildCreateFleetInput(c, ref)
	if err != nil {
		return err
	}
	out["CreateFleet"] = fleet
	b, err := deploy.MarshalRequest(out)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", b)
	return err
}

func printLaunchResult(w io.Writer, res *deploy.LaunchResult, asJSON bool) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(res)
	}
	fmt.Fprintf(w, "Fleet %s (%s, %s)\n", res.FleetID, res.Status.State, res.Status.ActivityStatus)
	created := ""
	if res.CreatedTemplate {
		created = " (created)"
	}
	if res.LaunchTemplate.ID != "" || res.LaunchTemplate.Name != "" {
		fmt.Fprintf(w, "Launch template %s%s\n", res.LaunchTemplate, created)
	}
	fmt.Fprintf(w, "Target %d (on-demand %d, spot %d), fulfilled %.0f\n",
		res.Status.TotalTarget, res.Status.OnDemandTarget, res.Status.SpotTarget, res.Status.Fulfilled)
	for _, e := range append(res.Errors, res.Status.Errors...) {
		fmt.Fprintf(w, "Error: %s\n", e)
	}
	if len(res.Instances) == 0 {
		fmt.Fprintln(w, "No instances yet; the fleet launches them in the background (use --wait 5m to wait).")
		return nil
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "Instance\tType\tLifecycle\tZone\tPrivate IP\tState")
	for _, in := range res.Instances {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", in.InstanceID, in.InstanceType, in.Lifecycle, in.AvailabilityZone, in.PrivateIP, in.State)
	}
	return tw.Flush()
}
