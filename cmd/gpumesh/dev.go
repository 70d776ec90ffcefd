package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node"
)

func init() { registerCommand(newDevCommand) }

func newDevCommand() *cobra.Command {
	var nodes, maxRanks int
	var demo, serve bool
	var logLevel, dataDir string
	cmd := &cobra.Command{
		Use:   "dev",
		Short: "Run a local cluster of N agents in this process",
		Long: `Run N agents in one process on 127.0.0.1, each with its own ports and a data dir
under a temporary folder (removed on exit). They gossip, elect a Raft leader and
take jobs like a real cluster. Without --demo it runs until interrupted, prints
how to reach it and says how rolling updates of services go (started, each
replica replaced, stalled on a failing replacement, done).

With --demo it runs an all-reduce job on the data plane (each rank checks the
result exactly) and, when PyTorch is installed, trains a small MLP with
examples/ddp/train.py as an exec job whose ranks move their gradients through
the agents (backend "gpumesh"): it prints the loss of each step, checks that
all ranks ended with identical parameters and shows what the agents moved. It
exits 0 when everything checked out. The PyTorch part runs $GPUMESH_PYTHON, or
else the first of python3 on PATH and /usr/bin/python3 that can import torch,
and needs the checkout's examples/ and python/ (run it from the repository
root); without them it says what it skipped. Nothing of it needs a GPU.`,
		Example: "  gpumesh dev\n  gpumesh dev --nodes 5\n  gpumesh dev --demo",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			out := cmd.OutOrStdout()
			level := hclog.LevelFromString(logLevel)
			if level == hclog.NoLevel {
				return fmt.Errorf("--log-level %q: use trace, debug, info, warn or error", logLevel)
			}
			if maxRanks < 0 {
				return fmt.Errorf("--max-ranks-per-node %d: give 0 (the CPU cores) or more", maxRanks)
			}
			logOut, closeLog, err := devLogOutput(demo, cmd.ErrOrStderr())
			if err != nil {
				return err
			}
			defer closeLog(out)
			opts := &hclog.LoggerOptions{Name: "dev", Level: level, Output: logOut}
			if level == hclog.Error {
				opts.Exclude = devNoise // the default level: keep what a user must read
			}
			logger := hclog.New(opts)
			ctx := cmd.Context()
			var probe *torchProbe
			if demo {
				// Ctrl-C ends the demo through its deferred clean-up: jobs
				// stopped, agents shut down, the temporary folder removed.
				var stop context.CancelFunc
				ctx, stop = signal.NotifyContext(ctx, os.Interrupt, syscall.SIGTERM)
				defer stop()
				wd, err := os.Getwd()
				if err != nil {
					return err
				}
				probe = startTorchProbe(ctx, os.Getenv, wd)
				defer probe.Stop()
			}
			start := time.Now()
			fmt.Fprintf(out, "==> starting %d agents on 127.0.0.1\n", nodes)
			dcfg := node.DevConfig{Nodes: nodes, DataDir: dataDir, Logger: logger}
			dcfg.Configure = func(_ int, c *node.Config) {
				if serve {
					c.ServeAddr = net.JoinHostPort(c.BindAddr, "0")
				}
				c.MaxRanksPerNode = maxRanks
			}
			dc, err := node.NewDevCluster(dcfg)
			if err != nil {
				return err
			}
			defer func() {
				// Connections torn down at exit are not news.
				logger.SetLevel(hclog.Off)
				dc.Shutdown()
			}()
			rctx, cancel := context.WithTimeout(ctx, 60*time.Second)
			err = dc.WaitReady(rctx)
			cancel()
			if err != nil {
				return err
			}
			l := dc.Leader()
			fmt.Fprintf(out, "==> cluster ready in %s: leader %s\n", time.Since(start).Round(time.Millisecond), l.Name())
			for _, a := range dc.Agents {
				serveAt := ""
				if a.ServeAddr() != "" {
					serveAt = "  serve http://" + a.ServeAddr()
				}
				fmt.Fprintf(out, "    %-8s rpc %-21s http http://%s%s  role %s\n", a.Name(), a.RPCAddr(), a.HTTPAddr(), serveAt, a.Role())
			}
			if demo {
				err := runDemo(ctx, dc, probe, out)
				if err != nil && ctx.Err() != nil && !errors.Is(err, errDemoInterrupted) {
					return fmt.Errorf("%w (%w)", errDemoInterrupted, err)
				}
				return err
			}
			self := selfCommand(os.Args[0], exec.LookPath)
			fmt.Fprintf(out, "\nTalk to it from another shell:\n  export GPUMESH_ADDR=%s\n  %s nodes\n  %s job run examples/hello.yaml\n\nPress Ctrl-C to stop.\n", dc.Agents[0].RPCAddr(), self, self)
			// Rolling updates of services say here how they went.
			fctx, stopFollow := context.WithCancel(cmd.Context())
			followed := make(chan struct{})
			go func() {
				defer close(followed)
				followUpdates(fctx, &clientFlags{address: dc.Agents[0].RPCAddr(), timeout: 5 * time.Second}, out)
			}()
			defer func() { stopFollow(); <-followed }()
			sigs := make(chan os.Signal, 1)
			signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
			defer signal.Stop(sigs)
			<-sigs
			stopFollow()
			<-followed
			fmt.Fprintln(out, "==> stopping")
			return nil
		},
	}
	cmd.Flags().IntVar(&nodes, "nodes", 3, "how many agents")
	cmd.Flags().BoolVar(&demo, "demo", false, "run the demo (an all-reduce, then PyTorch DDP when installed), print the results and exit")
	cmd.Flags().BoolVar(&serve, "serve", false, "give every agent a serve port for service traffic on a free port (as gpumesh agent --serve)")
	cmd.Flags().StringVar(&logLevel, "log-level", "error", "agent log level: trace, debug, info, warn or error (with --demo the logs go to a file, whose path is printed at the end)")
	cmd.Flags().StringVar(&dataDir, "data-dir", "", "keep the agents' data here instead of a temporary folder")
	cmd.Flags().IntVar(&maxRanks, "max-ranks-per-node", 0, "ranks (of all jobs) each agent runs at once (default: the machine's CPU cores, as gpumesh agent)")
	return cmd
}

// devLogOutput is where the agents of `gpumesh dev` log: standard error,
// or with --demo a new file in the temporary folder, so that the demo's own
// output stays readable however loaded the machine is. closeFn, called
// after the agents stop, keeps a file that holds lines and prints its path
// on out, and removes an empty one.
func devLogOutput(demo bool, stderr io.Writer) (w io.Writer, closeFn func(out io.Writer), err error) {
	if !demo {
		return stderr, func(io.Writer) {}, nil
	}
	fh, err := os.CreateTemp("", "gpumesh-dev-*.log")
	if err != nil {
		return nil, nil, fmt.Errorf("agent log file: %w", err)
	}
	return fh, func(out io.Writer) {
		fi, err := fh.Stat()
		fh.Close()
		if err == nil && fi.Size() == 0 {
			os.Remove(fh.Name())
			return
		}
		fmt.Fprintf(out, "==> agent logs: %s\n", fh.Name())
	}, nil
}

// runDemo submits the demo job through a follower, waits for it to end and
// prints what it reported; then the DDP job (runDemoDDP) when probe found
// PyTorch.
func runDemo(ctx context.Context, dc *node.DevCluster, probe *torchProbe, out io.Writer) error {
	spec := demoSpec(len(dc.Agents))
	target := dc.Agents[0]
	for _, a := range dc.Agents {
		if !a.IsLeader() {
			target = a
			break
		}
	}
	f := &clientFlags{address: target.RPCAddr(), timeout: 30 * time.Second}
	c, done, err := f.dial()
	if err != nil {
		return err
	}
	defer done()
	fmt.Fprintf(out, "==> submitting a %d-rank %s job through %s (a follower)\n", spec.Ranks, spec.Type, target.Name())
	sctx, cancel := f.ctx(ctx)
	resp, err := c.SubmitJob(sctx, &pb.SubmitJobRequest{Spec: spec, Id: consensus.NewJobID(spec.Name)})
	cancel()
	if err != nil {
		return f.explain(err)
	}
	wctx, cancel := context.WithTimeout(ctx, 5*time.Minute)
	defer cancel()
	final, err := followJob(wctx, c, f, resp.Id, followOptions{untilEnd: true}, out)
	if err != nil {
		return err
	}
	printResults(out, final)
	if final.Job.Status != consensus.JobComplete {
		return fmt.Errorf("demo job %s ended %s: %s", final.Job.Id, final.Job.Status, final.Job.StatusReason)
	}
	if err := demoCheck(final, out); err != nil {
		return err
	}
	return runDemoDDP(ctx, c, f, target.Name(), dc.DataDir(), min(len(dc.Agents), demoDDPMaxRanks), probe.Wait(), out)
}

// selfCommand is how a person runs this binary again from the shell it was
// started in, for the commands gpumesh dev suggests: "./gpumesh" after
// `go build -o gpumesh`, "go run ./cmd/gpumesh" under go run (a binary in
// Go's build cache), "gpumesh" when the one on PATH is this one. lookPath
// is exec.LookPath.
func selfCommand(argv0 string, lookPath func(string) (string, error)) string {
	if !strings.Contains(argv0, "/") {
		return argv0
	}
	if strings.Contains(argv0, "/go-build") {
		return "go run ./cmd/gpumesh"
	}
	if !filepath.IsAbs(argv0) {
		return argv0
	}
	base := filepath.Base(argv0)
	if p, err := lookPath(base); err == nil {
		if a, err := filepath.EvalSymlinks(p); err == nil {
			if b, err := filepath.EvalSymlinks(argv0); err == nil && a == b {
				return base
			}
		}
	}
	return argv0
}
