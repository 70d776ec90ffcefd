package main

import (
	"encoding/json"
	"fmt"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/gpumesh/gpumesh/collective/pipeline"
	"github.com/gpumesh/gpumesh/internal/bytesize"
)

func init() { registerBenchCommand(newBenchPipelineCommand) }

func newBenchPipelineCommand() *cobra.Command {
	cfg := pipeline.DefaultBenchConfig()
	var asJSON bool
	var bandwidthMiB, messageMiB int64
	cmd := &cobra.Command{
		Use:   "pipeline",
		Short: "Measure a pipeline-parallel run on loopback: samples/s, bubble and stage-to-stage bandwidth",
		Long: `Runs P pipeline stages in this process, connected by TCP on 127.0.0.1 as
separate nodes would be, through the same send/receive queues a pipeline job
uses (--transport tcp: a TCP connection per link; grpc: the collective
data plane, as nodes use it: gRPC streams with a TCP lane each, or with
--data-plane grpc the frames on the gRPC streams themselves). It reports samples/s, the measured bubble (idle fraction of all
stages) beside the theory (p-1)/(m+p-1), and the bandwidth of every link
streaming at once beside raw TCP with the same number of connections.

With --compute sleep (the default) every forward waits --forward and every
backward twice that instead of computing, so that P stages sharing a few
cores still behave like P devices working in parallel and the bubble is the
schedule's, not CPU contention's. --compute mlp trains the real MLP job on
the CPU instead.`,
		Example: `  gpumesh bench pipeline --stages 4 --microbatches 16
  gpumesh bench pipeline --stages 4 --microbatches 16 --schedule gpipe --json
  gpumesh bench pipeline --stages 2 --microbatches 8 --compute mlp --bandwidth-mib 0
  gpumesh bench pipeline --stages 4 --microbatches 16 --schedule interleaved --chunks 2
  gpumesh bench pipeline --transport grpc --channels 4
  gpumesh bench pipeline --transport grpc --channels 4 --data-plane grpc
  gpumesh bench pipeline --stages 2 --microbatches 8 --compute mlp --device cuda   # -tags cuda build
  gpumesh bench pipeline --stages 2 --microbatches 8 --compute mlp --layers 16 --balance measured`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg.Schedule = strings.ToLower(cfg.Schedule)
			cfg.Device = strings.ToLower(cfg.Device)
			cfg.BandwidthBytes = bandwidthMiB << 20
			cfg.MessageBytes = messageMiB << 20
			stop := tickProgress(cmd.ErrOrStderr(), "pipeline bench", 200*time.Millisecond)
			res, err := pipeline.Bench(cmd.Context(), cfg)
			stop()
			if err != nil {
				return err
			}
			out := cmd.OutOrStdout()
			if asJSON {
				enc := json.NewEncoder(out)
				enc.SetIndent("", "  ")
				return enc.Encode(res)
			}
			sched := res.Schedule
			if res.Chunks > 1 {
				sched = fmt.Sprintf("%s (%d chunks per stage)", sched, res.Chunks)
			}
			over := res.Transport
			if res.DataPlane != "" {
				over = fmt.Sprintf("%s (data plane %s)", res.Transport, res.DataPlane)
			}
			fmt.Fprintf(out, "# pipeline over %s: %d stages, %d micro-batches, %s, compute %s (forward %.1f ms, backward %.1f ms), %d steps, activation %s\n",
				over, res.Stages, res.MicroBatches, sched, res.Compute, res.ForwardMillis, 2*res.ForwardMillis, res.Steps, bytesize.Format(int64(res.ActivationBytes)))
			if len(res.Devices) > 0 {
				fmt.Fprintf(out, "%-28s %s\n", "devices", strings.Join(res.Devices, " "))
			}
			fmt.Fprintf(out, "%-28s %12.0f\n", "samples/s", res.SamplesPerSec)
			fmt.Fprintf(out, "%-28s %11.1f%%\n", "bubble (measured)", 100*res.Bubble)
			theory := "bubble (theory (p-1)/(m+p-1))"
			if res.Chunks > 1 {
				theory = "bubble (theory (p-1)/(vm+p-1))"
			}
			fmt.Fprintf(out, "%-28s %11.1f%%\n", theory, 100*res.TheoryBubble)
			var sb []string
			for _, b := range res.StageBubbles {
				sb = append(sb, fmt.Sprintf("%.1f%%", 100*b))
			}
			fmt.Fprintf(out, "%-28s %s\n", "bubble per stage", strings.Join(sb, " "))
			if res.BusyOn != "" {
				fmt.Fprintf(out, "%-28s %s\n", "busy time measured on", res.BusyOn)
			}
			if res.Receives != "" {
				fmt.Fprintf(out, "%-28s %s\n", "receives into", res.Receives+" memory")
			}
			if len(res.StageLayers) > 0 {
				var ls []string
				for _, r := range res.StageLayers {
					ls = append(ls, fmt.Sprintf("[%d,%d)", r[0], r[1]))
				}
				how := "by multiply-adds"
				if len(res.LayerCosts) > 0 {
					var cs []string
					for _, c := range res.LayerCosts {
						cs = append(cs, fmt.Sprintf("%.0f", c*1e6))
					}
					how = "by measured cost (us per micro-batch: " + strings.Join(cs, " ") + ")"
				}
				fmt.Fprintf(out, "%-28s %s %s\n", "layers per stage", strings.Join(ls, " "), how)
			}
			if res.Flows > 0 {
				fmt.Fprintf(out, "# bandwidth: %d links at once, %d TCP flows in all, %s per link in %s messages\n", res.Stages-1, res.Flows, bytesize.Format(res.LinkBytes), bytesize.Format(res.MessageBytes))
				fmt.Fprintf(out, "%-28s %9.2f GB/s (best of %d)\n", "stage-to-stage", res.StageGBps, len(res.RatioPercents))
				fmt.Fprintf(out, "%-28s %9.2f GB/s (best of %d)\n", "raw TCP, same flows", res.RawTCPGBps, len(res.RatioPercents))
				var rs []string
				for _, r := range res.RatioPercents {
					rs = append(rs, fmt.Sprintf("%.0f%%", r))
				}
				fmt.Fprintf(out, "%-28s %11.1f%% (median of paired rounds: %s)\n", "stage / raw", res.StageToRawPercent, strings.Join(rs, " "))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVar(&cfg.Stages, "stages", cfg.Stages, "pipeline stages (P)")
	f.IntVar(&cfg.MicroBatches, "microbatches", cfg.MicroBatches, "micro-batches per step (M)")
	f.StringVar(&cfg.Schedule, "schedule", cfg.Schedule, "schedule: 1f1b, gpipe or interleaved (with --chunks)")
	f.IntVar(&cfg.Chunks, "chunks", cfg.Chunks, "model chunks per stage for --schedule interleaved")
	f.StringVar(&cfg.Device, "device", cfg.Device, "device of --compute mlp: cpu, or cuda (a -tags cuda build; stage s on GPU s mod the GPUs)")
	f.StringVar(&cfg.Compute, "compute", cfg.Compute, "stage compute: sleep (fixed waits) or mlp (real CPU training)")
	f.IntVar(&cfg.Steps, "steps", cfg.Steps, "timed steps (after one warm-up step)")
	f.DurationVar(&cfg.ForwardTime, "forward", cfg.ForwardTime, "forward time per micro-batch and stage with --compute sleep (backward is twice)")
	f.IntVar(&cfg.Rows, "rows", cfg.Rows, "samples per micro-batch")
	f.IntVar(&cfg.Width, "width", cfg.Width, "activation width (float32 values per sample)")
	f.IntVar(&cfg.BandwidthRounds, "rounds", cfg.BandwidthRounds, "bandwidth rounds, each the stage path then raw TCP")
	f.IntVar(&cfg.InFlight, "in-flight", cfg.InFlight, "queued micro-batches per link direction before a send waits")
	f.Int64Var(&bandwidthMiB, "bandwidth-mib", cfg.BandwidthBytes>>20, "MiB each link carries in the bandwidth phase (0 skips it)")
	f.Int64Var(&messageMiB, "message-mib", cfg.MessageBytes>>20, "MiB per message in the bandwidth phase")
	f.StringVar(&cfg.Transport, "transport", cfg.Transport, "links between stages: tcp (one TCP flow per link) or grpc (the collective data plane, --channels flows per link)")
	f.IntVar(&cfg.Channels, "channels", cfg.Channels, "flows per link with --transport grpc")
	f.StringVar(&cfg.DataPlane, "data-plane", cfg.DataPlane, "with --transport grpc: tcp (frames on TCP lanes set up over the gRPC streams) or grpc (frames on the gRPC streams)")
	f.IntVar(&cfg.Layers, "layers", cfg.Layers, "with --compute mlp: weight layers of the model, all --width wide (0: one per stage)")
	f.StringVar(&cfg.Balance, "balance", cfg.Balance, "with --compute mlp: split the layers by multiply-adds (macs) or by each layer's forward+backward time measured on the device before the run (measured)")
	f.BoolVar(&cfg.SyncMessages, "sync-messages", cfg.SyncMessages, "with --device cuda: download each message and compute the loss while the stage waits (the behaviour before staged messages; for comparison)")
	f.BoolVar(&cfg.PinnedRecv, "pinned-recv", cfg.PinnedRecv, "with --device cuda: receive messages into page-locked memory and queue their uploads without a wait (opt-in until measured on a GPU; default: the links' own memory, uploaded synchronously)")
	f.BoolVar(&cfg.Trace, "trace", false, "record every stage's actions (start and end on the stage's goroutine) of the timed run; printed with --json as stage_traces")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON")
	return cmd
}
