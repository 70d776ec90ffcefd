package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

func newJobPlanCommand() *cobra.Command {
	var f clientFlags
	cmd := &cobra.Command{
		Use:   "plan FILE",
		Short: "Say whether and where a job would be placed now, without submitting it",
		Long: "Check the job in FILE (YAML or JSON; - reads standard input) and place it, as a dry\n" +
			"run, against the cluster's current nodes and allocations with the leader's own\n" +
			"planner: where each rank would go, or why it would wait. Nothing is submitted.\n" +
			"Jobs already queued are placed first, so they may take the capacity it shows.\n\n" +
			"Exit status: 0 when the job would be placed now, 2 when it would wait, 1 when the\n" +
			"spec is invalid or the cluster cannot be asked.",
		Example: "  gpumesh job plan examples/hello.yaml\n  gpumesh job plan --json train.yaml",
		Args:    oneArg("a job spec in YAML or JSON, or - for standard input; examples/ holds some"),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, err := readSpec(args[0], cmd.InOrStdin())
			if err != nil {
				return err
			}
			c, done, err := f.dial()
			if err != nil {
				return err
			}
			defer done()
			ctx, cancel := f.ctx(cmd.Context())
			defer cancel()
			res, err := planJob(ctx, c, spec)
			if err != nil {
				return f.explain(err)
			}
			out := cmd.OutOrStdout()
			if f.json {
				b, err := json.MarshalIndent(res, "", "  ")
				if err != nil {
					return err
				}
				fmt.Fprintln(out, string(b))
			} else {
				printPlan(out, spec, res)
			}
			if !res.Placeable {
				return &exitError{code: exitNotPlaced}
			}
			return nil
		},
	}
	addClientFlags(cmd, &f)
	readOnly(cmd)
	return cmd
}

// planResult is `job plan`'s answer (its --json form).
type planResult struct {
	Placeable bool   `json:"placeable"`
	Reason    string `json:"reason,omitempty"`
	// QueuedAhead counts pending jobs the leader would place first.
	QueuedAhead int        `json:"queued_ahead"`
	Ranks       []planRank `json:"ranks"`
}

type planRank struct {
	Rank           int    `json:"rank"`
	NodeID         string `json:"node_id"`
	NodeName       string `json:"node_name"`
	GPUs           []int  `json:"gpus"`
	LocalRank      int    `json:"local_rank"`
	LocalWorldSize int    `json:"local_world_size"`
}

// planJob reads the cluster state (from the leader) and places spec on it
// as a dry run through consensus.PlanJob.
func planJob(ctx context.Context, c pb.ControlClient, spec *pb.JobSpec) (*planResult, error) {
	nodes, err := c.ListNodes(ctx, &pb.ListNodesRequest{})
	if err != nil {
		return nil, err
	}
	jobs, err := c.ListJobs(ctx, &pb.ListJobsRequest{})
	if err != nil {
		return nil, err
	}
	res := &planResult{Ranks: []planRank{}}
	var allocs []*pb.Allocation
	for _, j := range jobs.Jobs {
		if consensus.JobTerminal(j.Status) {
			continue
		}
		if j.Status == consensus.JobPending {
			res.QueuedAhead++
		}
		resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: j.Id})
		if err != nil {
			return nil, err
		}
		allocs = append(allocs, resp.Allocations...)
	}
	plan, err := consensus.PlanJob(nodes.Nodes, allocs, spec)
	var ue *sharding.UnplaceableError
	switch {
	case errors.As(err, &ue):
		res.Reason = ue.Reason
		return res, nil
	case err != nil:
		return nil, err
	}
	names := map[string]string{}
	for _, n := range nodes.Nodes {
		names[n.Id] = n.Name
	}
	res.Placeable = true
	for _, r := range plan.Ranks {
		gpus := r.GPUs
		if gpus == nil {
			gpus = []int{}
		}
		res.Ranks = append(res.Ranks, planRank{Rank: r.Rank, NodeID: r.NodeID, NodeName: names[r.NodeID], GPUs: gpus, LocalRank: r.LocalRank, LocalWorldSize: r.LocalWorldSize})
	}
	return res, nil
}

func printPlan(out io.Writer, spec *pb.JobSpec, res *planResult) {
	if !res.Placeable {
		fmt.Fprintf(out, "==> %s would wait: %s\n", spec.Name, res.Reason)
		fmt.Fprintln(out, "    submitted now, it would stay queued until that much capacity frees")
		return
	}
	nodes := map[string]bool{}
	for _, r := range res.Ranks {
		nodes[r.NodeID] = true
	}
	fmt.Fprintf(out, "==> %s would be placed now: %s on %s\n", spec.Name, plural(len(res.Ranks), "rank"), plural(len(nodes), "node"))
	tw := newTable(out)
	fmt.Fprintln(tw, "RANK\tNODE\tGPUS\tLOCAL RANK")
	for _, r := range res.Ranks {
		fmt.Fprintf(tw, "%d\t%s\t%s\t%d of %d\n", r.Rank, dash(r.NodeName), intList(r.GPUs), r.LocalRank, r.LocalWorldSize)
	}
	tw.Flush()
	if res.QueuedAhead > 0 {
		fmt.Fprintf(out, "    note: %s queued ahead of it may take this capacity first\n", plural(res.QueuedAhead, "pending job"))
	}
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// intList prints GPU indices as "0,1", or "-" for none.
func intList(v []int) string {
	if len(v) == 0 {
		return "-"
	}
	s := ""
	for i, x := range v {
		if i > 0 {
			s += ","
		}
		s += fmt.Sprint(x)
	}
	return s
}
