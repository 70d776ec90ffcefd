package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

func init() { registerCommand(newJobCommand) }

func newJobCommand() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "job",
		Short: "Submit, inspect and stop jobs",
		Example: `  gpumesh job run examples/hello.yaml
  gpumesh job status hello-1a2b3c4d
  gpumesh job logs hello-1a2b3c4d --rank 1 -f`,
	}
	cmd.AddCommand(newJobRunCommand(), newJobStatusCommand(), newJobListCommand(), newJobStopCommand(), newJobLogsCommand())
	return cmd
}

const specHelp = `A job spec is YAML or JSON:

  name: hello
  type: exec              # exec | allreduce | pipeline
  ranks: 2                # or min_ranks / max_ranks for an elastic job
  gpus_per_rank: 0
  placement: pack         # pack (fewest nodes) | spread
  constraints: {az: us-east-1a, lifecycle: on-demand, instance_type: p5.48xlarge, min_gpu_memory: 40GiB}
  restart: {attempts: 3, delay: 5s}
  kill_timeout: 30s
  exec:
    command: ["sh", "-c", "echo rank $RANK of $WORLD_SIZE"]
    env: {NCCL_DEBUG: INFO}

  type: allreduce
  allreduce: {sizes: [1MiB, 64MiB], dtype: float32, iters: 20, device: auto, op: sum}

  type: pipeline
  pipeline: {layers: [64, 256, 256, 10], microbatches: 8, microbatch_size: 16, steps: 20,
             seed: 1, learning_rate: 0.05, schedule: 1f1b, device: cpu, mode: train}

Exec ranks get the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES,
TORCHELASTIC_RESTART_COUNT) plus GPUMESH_JOB_ID, GPUMESH_GENERATION,
GPUMESH_RANK and GPUMESH_ADDR.`

func newJobRunCommand() *cobra.Command {
	var f clientFlags
	var detach, wait bool
	cmd := &cobra.Command{
		Use:   "run FILE",
		Short: "Submit a job and follow it until its ranks run",
		Long: "Submit the job in FILE (YAML or JSON; - reads standard input) to the cluster through\n" +
			"any agent, then show its progress until every rank runs (or, with --wait, until\n" +
			"it ends). The exit status is 0 when the job runs or completes, 1 when it fails.\n\n" + specHelp,
		Example: "  gpumesh job run hello.yaml\n  gpumesh job run --detach --json train.yaml\n  gpumesh job run --wait allreduce.yaml",
		Args:    cobra.ExactArgs(1),
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
			// The id is chosen here so that retries cannot submit twice.
			id := clientJobID(spec.Name)
			ctx, cancel := f.ctx(cmd.Context())
			resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec, Id: id})
			cancel()
			if err != nil {
				return f.explain(err)
			}
			out := cmd.OutOrStdout()
			if detach {
				if f.json {
					return printJSON(out, resp)
				}
				fmt.Fprintf(out, "job %s submitted (raft index %d)\n", resp.Id, resp.Index)
				return nil
			}
			if !f.json {
				fmt.Fprintf(out, "==> job %s submitted (raft index %d)\n", resp.Id, resp.Index)
			}
			final, err := followJob(cmd.Context(), c, &f, resp.Id, wait, out)
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(out, final)
			}
			if final.Job.Status == "failed" {
				return fmt.Errorf("job %s failed: %s", final.Job.Id, final.Job.StatusReason)
			}
			return nil
		},
	}
	addClientFlags(cmd, &f)
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "return as soon as the job is accepted")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the job ends (complete, failed or stopped), not only until it runs")
	return cmd
}

func readSpec(path string, stdin io.Reader) (*pb.JobSpec, error) {
	var r io.Reader
	if path == "-" {
		r = stdin
	} else {
		fh, err := os.Open(path)
		if err != nil {
			return nil, fmt.Errorf("job spec: %w", err)
		}
		defer fh.Close()
		r = fh
	}
	data, err := io.ReadAll(io.LimitReader(r, jobspec.MaxSpecBytes+1))
	if err != nil {
		return nil, fmt.Errorf("job spec: %w", err)
	}
	return jobspec.Parse(data)
}

func clientJobID(name string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	if len(name) > 40 {
		name = name[:40]
	}
	return strings.ToLower(name) + "-" + hex.EncodeToString(b[:])
}

// followJob prints the job's progress until all ranks of its current
// generation run (or, with untilEnd, until it ends) and returns its last state.
func followJob(ctx context.Context, c pb.ControlClient, f *clientFlags, id string, untilEnd bool, out io.Writer) (*pb.GetJobResponse, error) {
	seen := map[string]string{}
	lastReason := ""
	var lastGen uint64
	failures := 0
	for {
		cctx, cancel := f.ctx(ctx)
		resp, err := c.GetJob(cctx, &pb.GetJobRequest{Id: id})
		cancel()
		if err != nil {
			if s, ok := status.FromError(err); ok && (s.Code() == codes.Unavailable || s.Code() == codes.DeadlineExceeded) && failures < 20 {
				failures++
				if !sleepCtx(ctx, 500*time.Millisecond) {
					return nil, ctx.Err()
				}
				continue
			}
			return nil, f.explain(err)
		}
		failures = 0
		j := resp.Job
		if !f.json {
			if j.Generation != lastGen && j.Generation > 0 {
				if lastGen != 0 {
					fmt.Fprintf(out, "    generation %d placed (restart %d)\n", j.Generation, j.Restarts)
				}
				lastGen = j.Generation
			}
			if j.Status == "pending" && j.StatusReason != lastReason {
				fmt.Fprintf(out, "    pending: %s\n", j.StatusReason)
				lastReason = j.StatusReason
			}
			for _, al := range resp.Allocations {
				if al.Generation != j.Generation {
					continue
				}
				key := fmt.Sprintf("%d/%d", al.Generation, al.Rank)
				if seen[key] != al.ClientStatus && al.ClientStatus != "" {
					seen[key] = al.ClientStatus
					line := fmt.Sprintf("    rank %d (gen %d) %s on %s", al.Rank, al.Generation, al.ClientStatus, dash(al.NodeName))
					if len(al.Gpus) > 0 {
						line += fmt.Sprintf(" gpus %v", al.Gpus)
					}
					if terminalStatus(al.ClientStatus) && al.ClientStatus != "complete" {
						line += fmt.Sprintf(" (exit %d", al.ExitCode)
						if al.Message != "" {
							line += ": " + al.Message
						}
						line += ")"
					}
					fmt.Fprintln(out, line)
				}
			}
		}
		switch j.Status {
		case "complete", "failed", "stopped":
			if !f.json {
				fmt.Fprintf(out, "==> job %s %s", j.Id, j.Status)
				if j.StatusReason != "" {
					fmt.Fprintf(out, ": %s", j.StatusReason)
				}
				fmt.Fprintln(out)
			}
			return resp, nil
		case "running":
			if !untilEnd && allRunning(resp) {
				if !f.json {
					fmt.Fprintf(out, "==> job %s running: %d ranks, generation %d (follow with `gpumesh job logs %s -f`)\n", j.Id, j.WorldSize, j.Generation, j.Id)
				}
				return resp, nil
			}
		}
		if !sleepCtx(ctx, 200*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
}

func allRunning(resp *pb.GetJobResponse) bool {
	n := 0
	for _, al := range resp.Allocations {
		if al.Generation != resp.Job.Generation {
			continue
		}
		if al.ClientStatus != "running" && al.ClientStatus != "complete" {
			return false
		}
		n++
	}
	return n > 0 && n == int(resp.Job.WorldSize)
}

func terminalStatus(s string) bool {
	return s == "complete" || s == "failed" || s == "stopped" || s == "lost"
}

func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func newJobStatusCommand() *cobra.Command {
	var f clientFlags
	var stale bool
	cmd := &cobra.Command{
		Use:     "status [ID]",
		Short:   "Show a job's state, ranks and results (all jobs without an ID)",
		Example: "  gpumesh job status\n  gpumesh job status hello-1a2b3c4d\n  gpumesh job status hello-1a2b3c4d --json",
		Args:    cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return listJobs(cmd, &f, stale)
			}
			resp, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.GetJobResponse, error) {
				return c.GetJob(ctx, &pb.GetJobRequest{Id: args[0], Query: &pb.QueryOptions{Stale: stale}})
			})
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if f.json {
				return printJSON(out, resp)
			}
			printJob(out, resp)
			return nil
		},
	}
	addClientFlags(cmd, &f)
	cmd.Flags().BoolVar(&stale, "stale", false, "answer from the asked agent's replica, without asking the leader")
	return cmd
}

func printJob(out io.Writer, resp *pb.GetJobResponse) {
	j := resp.Job
	tw := newTable(out)
	fmt.Fprintf(tw, "ID\t%s\n", j.Id)
	fmt.Fprintf(tw, "Name\t%s\n", j.Spec.GetName())
	fmt.Fprintf(tw, "Type\t%s\n", j.Spec.GetType())
	fmt.Fprintf(tw, "Status\t%s\n", j.Status)
	if j.StatusReason != "" {
		fmt.Fprintf(tw, "Reason\t%s\n", j.StatusReason)
	}
	fmt.Fprintf(tw, "Generation\t%d\n", j.Generation)
	fmt.Fprintf(tw, "Ranks\t%d\n", j.WorldSize)
	fmt.Fprintf(tw, "Restarts\t%d\n", j.Restarts)
	fmt.Fprintf(tw, "Submitted\t%s\n", ago(j.SubmitTime))
	tw.Flush()
	if len(resp.Allocations) == 0 {
		return
	}
	fmt.Fprintln(out)
	tw = newTable(out)
	fmt.Fprintln(tw, "GEN\tRANK\tNODE\tGPUS\tDESIRED\tSTATUS\tEXIT\tSTARTED\tMESSAGE")
	for _, al := range resp.Allocations {
		gpus := "-"
		if len(al.Gpus) > 0 {
			gpus = strings.Trim(strings.ReplaceAll(fmt.Sprint(al.Gpus), " ", ","), "[]")
		}
		exit := "-"
		if terminalStatus(al.ClientStatus) {
			exit = fmt.Sprint(al.ExitCode)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", al.Generation, al.Rank, dash(al.NodeName), gpus,
			al.DesiredStatus, dash(al.ClientStatus), exit, ago(al.StartTime), al.Message)
	}
	tw.Flush()
	printResults(out, resp)
}

// printResults shows what built-in drivers reported (e.g. all-reduce busbw).
func printResults(out io.Writer, resp *pb.GetJobResponse) {
	for _, al := range resp.Allocations {
		if al.Generation != resp.Job.Generation || al.Result == nil {
			continue
		}
		m := al.Result.AsMap()
		if rows, ok := m["sizes"].([]any); ok && len(rows) > 0 {
			fmt.Fprintf(out, "\nrank %d results:\n", al.Rank)
			tw := newTable(out)
			fmt.Fprintln(tw, "SIZE\tTYPE\tTIME(us)\tALGBW(GB/s)\tBUSBW(GB/s)\tCHECK")
			for _, r := range rows {
				row, _ := r.(map[string]any)
				fmt.Fprintf(tw, "%v\t%v\t%v\t%v\t%v\t%v\n", row["size"], row["dtype"], row["time_us"], row["algbw_gbps"], row["busbw_gbps"], row["check"])
			}
			tw.Flush()
		} else if rows, ok := m["collectives"].([]any); ok && len(rows) > 0 {
			// Collectives an exec rank ran through its agent (PyTorch backend).
			fmt.Fprintf(out, "\nrank %d collectives through its agent:\n", al.Rank)
			tw := newTable(out)
			fmt.Fprintln(tw, "OP\tCOUNT\tBYTES\tMEAN(ms)\tMAX(ms)")
			for _, r := range rows {
				row, _ := r.(map[string]any)
				fmt.Fprintf(tw, "%v\t%v\t%v\t%v\t%v\n", row["op"], row["ops"], row["bytes"], row["mean_latency_ms"], row["max_latency_ms"])
			}
			tw.Flush()
		} else if len(m) > 0 {
			keys := make([]string, 0, len(m))
			for k := range m {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			fmt.Fprintf(out, "\nrank %d results:", al.Rank)
			for _, k := range keys {
				fmt.Fprintf(out, " %s=%v", k, m[k])
			}
			fmt.Fprintln(out)
		}
		break
	}
}

func newJobListCommand() *cobra.Command {
	var f clientFlags
	var stale bool
	cmd := &cobra.Command{
		Use:     "list",
		Short:   "List jobs",
		Example: "  gpumesh job list\n  gpumesh job list --json",
		Args:    cobra.NoArgs,
		RunE:    func(cmd *cobra.Command, args []string) error { return listJobs(cmd, &f, stale) },
	}
	addClientFlags(cmd, &f)
	cmd.Flags().BoolVar(&stale, "stale", false, "answer from the asked agent's replica")
	return cmd
}

func listJobs(cmd *cobra.Command, f *clientFlags, stale bool) error {
	resp, err := query(cmd, f, func(ctx context.Context, c pb.ControlClient) (*pb.ListJobsResponse, error) {
		return c.ListJobs(ctx, &pb.ListJobsRequest{Query: &pb.QueryOptions{Stale: stale}})
	})
	if err != nil {
		return err
	}
	out := cmd.OutOrStdout()
	if f.json {
		return printJSON(out, resp)
	}
	if len(resp.Jobs) == 0 {
		fmt.Fprintln(out, "no jobs")
		return nil
	}
	tw := newTable(out)
	fmt.Fprintln(tw, "ID\tTYPE\tSTATUS\tRANKS\tGEN\tRESTARTS\tSUBMITTED\tREASON")
	for _, j := range resp.Jobs {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\n", j.Id, j.Spec.GetType(), j.Status, j.WorldSize, j.Generation, j.Restarts, ago(j.SubmitTime), j.StatusReason)
	}
	return tw.Flush()
}

func newJobStopCommand() *cobra.Command {
	var f clientFlags
	cmd := &cobra.Command{
		Use:     "stop ID",
		Short:   "Stop a job: its ranks get SIGTERM, then SIGKILL after the kill timeout",
		Example: "  gpumesh job stop hello-1a2b3c4d",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			resp, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.StopJobResponse, error) {
				return c.StopJob(ctx, &pb.StopJobRequest{Id: args[0]})
			})
			if err != nil {
				return err
			}
			if f.json {
				return printJSON(cmd.OutOrStdout(), resp)
			}
			fmt.Fprintf(cmd.OutOrStdout(), "job %s stopping (raft index %d)\n", args[0], resp.Index)
			return nil
		},
	}
	addClientFlags(cmd, &f)
	return cmd
}

func newJobLogsCommand() *cobra.Command {
	var f clientFlags
	var rank int32
	var stderr, follow bool
	var gen uint64
	cmd := &cobra.Command{
		Use:     "logs ID",
		Short:   "Print a rank's stdout (or stderr) from whichever node holds it",
		Example: "  gpumesh job logs hello-1a2b3c4d\n  gpumesh job logs hello-1a2b3c4d --rank 1 --stderr -f\n  gpumesh job logs hello-1a2b3c4d --generation 1",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			c, done, err := f.dial()
			if err != nil {
				return err
			}
			defer done()
			ctx := cmd.Context()
			var cancel context.CancelFunc
			if !follow {
				ctx, cancel = f.ctx(ctx)
			} else {
				ctx, cancel = context.WithCancel(ctx)
			}
			defer cancel()
			stream, err := c.Logs(ctx, &pb.LogsRequest{JobId: args[0], Rank: rank, Stderr: stderr, Follow: follow, Generation: gen})
			if err != nil {
				return f.explain(err)
			}
			out := cmd.OutOrStdout()
			for {
				ch, err := stream.Recv()
				if errors.Is(err, io.EOF) {
					return nil
				}
				if err != nil {
					return f.explain(err)
				}
				if _, err := out.Write(ch.Data); err != nil {
					return err
				}
			}
		},
	}
	addClientFlags(cmd, &f)
	cmd.Flags().Int32Var(&rank, "rank", 0, "which rank's logs")
	cmd.Flags().BoolVar(&stderr, "stderr", false, "stderr instead of stdout")
	cmd.Flags().BoolVarP(&follow, "follow", "f", false, "keep printing new output")
	cmd.Flags().Uint64Var(&gen, "generation", 0, "which generation (0: the current one)")
	return cmd
}
