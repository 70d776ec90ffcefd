package main

import (
	"fmt"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"sigs.k8s.io/yaml"

	"github.com/gpumesh/gpumesh/internal/bytesize"
	"github.com/gpumesh/gpumesh/internal/logdedup"
	"github.com/gpumesh/gpumesh/node"
)

func init() { registerCommand(newAgentCommand) }

// agentFlags are the agent's command-line settings. A config file may give
// any of them by the flag's name (dashes or underscores); flags win.
type agentFlags struct {
	cfg        *node.Config
	configFile string
	logLevel   string
	logJSON    bool
	sockBuf    string
	encFile    string
	ec2        ec2Flags // agent_ext.go
}

func newAgentCommand() *cobra.Command {
	f := &agentFlags{cfg: node.DefaultConfig()}
	cmd := &cobra.Command{
		Use:   "agent",
		Short: "Run the gpumesh daemon on this machine",
		Long: `Run the gpumesh daemon. Every machine runs the same command; the cluster decides
which agents hold Raft seats (voters and standbys) and which are clients.

The agent gossips on --gossip-port (TCP and UDP), serves the Control API and the
data plane on --rpc-port, Raft on --raft-port, and metrics, health and the
dashboard on --http-port. Once --bootstrap-expect server-eligible agents have met,
they form the Raft group by themselves.

SIGTERM stops the agent and keeps its place (a restart with the same --data-dir
rejoins with its state); SIGINT leaves the cluster gracefully.`,
		Example: `  # three agents on one machine, each on its own loopback address and default ports
  gpumesh agent --bind 127.0.0.2 --data-dir /tmp/g1 --join 127.0.0.3 --join 127.0.0.4
  gpumesh agent --bind 127.0.0.3 --data-dir /tmp/g2 --join 127.0.0.2
  gpumesh agent --bind 127.0.0.4 --data-dir /tmp/g3 --join 127.0.0.2

  # on EC2, from user-data
  gpumesh agent --data-dir /var/lib/gpumesh --join-ec2-tag gpumesh:cluster=prod --region us-east-1`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			if f.configFile != "" {
				if err := applyConfigFile(cmd.Flags(), f.configFile); err != nil {
					return err
				}
			}
			level := hclog.LevelFromString(f.logLevel)
			if level == hclog.NoLevel {
				return fmt.Errorf("--log-level %q: use trace, debug, info, warn or error", f.logLevel)
			}
			// Repeated warnings and errors (raft's heartbeat failures to a
			// dead voter) are written once per window with a count.
			f.cfg.Logger = logdedup.New(hclog.New(&hclog.LoggerOptions{Name: "gpumesh", Level: level, JSONFormat: f.logJSON, Output: cmd.ErrOrStderr()}), 0)
			sb, err := bytesize.Parse(f.sockBuf)
			if err != nil {
				return fmt.Errorf("--lane-socket-buffer: %w", err)
			}
			f.cfg.LaneSocketBuffer = int(sb)
			if f.encFile != "" {
				if f.cfg.EncryptKey != "" {
					return fmt.Errorf("--encrypt and --encrypt-file both give the gossip key; keep one (--encrypt-file keeps it out of the process list)")
				}
				b, err := os.ReadFile(f.encFile)
				if err != nil {
					return fmt.Errorf("--encrypt-file: %w", err)
				}
				f.cfg.EncryptKey = strings.TrimSpace(string(b))
			}
			if f.cfg.EC2, err = f.ec2.config(); err != nil {
				return err
			}
			a, err := node.NewAgent(f.cfg)
			if err != nil {
				return err
			}
			sigs := make(chan os.Signal, 2)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sigs)
			sig := <-sigs
			f.cfg.Logger.Info("signal received", "signal", sig.String())
			if sig == syscall.SIGINT {
				return a.Leave()
			}
			return a.Shutdown()
		},
	}
	fl := cmd.Flags()
	c := f.cfg
	fl.StringVar(&f.configFile, "config", "", "a YAML or JSON file whose keys are these flags' names (flags given on the command line win)")
	fl.StringVar(&c.NodeName, "name", "", "node name, unique in the cluster (default: the host name; plus the bind address if it is a loopback address, and the gossip port if not the default, so that agents sharing a machine differ: myhost-127.0.0.2)")
	fl.StringVar(&c.BindAddr, "bind", c.BindAddr, "IP address every listener binds to")
	fl.StringVar(&c.AdvertiseAddr, "advertise", "", "IP address other nodes use to reach this one (default: the bind address, or the first private address)")
	fl.IntVar(&c.GossipPort, "gossip-port", c.GossipPort, "gossip port (TCP and UDP)")
	fl.IntVar(&c.RPCPort, "rpc-port", c.RPCPort, "gRPC port: Control API and data plane")
	fl.IntVar(&c.RaftPort, "raft-port", c.RaftPort, "Raft port")
	fl.IntVar(&c.HTTPPort, "http-port", c.HTTPPort, "HTTP port: /metrics, /v1/health and the dashboard")
	fl.StringVar(&c.ServeAddr, "serve", "", "also serve service traffic only (/svc/NAME/... and Host NAME.svc[.DOMAIN], as the HTTP port does) on `ADDR` (host:port, or :port on --bind) with a lean HTTP/1.1 front end that spends less CPU per request than the HTTP port; HTTPS when the HTTP port is (default: off, the HTTP port routes services either way)")
	fl.StringVar(&c.DataDir, "data-dir", "", "where the node keeps its identity, Raft state and task logs (required)")
	fl.StringArrayVar(&c.Join, "join", nil, "gossip `ADDR` (host or host:port) of a member to join; repeatable; retried with backoff")
	fl.IntVar(&c.BootstrapExpect, "bootstrap-expect", c.BootstrapExpect, "server-eligible members to wait for before forming the Raft group")
	fl.BoolVar(&c.Server, "server", c.Server, "may hold a Raft seat; --server=false makes a client that never does")
	fl.IntVar(&c.MaxVoters, "max-voters", c.MaxVoters, "Raft voters (1 to 5)")
	fl.IntVar(&c.Standbys, "standbys", c.Standbys, "non-voting Raft members kept warm for fast promotion")
	fl.StringVar(&c.EncryptKey, "encrypt", "", "gossip encryption key: 32 bytes in base64 (make one with: openssl rand -base64 32)")
	fl.IntVar(&c.ExpectNodes, "expect-nodes", 0, "fleet size to tune gossip failure detection for (more indirect probes and suspicion confirmations above 64, 256 nodes); fixed at start, 0: small")
	fl.StringVar(&f.encFile, "encrypt-file", "", "file holding the gossip encryption key (keeps it out of the process list)")
	fl.IntVar(&c.MaxRanksPerNode, "max-ranks-per-node", 0, "ranks (of all jobs) this node runs at once (default: its CPU cores)")
	fl.DurationVar(&c.CollectiveTimeout, "collective-timeout", c.CollectiveTimeout, "how long a collective waits for a peer before every rank errors")
	fl.StringVar(&c.DataPlane, "data-plane", c.DataPlane, "how tensors travel between nodes: tcp (a plain TCP lane per link on the RPC port, set up over gRPC; TLS-wrapped when TLS is on) or grpc (on the gRPC streams)")
	fl.StringVar(&f.sockBuf, "lane-socket-buffer", bytesize.Format(int64(c.LaneSocketBuffer)), "SO_SNDBUF/SO_RCVBUF of each data-plane TCP lane (0: kernel autotuning, for long paths such as across regions)")
	c.TaskUser = node.DynamicTaskUser
	fl.StringVar(&c.TaskUser, "task-user", c.TaskUser, "user exec tasks run as when their job names none: dynamic (an account of each job's own, with an ID from --task-uid-range and no password entry), a user name, or empty (the agent's own user); an agent that is not root always runs tasks as itself")
	fl.Var(&uidRangeValue{&c.TaskUIDs}, "task-uid-range", "user IDs `FIRST-LAST` that --task-user=dynamic hands out, one per job (default "+node.DefaultTaskUIDs.String()+"; no account may use them)")
	fl.StringSliceVar(&c.TaskUsersAllowed, "task-users-allowed", nil, "further users a job's exec.user may name (comma-separated or repeated), e.g. a training account with access to datasets")
	fl.DurationVar(&c.JobGCAge, "job-gc-age", c.JobGCAge, "how long ended jobs stay inspectable before the leader purges them (0: keep forever)")
	fl.Var(&atLeastValue{p: &c.AllocGCKeep, min: 1, what: "ended allocations each rank keeps"}, "alloc-gc-keep", "`N` ended allocations (crash-loop tries, earlier generations, replaced replicas) that each rank or service replica slot of a running job keeps for job status and logs, newest first, besides those the scheduler still reads; older ones and their logs are purged (at least 1)")
	fl.DurationVar(&c.NodeLossGrace, "node-loss-grace", c.NodeLossGrace, "how long a node may be silent before its ranks count as lost and their jobs are placed again; an agent restarted within it adopts its running tasks")
	fl.StringVar(&c.InstanceType, "instance-type", "", "instance type to report (default: from EC2 metadata)")
	fl.StringVar(&c.AZ, "az", "", "availability zone to report (default: from EC2 metadata)")
	fl.StringVar(&c.Lifecycle, "lifecycle", "", "spot, on-demand or unknown (default: from EC2 metadata, else unknown)")
	fl.StringVar(&f.logLevel, "log-level", "info", "trace, debug, info, warn or error")
	fl.BoolVar(&f.logJSON, "log-json", false, "write logs as JSON lines")
	f.ec2.addFlags(fl)
	addSecurityFlags(fl, &c.Security) // tls.go
	return cmd
}

// applyConfigFile sets every flag the file names that the command line did
// not set.
func applyConfigFile(fl *pflag.FlagSet, path string) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return fmt.Errorf("config file: %w", err)
	}
	var m map[string]any
	if err := yaml.Unmarshal(data, &m); err != nil {
		return fmt.Errorf("config file %s: %w", path, err)
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		name := strings.ReplaceAll(k, "_", "-")
		flag := fl.Lookup(name)
		if flag == nil || name == "config" {
			return fmt.Errorf("config file %s: unknown setting %q (settings are the agent's flag names, see `gpumesh agent --help`)", path, k)
		}
		if flag.Changed {
			continue
		}
		vals := []any{m[k]}
		if l, ok := m[k].([]any); ok {
			vals = l
		}
		for _, v := range vals {
			if err := fl.Set(name, fmt.Sprint(v)); err != nil {
				return fmt.Errorf("config file %s: %s: %w", path, k, err)
			}
		}
	}
	return nil
}

// atLeastValue is an integer flag that refuses values below min.
type atLeastValue struct {
	p    *int
	min  int
	what string // what the number counts, for the error
}

func (v *atLeastValue) String() string {
	if v.p == nil {
		return ""
	}
	return strconv.Itoa(*v.p)
}

func (v *atLeastValue) Set(s string) error {
	n, err := strconv.Atoi(strings.TrimSpace(s))
	if err != nil {
		return fmt.Errorf("%q is not a whole number (%s)", s, v.what)
	}
	if n < v.min {
		return fmt.Errorf("must be at least %d (%s), got %d", v.min, v.what, n)
	}
	*v.p = n
	return nil
}

func (v *atLeastValue) Type() string { return "int" }

// uidRangeValue is --task-uid-range as a flag: FIRST-LAST.
type uidRangeValue struct{ r *node.UIDRange }

func (v *uidRangeValue) String() string {
	if v.r == nil || *v.r == (node.UIDRange{}) {
		return ""
	}
	return v.r.String()
}

func (v *uidRangeValue) Set(s string) error {
	r, err := node.ParseUIDRange(s)
	if err != nil {
		return err
	}
	*v.r = r
	return nil
}

func (v *uidRangeValue) Type() string { return "range" }
