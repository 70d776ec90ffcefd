package main

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/types/known/durationpb"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

func init() {
	registerCommand(newMembersCommand)
	registerCommand(newNodesCommand)
	registerCommand(newRaftCommand)
	registerCommand(newNodeCommand)
}

func newMembersCommand() *cobra.Command {
	var f clientFlags
	cmd := &cobra.Command{
		Use:     "members",
		Short:   "List the gossip members the asked agent knows, with their state",
		Example: "  gpumesh members\n  gpumesh members --address 127.0.0.3:7947 --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.MembersResponse, error) {
				return c.Members(ctx, &pb.MembersRequest{})
			})
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			tw := newTable(cmd.OutOrStdout())
			fmt.Fprintln(tw, "NAME\tGOSSIP ADDR\tSTATE\tSTATUS\tSERVER\tGPUS\tAZ\tLIFECYCLE\tINSTANCE")
			for _, m := range resp.Members {
				n := m.Meta
				if n == nil {
					n = &pb.Node{}
				}
				st := memberStatus(m)
				if n.Ineligible && st != "-" {
					st += ",ineligible"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%s\t%s\t%s\t%s\n", m.Name, m.Addr, m.State, st, n.Server, gpuSummary(n.Gpus), dash(n.Az), dash(n.Lifecycle), dash(n.InstanceType))
			}
			return tw.Flush()
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	return cmd
}

func gpuSummary(gpus []*pb.GPU) string {
	if len(gpus) == 0 {
		return "0"
	}
	model := strings.TrimPrefix(gpus[0].Model, "NVIDIA ")
	return fmt.Sprintf("%d× %s %dGiB", len(gpus), model, gpus[0].MemoryBytes>>30)
}

func newNodesCommand() *cobra.Command {
	var f clientFlags
	var stale bool
	cmd := &cobra.Command{
		Use:     "nodes",
		Short:   "List the nodes in the cluster state, with status, role and resources",
		Example: "  gpumesh nodes\n  gpumesh nodes --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			c, done, err := f.dial()
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := f.ctx(cmd.Context())
			defer cancel()
			resp, err := c.ListNodes(ctx, &pb.ListNodesRequest{Query: &pb.QueryOptions{Stale: stale}})
			if err != nil {
				return f.explain(err)
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			roles := map[string]string{}
			if peers, err := c.RaftPeers(ctx, &pb.RaftPeersRequest{}); err == nil {
				for _, p := range peers.Peers {
					r := "voter"
					if p.Suffrage != "voter" {
						r = "standby"
					}
					if p.Leader {
						r = "leader"
					}
					roles[p.Id] = r
				}
			}
			tw := newTable(cmd.OutOrStdout())
			fmt.Fprintln(tw, "ID\tNAME\tSTATUS\tROLE\tRPC ADDR\tSERVE ADDR\tGPUS\tAZ\tLIFECYCLE\tINSTANCE\tREASON")
			for _, n := range resp.Nodes {
				role := roles[n.Id]
				if role == "" {
					role = "client"
				}
				st := n.Status
				if n.Ineligible {
					st += ",ineligible"
				}
				id := n.Id
				if len(id) > 8 {
					id = id[:8]
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", id, n.Name, st, role, n.RpcAddr, dash(n.ServeAddr), gpuSummary(n.Gpus), dash(n.Az), dash(n.Lifecycle), dash(n.InstanceType), n.StatusReason)
			}
			if err := tw.Flush(); err != nil {
				return err
			}
			if fs := leaderFleetStatus(ctx, c, &f); fs != "" {
				fmt.Fprintf(cmd.OutOrStdout(), "\nfleet: %s\n", fs)
			}
			return nil
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	cmd.Flags().BoolVar(&stale, "stale", false, "answer from the asked agent's replica")
	return cmd
}

func newRaftCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "raft", Short: "Inspect the Raft group", Example: "  gpumesh raft peers"}
	var f clientFlags
	peers := &cobra.Command{
		Use:     "peers",
		Short:   "List the Raft voters and standbys and who leads",
		Example: "  gpumesh raft peers\n  gpumesh raft peers --json",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.RaftPeersResponse, error) {
				return c.RaftPeers(ctx, &pb.RaftPeersRequest{})
			})
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			tw := newTable(cmd.OutOrStdout())
			fmt.Fprintln(tw, "NODE\tID\tRAFT ADDR\tSTATE\tVOTER\tHEALTHY")
			for _, p := range resp.Peers {
				st := "follower"
				if p.Leader {
					st = "leader"
				}
				fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%v\n", dash(p.NodeName), p.Id, p.Address, st, p.Suffrage == "voter", p.Healthy)
			}
			return tw.Flush()
		},
	}
	addClientFlags(peers, &f)
	readOnly(peers)
	var tf clientFlags
	var to string
	transfer := &cobra.Command{
		Use:     "transfer-leadership",
		Short:   "Move Raft leadership to another voter (before maintenance of the leader's machine)",
		Example: "  gpumesh raft transfer-leadership\n  gpumesh raft transfer-leadership --to node-2",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := query(cmd, &tf, func(ctx context.Context, c pb.ControlClient) (*pb.TransferLeadershipResponse, error) {
				return c.TransferLeadership(ctx, &pb.TransferLeadershipRequest{To: to})
			})
			if err != nil {
				return err
			}
			if tf.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			ctx, cancel := tf.ctx(cmd.Context())
			defer cancel()
			fmt.Fprintf(cmd.OutOrStdout(), "leadership moved; leader is now %s\n", newLeader(ctx, &tf, resp.LeaderId))
			return nil
		},
	}
	addClientFlags(transfer, &tf)
	transfer.Flags().StringVar(&to, "to", "", "node ID or name of the voter to lead (default: any up-to-date voter)")
	cmd.AddCommand(peers, transfer)
	return cmd
}

func newNodeCommand() *cobra.Command {
	cmd := &cobra.Command{Use: "node", Short: "Act on one node", Example: "  gpumesh node drain node-3\n  gpumesh node drain --self\n  gpumesh node eligibility --enable node-3"}
	cmd.AddCommand(newNodeDrainCommand(), newNodeEligibilityCommand())
	return cmd
}

func newNodeDrainCommand() *cobra.Command {
	var f clientFlags
	var self, disable bool
	var deadline time.Duration
	var reason string
	drain := &cobra.Command{
		Use:   "drain [--self | NODE]",
		Short: "Drain a node: no new work, its ranks placed elsewhere, its tasks told to checkpoint",
		Long: `Drain marks the node draining in gossip and in Raft. A leader hands over leadership,
a voter is replaced, its allocations are placed elsewhere as a new generation,
and its tasks get SIGTERM. The file named by $GPUMESH_PREEMPT_DEADLINE_FILE in
each task's environment then holds the time SIGKILL comes (Unix seconds and a
newline, such as "1796620800"), so that the task can checkpoint in time.
This is what a spot interruption notice does by itself.

A drained node stays draining (in ` + "`gpumesh members`" + ` and ` + "`gpumesh nodes`" + `) until
` + "`gpumesh node drain --disable NODE`" + ` (or ` + "`gpumesh node eligibility --enable NODE`" + `)
makes it ready for new work again; work already moved away stays where it went.`,
		Example: "  gpumesh node drain --self\n  gpumesh node drain node-2 --deadline 2m\n  gpumesh node drain --disable node-2",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if (len(args) == 1) == self {
				return fmt.Errorf("name a node (ID or name) or pass --self, not both")
			}
			if disable {
				return setEligibility(cmd, &f, args, self, true)
			}
			req := &pb.DrainNodeRequest{Self: self, Deadline: durationpb.New(deadline), Reason: reason}
			if len(args) == 1 {
				req.NodeId = args[0]
			}
			resp, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.DrainNodeResponse, error) {
				return c.DrainNode(ctx, req)
			})
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			ctx, cancel := f.ctx(cmd.Context())
			defer cancel()
			fmt.Fprintf(cmd.OutOrStdout(), "node %s draining (raft index %d, deadline %s); end it with `gpumesh node drain --disable %s`\n", nodeLabel(ctx, &f, resp.NodeId), resp.Index, deadline, orSelf(args))
			return nil
		},
	}
	addClientFlags(drain, &f)
	drain.Flags().BoolVar(&self, "self", false, "drain the agent named by --address")
	drain.Flags().BoolVar(&disable, "disable", false, "end the drain: the node is ready for new work again (as node eligibility --enable)")
	drain.Flags().DurationVar(&deadline, "deadline", 2*time.Minute, "how long the node's tasks have to checkpoint and stop")
	drain.Flags().StringVar(&reason, "reason", "drained by hand", "why, shown in the REASON column of 'gpumesh nodes'")
	return drain
}

func newNodeEligibilityCommand() *cobra.Command {
	var f clientFlags
	var self, enable, disable bool
	cmd := &cobra.Command{
		Use:   "eligibility (--enable | --disable) [--self | NODE]",
		Short: "Let a node take new work again (also ending a drain), or keep new work off it",
		Long: `--disable keeps new work off the node: what runs there stays (unlike a drain).
--enable makes the node eligible again and ends a drain, so that it is ready for
new work; work already moved away stays where it went. ` + "`gpumesh members`" + ` and
` + "`gpumesh nodes`" + ` show the state (ready, draining; ineligible).`,
		Example: "  gpumesh node eligibility --disable node-2\n  gpumesh node eligibility --enable node-2\n  gpumesh node eligibility --enable --self",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if enable == disable {
				return fmt.Errorf("pass --enable or --disable")
			}
			if (len(args) == 1) == self {
				return fmt.Errorf("name a node (ID or name) or pass --self, not both")
			}
			return setEligibility(cmd, &f, args, self, enable)
		},
	}
	addClientFlags(cmd, &f)
	cmd.Flags().BoolVar(&self, "self", false, "the agent named by --address")
	cmd.Flags().BoolVar(&enable, "enable", false, "make the node eligible for new work (ends a drain)")
	cmd.Flags().BoolVar(&disable, "disable", false, "keep new work off the node; what runs there stays")
	return cmd
}

func setEligibility(cmd *cobra.Command, f *clientFlags, args []string, self, eligible bool) error {
	req := &pb.NodeEligibilityRequest{Self: self, Eligible: eligible}
	if len(args) == 1 {
		req.NodeId = args[0]
	}
	resp, err := query(cmd, f, func(ctx context.Context, c pb.ControlClient) (*pb.NodeEligibilityResponse, error) {
		return c.NodeEligibility(ctx, req)
	})
	if err != nil {
		return err
	}
	if f.json {
		return printJSON(cmd.OutOrStdout(), resp)
	}
	what := "ready for new work"
	if !eligible {
		what = "ineligible: no new work, what runs there stays"
	}
	fmt.Fprintf(cmd.OutOrStdout(), "node %s %s (raft index %d)\n", dash(resp.NodeName), what, resp.Index)
	return nil
}

func orSelf(args []string) string {
	if len(args) == 1 {
		return args[0]
	}
	return "--self"
}

// leaderFleetStatus asks the leader for its last fleet scaling change.
func leaderFleetStatus(ctx context.Context, c pb.ControlClient, f *clientFlags) string {
	info, err := c.AgentInfo(ctx, &pb.AgentInfoRequest{})
	if err != nil {
		return ""
	}
	if info.LeaderRpcAddr == "" || info.LeaderRpcAddr == info.Node.GetRpcAddr() {
		return info.FleetStatus
	}
	lf := *f
	lf.address = info.LeaderRpcAddr
	lc, done, err := lf.dial()
	if err != nil {
		return ""
	}
	defer done()
	li, err := lc.AgentInfo(ctx, &pb.AgentInfoRequest{})
	if err != nil {
		return ""
	}
	return li.FleetStatus
}
