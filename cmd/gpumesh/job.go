package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/gpumesh/gpumesh/consensus"
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
	cmd.AddCommand(newJobRunCommand(), newJobPlanCommand(), newJobStatusCommand(), newJobListCommand(), newJobStopCommand(), newJobLogsCommand())
	return cmd
}

const specHelp = `A job spec is YAML or JSON:

  name: hello
  type: exec              # exec | allreduce | pipeline
  ranks: 2                # or min_ranks / max_ranks for an elastic job
  gpus_per_rank: 0
  ranks_per_gpu: 1        # up to N ranks share each GPU (only with gpus_per_rank: 1)
  placement: pack         # pack (fewest nodes) | spread
  constraints: {az: us-east-1a, lifecycle: on-demand, instance_type: p5.48xlarge, min_gpu_memory: 40GiB}
  restart: {attempts: 3, delay: 5s}
  kill_timeout: 30s
  exec:
    command: ["sh", "-c", "echo rank $RANK of $WORLD_SIZE"]
    env: {NCCL_DEBUG: INFO}
    user: trainer         # default: the agent's --task-user; others need --task-users-allowed
  checkpoint: {uri: s3://bucket/prefix, keep: 3, every: 500}   # or file:///shared/dir; needs a name;
                          # resume_from: NAME continues from another job's checkpoints

  type: allreduce
  allreduce: {sizes: [1MiB, 64MiB], dtype: float32, iters: 20, device: auto, op: sum}

  type: pipeline
  pipeline: {layers: [64, 256, 256, 10], microbatches: 8, microbatch_size: 16, steps: 20,
             seed: 1, learning_rate: 0.05, schedule: 1f1b, device: cpu, mode: train}

With ranks_per_gpu N, each GPU the job gets holds up to N of its ranks
(local ranks 0..N-1 the first, and so on); the GPU is the job's alone, and
each rank's CUDA_VISIBLE_DEVICES names it. pack and spread count N ranks per
free GPU. Not for services.

Exec ranks get the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
LOCAL_WORLD_SIZE, GROUP_RANK, MASTER_ADDR, MASTER_PORT, CUDA_VISIBLE_DEVICES,
TORCHELASTIC_RESTART_COUNT) plus GPUMESH_JOB_ID, GPUMESH_GENERATION,
GPUMESH_RANK and GPUMESH_ADDR. They run as the agent's --task-user (default
dynamic: a user ID of the job's own; HOME and TMPDIR are the rank's
directory), never as root unless allowed.`

func newJobRunCommand() *cobra.Command {
	var f clientFlags
	var detach, wait bool
	var placeTimeout time.Duration
	var resumeFrom string
	cmd := &cobra.Command{
		Use:   "run FILE",
		Short: "Submit a job and follow it until its ranks run",
		Long: "Submit the job in FILE (YAML or JSON; - reads standard input) to the cluster through\n" +
			"any agent, then show its progress until every rank runs (or, with --wait, until\n" +
			"it ends, and print what its ranks reported).\n\n" +
			"A job that does not fit the cluster waits in the queue with the reason shown. After\n" +
			"--place-timeout without a placement the command stops watching and exits 2; the\n" +
			"job stays queued and starts when capacity frees (stop it with `gpumesh job stop`).\n" +
			"Ctrl-C also stops watching only. Check a spec without submitting: `gpumesh job plan`.\n\n" +
			"A service spec whose name matches a running service updates that service instead\n" +
			"(a rolling update: replicas replaced one at a time, each old one stopped once its\n" +
			"replacement is healthy); the same spec again changes nothing and says so.\n\n" +
			"A job with a checkpoint block resumes from the newest checkpoint under its\n" +
			"checkpoint.uri when that checkpoint is its own: written by an earlier generation or\n" +
			"by an earlier run of a job of the same name. A job whose URI holds another job's\n" +
			"newest checkpoint fails to start, saying which; --resume-from NAME (or\n" +
			"checkpoint.resume_from in the file) lets it continue from them on purpose.\n\n" +
			"Exit status: 0 when the job runs (or, with --wait, completes), 1 when it fails or\n" +
			"cannot be submitted (or, a new service, when a replica slot crash-loops: the service\n" +
			"keeps retrying it with back-off), 2 when it was not placed within --place-timeout.\n\n" + specHelp,
		Example: "  gpumesh job run hello.yaml\n  gpumesh job run --detach --json train.yaml\n  gpumesh job run --wait allreduce.yaml\n  gpumesh job run --place-timeout 10m big.yaml",
		Args:    oneArg("a job spec in YAML or JSON, or - for standard input; examples/ holds some"),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec, err := readSpec(args[0], cmd.InOrStdin())
			if err != nil {
				return err
			}
			if resumeFrom != "" {
				if spec.Checkpoint == nil {
					return fmt.Errorf("--resume-from %s: job %s has no checkpoint block to resume into; add checkpoint: {uri: s3://bucket/prefix} to its spec", resumeFrom, spec.Name)
				}
				spec.Checkpoint.ResumeFrom = resumeFrom
				if err := jobspec.Validate(spec); err != nil {
					return fmt.Errorf("--resume-from: %w", err)
				}
			}
			c, done, err := f.dial()
			if err != nil {
				return err
			}
			defer done()
			// The id is chosen here so that retries cannot submit twice.
			id := consensus.NewJobID(spec.Name)
			ctx, cancel := f.ctx(cmd.Context())
			resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: spec, Id: id})
			cancel()
			if err != nil {
				return f.explain(err)
			}
			out := cmd.OutOrStdout()
			if msg := updateMessage(spec.Name, resp); msg != "" {
				// A running service of this name took the spec (or has it
				// already): nothing new to follow.
				if f.json {
					return printJSON(out, resp)
				}
				fmt.Fprintln(out, msg)
				return nil
			}
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
			o := followOptions{untilEnd: wait, placeTimeout: placeTimeout}
			final, err := followJob(cmd.Context(), c, &f, resp.Id, o, out)
			return finishRun(out, f.json, o, final, err)
		},
	}
	addClientFlags(cmd, &f)
	cmd.Flags().BoolVarP(&detach, "detach", "d", false, "return as soon as the job is accepted")
	cmd.Flags().BoolVar(&wait, "wait", false, "wait until the job ends (complete, failed or stopped), not only until it runs (a service never ends by itself: --wait watches it until it is stopped)")
	cmd.Flags().DurationVar(&placeTimeout, "place-timeout", 2*time.Minute, "stop watching (exit 2, the job stays queued) when it is not placed within this long; 0 waits for ever")
	cmd.Flags().StringVar(&resumeFrom, "resume-from", "", "continue from the checkpoints another job (`NAME` or ID) left under this job's checkpoint.uri (sets checkpoint.resume_from)")
	return cmd
}

// updateMessage says what a submission that went to a running service did
// (resp.Outcome "updated", "scaled" or "unchanged"); "" for a new job.
func updateMessage(name string, resp *pb.SubmitJobResponse) string {
	switch resp.GetOutcome() {
	case consensus.SubmitUpdated:
		return fmt.Sprintf("==> service %s (job %s) updated (raft index %d): its replicas are replaced one at a time,\n"+
			"    each old one stopped only once its replacement is healthy. Follow it with\n"+
			"    `gpumesh service status %s`; a replacement that never gets healthy stalls the update\n"+
			"    (the old replicas keep serving): fix the spec and run it again", name, resp.Id, resp.Index, name)
	case consensus.SubmitScaled:
		return fmt.Sprintf("==> service %s (job %s) scaled (raft index %d): only its replica count changed, so the\n"+
			"    running replicas keep running and replicas are added or removed. Follow it with\n"+
			"    `gpumesh service status %s`", name, resp.Id, resp.Index, name)
	case consensus.SubmitUnchanged:
		return fmt.Sprintf("service %s (job %s) already runs this spec: nothing to do", name, resp.Id)
	}
	return ""
}

// finishRun reports how `job run` ends after followJob returned final and
// err: the job's JSON or its results, and the exit status. A failure is
// said once, by followJob's last line, with where to read the rank's output.
func finishRun(out io.Writer, asJSON bool, o followOptions, final *pb.GetJobResponse, err error) error {
	if errors.Is(err, errNotPlaced) {
		if asJSON {
			if err := printJSON(out, final); err != nil {
				return err
			}
		}
		return &exitError{code: exitNotPlaced, err: fmt.Errorf("job %s was not placed within %s: %s\n"+
			"It stays queued and starts when capacity frees. Watch it with `gpumesh job status %s`,\n"+
			"cancel it with `gpumesh job stop %s`, or wait longer with --place-timeout",
			final.Job.Id, o.placeTimeout, final.Job.StatusReason, final.Job.Id, final.Job.Id)}
	}
	if errors.Is(err, errCrashLoop) {
		if asJSON {
			if err := printJSON(out, final); err != nil {
				return err
			}
		} else {
			printCrashLoops(out, final, time.Now())
		}
		name := final.Job.Spec.GetName()
		return &exitError{code: exitFailed, err: fmt.Errorf("service %s is crash-looping: its replicas fail before they get healthy, and new ones start\n"+
			"with a growing back-off. Read why with the `its output` command, follow it with\n"+
			"`gpumesh service status %s`, and fix the spec and run it again (a rolling update) or\n"+
			"stop it with `gpumesh job stop %s`", name, name, final.Job.Id)}
	}
	if err != nil {
		return err
	}
	if asJSON {
		if err := printJSON(out, final); err != nil {
			return err
		}
	} else if o.untilEnd {
		printResults(out, final)
	}
	if final.Job.Status == consensus.JobFailed {
		if al := firstFailed(final); al != nil && !asJSON {
			fmt.Fprintf(out, "    its output: gpumesh job logs %s --rank %d --generation %d\n", final.Job.Id, al.Rank, al.Generation)
		}
		return &exitError{code: exitFailed}
	}
	return nil
}

// firstFailed is the first rank of the job's last generation that failed.
func firstFailed(resp *pb.GetJobResponse) *pb.Allocation {
	for _, al := range resp.Allocations {
		if al.Generation == resp.Job.Generation && al.ClientStatus == consensus.AllocFailed {
			return al
		}
	}
	return nil
}

func readSpec(path string, stdin io.Reader) (*pb.JobSpec, error) {
	var r io.Reader
	name := path
	if path == "-" {
		r, name = stdin, "stdin"
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
	return jobspec.ParseFile(name, data)
}

var (
	// errNotPlaced: the job had no placement when followOptions.placeTimeout ran out.
	errNotPlaced = errors.New("job not placed in time")
	// errCrashLoop: a service's replica slot failed consensus.CrashLoopAt times in a
	// row. Its replicas may never run long enough to be seen running, and a
	// service never ends, so followJob stops watching it then.
	errCrashLoop = errors.New("service replica crash-looping")
)

// followOptions say how long followJob follows a job.
type followOptions struct {
	// untilEnd follows the job until it ends, not only until its ranks run.
	untilEnd bool
	// placeTimeout, when > 0, bounds the wait for the job's first
	// placement; then followJob returns the job's state and errNotPlaced.
	placeTimeout time.Duration
}

// followJob prints the job's progress until all ranks of its current
// generation run (or, with untilEnd, until it ends) and returns its last state.
func followJob(ctx context.Context, c pb.ControlClient, f *clientFlags, id string, o followOptions, out io.Writer) (*pb.GetJobResponse, error) {
	untilEnd := o.untilEnd
	start := time.Now()
	hinted := false
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
				switch {
				case lastGen == 0:
				case j.Spec.GetType() == jobspec.TypeService:
					// A service's replicas are replaced without counting restarts.
					fmt.Fprintf(out, "    generation %d placed (a replacement replica)\n", j.Generation)
				default:
					fmt.Fprintf(out, "    generation %d placed (restart %d)\n", j.Generation, j.Restarts)
				}
				lastGen = j.Generation
			}
			if j.Status == consensus.JobPending && j.StatusReason != lastReason {
				fmt.Fprintf(out, "    pending: %s\n", j.StatusReason)
				lastReason = j.StatusReason
				if j.Generation == 0 && !hinted {
					hinted = true
					wait := "until it is placed"
					if o.placeTimeout > 0 {
						wait = "up to " + o.placeTimeout.String() + " for a placement"
					}
					fmt.Fprintf(out, "    (watching %s; Ctrl-C stops watching and leaves the job queued; `gpumesh job stop %s` cancels it)\n", wait, j.Id)
				}
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
					if consensus.AllocTerminal(al.ClientStatus) && al.ClientStatus != consensus.AllocComplete {
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
		if crashLooping(resp, time.Now()) {
			return resp, errCrashLoop
		}
		switch j.Status {
		case consensus.JobComplete, consensus.JobFailed, consensus.JobStopped:
			if !f.json {
				fmt.Fprintf(out, "==> job %s %s", j.Id, j.Status)
				if j.StatusReason != "" {
					fmt.Fprintf(out, ": %s", j.StatusReason)
				}
				fmt.Fprintln(out)
			}
			return resp, nil
		case consensus.JobRunning:
			if !untilEnd && allRunning(resp) {
				switch {
				case f.json:
				case j.Spec.GetType() == jobspec.TypeService:
					name := j.Spec.GetName()
					fmt.Fprintf(out, "==> service %s (job %s) running: %s (see `gpumesh service status %s`; their logs: `gpumesh job logs %s --all -f`)\n",
						name, j.Id, plural(int(j.WorldSize), "replica"), name, j.Id)
				default:
					fmt.Fprintf(out, "==> job %s running: %s, generation %d (follow with `gpumesh job logs %s -f`)\n", j.Id, plural(int(j.WorldSize), "rank"), j.Generation, j.Id)
				}
				return resp, nil
			}
		}
		if o.placeTimeout > 0 && j.Generation == 0 && time.Since(start) >= o.placeTimeout {
			return resp, errNotPlaced
		}
		if !sleepCtx(ctx, 200*time.Millisecond) {
			return nil, ctx.Err()
		}
	}
}

// crashLooping says whether a live service has a replica slot that failed
// consensus.CrashLoopAt times in a row at now.
func crashLooping(resp *pb.GetJobResponse, now time.Time) bool {
	if consensus.JobTerminal(resp.Job.Status) {
		return false
	}
	for _, b := range consensus.ServiceBackoffs(resp.Job, resp.Allocations, now) {
		if b.Failures >= consensus.CrashLoopAt {
			return true
		}
	}
	return false
}

func allRunning(resp *pb.GetJobResponse) bool {
	n := 0
	for _, al := range resp.Allocations {
		if al.Generation != resp.Job.Generation {
			continue
		}
		if al.ClientStatus != consensus.AllocRunning && al.ClientStatus != consensus.AllocComplete {
			return false
		}
		n++
	}
	return n > 0 && n == int(resp.Job.WorldSize)
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
	readOnly(cmd)
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
	if n := j.Spec.GetRanksPerGpu(); n > 1 {
		fmt.Fprintf(tw, "Ranks per GPU\t%d\n", n)
	}
	fmt.Fprintf(tw, "Restarts\t%d\n", j.Restarts)
	fmt.Fprintf(tw, "Submitted\t%s\n", ago(j.SubmitTime))
	if c := checkpointSummary(resp.Allocations); c != "" {
		fmt.Fprintf(tw, "Checkpoint\t%s\n", c)
	}
	tw.Flush()
	if len(resp.Allocations) == 0 {
		return
	}
	fmt.Fprintln(out)
	tw = newTable(out)
	fmt.Fprintln(tw, "GEN\tRANK\tNODE\tGPUS\tDESIRED\tSTATUS\tEXIT\tSTARTED\tMESSAGE")
	gpuCol := gpuCells(resp.Allocations)
	for i, al := range resp.Allocations {
		gpus := gpuCol[i]
		exit := "-"
		if consensus.AllocTerminal(al.ClientStatus) && al.ClientStatus != consensus.AllocLost {
			// A lost rank has no exit code: its message says why it is lost.
			exit = fmt.Sprint(al.ExitCode)
		}
		fmt.Fprintf(tw, "%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", al.Generation, al.Rank, dash(al.NodeName), gpus,
			al.DesiredStatus, dash(al.ClientStatus), exit, ago(al.StartTime), al.Message)
	}
	tw.Flush()
	if al := lastFailed(resp); al != nil && j.Spec.GetType() != jobspec.TypeService {
		// A failed rank's reason is usually on its stderr: `job logs`
		// prints it after the stdout lines written before it. (A
		// service's replicas say it in their crash-loop lines.)
		fmt.Fprintf(out, "\nrank %d of generation %d failed (exit %d); its output: gpumesh job logs %s --rank %d --generation %d\n",
			al.Rank, al.Generation, al.ExitCode, j.Id, al.Rank, al.Generation)
	}
	printServiceReplicas(out, resp)
	printResults(out, resp)
}

// lastFailed is a rank that failed in the newest generation in which one
// did (the lowest such rank), or nil when none failed.
func lastFailed(resp *pb.GetJobResponse) *pb.Allocation {
	var last *pb.Allocation
	for _, al := range resp.Allocations {
		if al.ClientStatus != consensus.AllocFailed {
			continue
		}
		if last == nil || al.Generation > last.Generation || (al.Generation == last.Generation && al.Rank < last.Rank) {
			last = al
		}
	}
	return last
}

// gpuCells returns the GPUS column of each allocation: its GPU ordinals,
// "-" for none, and for a GPU that several ranks of one generation share
// on one node (ranks_per_gpu), how many: "0 (shared by 2)".
func gpuCells(allocs []*pb.Allocation) []string {
	type gpuKey struct {
		gen  uint64
		node string
		gpu  int32
	}
	holders := map[gpuKey]int{}
	for _, al := range allocs {
		for _, g := range al.Gpus {
			holders[gpuKey{al.Generation, al.NodeId + "/" + al.NodeName, g}]++
		}
	}
	out := make([]string, len(allocs))
	for i, al := range allocs {
		if len(al.Gpus) == 0 {
			out[i] = "-"
			continue
		}
		out[i] = strings.Trim(strings.ReplaceAll(fmt.Sprint(al.Gpus), " ", ","), "[]")
		if len(al.Gpus) == 1 {
			if n := holders[gpuKey{al.Generation, al.NodeId + "/" + al.NodeName, al.Gpus[0]}]; n > 1 {
				out[i] += fmt.Sprintf(" (shared by %d)", n)
			}
		}
	}
	return out
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
	readOnly(cmd)
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
		Args:    oneArg(hintJobIDs),
		RunE: func(cmd *cobra.Command, args []string) error {
			// A job that already ended has nothing to stop: say so rather
			// than "stopping".
			cur, err := query(cmd, &f, func(ctx context.Context, c pb.ControlClient) (*pb.GetJobResponse, error) {
				return c.GetJob(ctx, &pb.GetJobRequest{Id: args[0]})
			})
			if err == nil && consensus.JobTerminal(cur.Job.GetStatus()) && !f.json {
				fmt.Fprintf(cmd.OutOrStdout(), "job %s already ended (%s): nothing to stop\n", args[0], cur.Job.GetStatus())
				return nil
			}
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
