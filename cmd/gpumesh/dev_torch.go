package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/ddpout"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// The DDP part of `gpumesh dev --demo`: after the built-in all-reduce,
// examples/ddp/train.py trains a small MLP as an exec job whose ranks move
// their gradients through the agents (backend "gpumesh"), when a Python
// with PyTorch and the checkout's scripts are there. Nothing of it needs a
// GPU: the job asks for none, so its ranks see CUDA_VISIBLE_DEVICES="".

const (
	// envDemoPython names the interpreter the demo's DDP part runs.
	envDemoPython = "GPUMESH_PYTHON"
	// demoDDPScript and demoDDPPyDir are where the demo finds the training
	// script and the gpumesh package, relative to the working directory
	// (the repository root, from which the README runs the demo).
	demoDDPScript = "examples/ddp/train.py"
	demoDDPPyDir  = "python"
	// demoDDPSteps is how many training steps the demo's job runs.
	demoDDPSteps = 8
	// demoDDPMaxRanks bounds the DDP job's ranks (one per agent, at most
	// this many), so that a larger dev cluster does not crowd the machine.
	demoDDPMaxRanks = 3
	// torchProbeTimeout bounds one interpreter's `import torch`, which
	// takes seconds on a loaded small machine.
	torchProbeTimeout = 60 * time.Second
	// demoDDPTimeout bounds the whole DDP job, from submission to its end.
	demoDDPTimeout = 3 * time.Minute
)

var (
	errDemoInterrupted = errors.New("interrupted: the demo stops its jobs and agents")
	errDemoDDPFailed   = errors.New("the demo's DDP job failed")
	errDemoDDPCheck    = errors.New("the demo's DDP job ended with results that do not check out")
)

// torchSetup is what the DDP part runs with, or why it is skipped.
type torchSetup struct {
	Python  string // absolute path of an interpreter that imports torch
	Version string // its torch.__version__
	Script  string // absolute path of examples/ddp/train.py
	PyDir   string // absolute path of the checkout's python/ (PYTHONPATH)
	// Skip, when set, is the line that says what is skipped and how to
	// get it; the other fields are then unset.
	Skip string
}

// torchProbe looks for PyTorch in the background (importing torch takes
// seconds, spent while the agents start). Wait returns its answer; Stop
// ends it early and waits for its process.
type torchProbe struct {
	cancel context.CancelFunc
	done   chan struct{}
	res    torchSetup
}

func startTorchProbe(ctx context.Context, getenv func(string) string, dir string) *torchProbe {
	ctx, cancel := context.WithCancel(ctx)
	p := &torchProbe{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(p.done)
		p.res = findTorch(ctx, getenv, dir)
	}()
	return p
}

func (p *torchProbe) Wait() torchSetup { <-p.done; return p.res }
func (p *torchProbe) Stop()            { p.cancel(); <-p.done }

// findTorch finds the scripts under dir and an interpreter that can
// import torch: $GPUMESH_PYTHON if set, else the first of python3 on PATH
// and /usr/bin/python3 (Debian's python3-torch installs for the latter,
// which may not be the first python3 on PATH).
func findTorch(ctx context.Context, getenv func(string) string, dir string) torchSetup {
	script, pydir := filepath.Join(dir, demoDDPScript), filepath.Join(dir, demoDDPPyDir)
	for _, p := range []string{script, filepath.Join(pydir, "gpumesh", "torch.py")} {
		if _, err := os.Stat(p); err != nil {
			return torchSetup{Skip: fmt.Sprintf("%s not found (run the demo from the repository root to include it): skipping the DDP part", p)}
		}
	}
	var cands []string
	if py := getenv(envDemoPython); py != "" {
		cands = []string{py}
	} else {
		if py, err := exec.LookPath("python3"); err == nil {
			cands = append(cands, py)
		}
		if len(cands) == 0 || cands[0] != "/usr/bin/python3" {
			cands = append(cands, "/usr/bin/python3")
		}
	}
	var tried []string
	for _, py := range cands {
		abs, version, err := probeTorch(ctx, py)
		if err == nil {
			return torchSetup{Python: abs, Version: version, Script: script, PyDir: pydir}
		}
		tried = append(tried, fmt.Sprintf("%s: %v", py, err))
	}
	if getenv(envDemoPython) != "" {
		return torchSetup{Skip: fmt.Sprintf("%s=%s cannot import torch (%s; point it at a Python with PyTorch): skipping the DDP part", envDemoPython, cands[0], strings.Join(tried, "; "))}
	}
	return torchSetup{Skip: fmt.Sprintf("PyTorch not found (%s; apt-get install python3-torch, or %s=/path/to/python): skipping the DDP part", strings.Join(tried, "; "), envDemoPython)}
}

// probeTorch runs py to import torch; it returns py's absolute path and
// the torch version, or why not.
func probeTorch(ctx context.Context, py string) (abs, version string, err error) {
	abs, err = exec.LookPath(py)
	if err != nil {
		return "", "", errors.New("not found")
	}
	if abs, err = filepath.Abs(abs); err != nil {
		return "", "", err
	}
	ctx, cancel := context.WithTimeout(ctx, torchProbeTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, abs, "-c", "import torch, torch.distributed; print(torch.__version__)")
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		if ctx.Err() != nil {
			return "", "", fmt.Errorf("import torch did not finish in %s", torchProbeTimeout)
		}
		msg := strings.TrimSpace(stderr.String())
		if i := strings.LastIndexByte(msg, '\n'); i >= 0 {
			msg = msg[i+1:] // the exception's line
		}
		if msg == "" {
			msg = err.Error()
		}
		return "", "", errors.New(msg)
	}
	return abs, strings.TrimSpace(stdout.String()), nil
}

// demoDDPSpec is the DDP job: train.py with backend gpumesh, one rank per
// node, writing each rank's losses and parameters under outDir.
func demoDDPSpec(ts torchSetup, ranks int, outDir string) *pb.JobSpec {
	spec := &pb.JobSpec{
		Name:      "demo-ddp",
		Type:      jobspec.TypeExec,
		Ranks:     int32(ranks),
		Placement: "spread",
		Exec: &pb.ExecSpec{
			Command: []string{ts.Python, ts.Script, "--backend", "gpumesh", "--steps", fmt.Sprint(demoDDPSteps), "--out", outDir},
			Env:     map[string]string{"PYTHONPATH": ts.PyDir, "PYTHONUNBUFFERED": "1"},
		},
		// One more generation, so that a MASTER_PORT taken by another
		// program at the wrong moment does not fail the demo; the failed
		// generation is shown all the same.
		Restart:     &pb.RestartPolicy{Attempts: 1, Delay: durationpb.New(time.Second)},
		KillTimeout: durationpb.New(5 * time.Second),
	}
	jobspec.ApplyDefaults(spec)
	return spec
}

// runDemoDDP runs the DDP job through c (the follower the all-reduce went
// through, named target) and prints its summary. A job that fails, or whose
// results do not check out, is an error; on one that fails the ranks' logs
// are kept in a file whose path is printed. When ctx ends (Ctrl-C) it
// returns errDemoInterrupted; the dev cluster's shutdown then stops the
// job's ranks and waits for them.
func runDemoDDP(ctx context.Context, c pb.ControlClient, f *clientFlags, target, dataDir string, ranks int, ts torchSetup, out io.Writer) error {
	if ts.Skip != "" {
		fmt.Fprintf(out, "==> %s\n", ts.Skip)
		return nil
	}
	outDir, err := os.MkdirTemp(dataDir, "ddp-out-")
	if err != nil {
		return fmt.Errorf("demo DDP output folder: %w", err)
	}
	spec := demoDDPSpec(ts, ranks, outDir)
	fmt.Fprintf(out, "\n==> DDP on the data plane: %s trains a small MLP for %d steps as a %d-rank exec job, backend gpumesh (PyTorch %s, %s), through %s\n",
		demoDDPScript, demoDDPSteps, ranks, ts.Version, ts.Python, target)
	start := time.Now()
	sctx, cancel := f.ctx(ctx)
	resp, err := c.SubmitJob(sctx, &pb.SubmitJobRequest{Spec: spec, Id: consensus.NewJobID(spec.Name)})
	cancel()
	if err != nil {
		return f.explain(err)
	}
	id := resp.Id
	var progress bytes.Buffer // the ranks' states, shown only when the job fails
	wctx, cancel := context.WithTimeout(ctx, demoDDPTimeout)
	final, err := followJob(wctx, c, f, id, followOptions{untilEnd: true}, &progress)
	cancel()
	if err != nil {
		if ctx.Err() != nil {
			return errDemoInterrupted
		}
		io.Copy(out, &progress)
		gctx, cancel := f.ctx(ctx)
		now, gerr := c.GetJob(gctx, &pb.GetJobRequest{Id: id})
		cancel()
		if gerr == nil {
			keepRankLogs(c, f, now, out)
		}
		return fmt.Errorf("%w: waiting for job %s: %w", errDemoDDPFailed, id, err)
	}
	wall := time.Since(start)
	if final.Job.Status != consensus.JobComplete || final.Job.Restarts > 0 {
		// A failed generation is shown, even when the next one completed.
		io.Copy(out, &progress)
	}
	if final.Job.Status != consensus.JobComplete {
		keepRankLogs(c, f, final, out)
		return fmt.Errorf("%w: job %s ended %s: %s", errDemoDDPFailed, id, final.Job.Status, final.Job.StatusReason)
	}
	return printDDPSummary(out, final, outDir, ranks, wall)
}

// keepRankLogs saves the ranks' logs (saveRankLogs) and says where.
func keepRankLogs(c pb.ControlClient, f *clientFlags, job *pb.GetJobResponse, out io.Writer) {
	if path, err := saveRankLogs(c, f, job); err == nil {
		fmt.Fprintf(out, "==> the ranks' output and errors: %s\n", path)
	} else {
		fmt.Fprintf(out, "==> could not keep the ranks' logs: %v\n", err)
	}
}

// printDDPSummary prints rank 0's losses, checks that every rank ended with
// the same parameters, bit for bit (DDP keeps the replicas identical: each
// applies the same all-reduced gradients), and shows what the ranks' agents
// moved for them.
func printDDPSummary(out io.Writer, final *pb.GetJobResponse, outDir string, ranks int, wall time.Duration) error {
	res, err := ddpout.Read(outDir, ranks)
	if err != nil {
		return fmt.Errorf("%w: %w", errDemoDDPCheck, err)
	}
	for r := range res {
		if len(res[r].Losses) != demoDDPSteps || len(res[r].Params) == 0 {
			return fmt.Errorf("%w: rank %d reported %d losses and %d parameters, want %d losses", errDemoDDPCheck, r, len(res[r].Losses), len(res[r].Params), demoDDPSteps)
		}
	}
	losses := make([]string, len(res[0].Losses))
	for i, l := range res[0].Losses {
		losses[i] = fmt.Sprintf("%.4f", l)
	}
	fmt.Fprintf(out, "    loss by step (rank 0): %s\n", strings.Join(losses, " "))
	for r := 1; r < ranks; r++ {
		if len(res[r].Params) != len(res[0].Params) {
			return fmt.Errorf("%w: rank %d has %d parameters, rank 0 %d", errDemoDDPCheck, r, len(res[r].Params), len(res[0].Params))
		}
		for i, v := range res[r].Params {
			if v != res[0].Params[i] {
				return fmt.Errorf("%w: parameter %d is %v on rank %d and %v on rank 0", errDemoDDPCheck, i, v, r, res[0].Params[i])
			}
		}
	}
	ops, moved := clientCollectiveTotals(final)
	if len(ops) == 0 {
		return fmt.Errorf("%w: the agents report no collectives of the job's ranks", errDemoDDPCheck)
	}
	fmt.Fprintf(out, "    the agents ran the ranks' collectives: %s (%s of the ranks' tensors)\n", strings.Join(ops, ", "), bytesize.Format(moved))
	restarts := ""
	if final.Job.Restarts > 0 {
		restarts = fmt.Sprintf(" in generation %d (restarted %d time(s): see above)", final.Job.Generation, final.Job.Restarts)
	}
	fmt.Fprintf(out, "==> DDP job %s complete in %s%s\n", final.Job.Id, wall.Round(100*time.Millisecond), restarts)
	fmt.Fprintf(out, "==> all %d ranks ended with identical parameters (%d values, compared exactly): OK\n", ranks, len(res[0].Params))
	return nil
}

// clientCollectiveTotals sums what the agents reported for the final
// generation's ranks: "N op" per operation kind, and the bytes of the
// ranks' buffers in them.
func clientCollectiveTotals(final *pb.GetJobResponse) (ops []string, moved int64) {
	count := map[string]int64{}
	var names []string
	for _, al := range final.Allocations {
		if al.Generation != final.Job.Generation {
			continue
		}
		for _, row := range clientCollectiveRows(al) {
			if _, ok := count[row.Op]; !ok {
				names = append(names, row.Op)
			}
			count[row.Op] += int64(row.Ops)
			moved += int64(row.Bytes)
		}
	}
	for _, op := range names {
		ops = append(ops, fmt.Sprintf("%d %s", count[op], op))
	}
	return ops, moved
}

// saveRankLogs writes every rank's output and errors of the job's last
// generation into a new file in the temporary folder (the cluster's data
// dir goes when the demo exits) and returns its path.
func saveRankLogs(c pb.ControlClient, f *clientFlags, final *pb.GetJobResponse) (string, error) {
	fh, err := os.CreateTemp("", "gpumesh-dev-ddp-*.log")
	if err != nil {
		return "", err
	}
	defer fh.Close()
	for r := range final.Job.WorldSize {
		for _, stderr := range []bool{false, true} {
			stream := "stdout"
			if stderr {
				stream = "stderr"
			}
			fmt.Fprintf(fh, "--- rank %d (generation %d) %s:\n", r, final.Job.Generation, stream)
			ctx, cancel := f.ctx(context.Background())
			st, err := c.Logs(ctx, &pb.LogsRequest{JobId: final.Job.Id, Rank: r, Generation: final.Job.Generation, Stderr: stderr})
			for err == nil {
				var ch *pb.LogChunk
				if ch, err = st.Recv(); err == nil {
					fh.Write(ch.Data)
				}
			}
			cancel()
			if !errors.Is(err, io.EOF) {
				fmt.Fprintf(fh, "(reading the log: %v)\n", err)
			}
		}
	}
	return fh.Name(), fh.Close()
}
