package main

import (
	"encoding/json"
	"fmt"
	"os"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/term"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/collective/collbench"
	"github.com/gpumesh/gpumesh/cuda"
	"github.com/gpumesh/gpumesh/internal/bytesize"
)

func init() {
	registerBenchCommand(newBenchAllReduceCommand)
	registerBenchCommand(newBenchAllReduceWorkerCommand)
}

// allreduceFlags are the flags shared by the bench command and its worker.
type allreduceFlags struct {
	sizes     string
	dtype     string
	iters     int
	warmup    int
	device    string
	channels  int
	chunk     string
	window    string
	readBuf   string
	writeBuf  string
	timeout   time.Duration
	plane     string
	sockBuf   string
	unixLanes bool
	noSame    bool
	minChan   string
	issuer    bool
	spin      time.Duration
}

// setCUDAIssuer, set by the cuda build, registers the "cuda" collective
// device with one issuing thread per GPU (--cuda-issuer) that spins for
// spin before it sleeps (--cuda-issuer-spin; 0: neither the thread nor its
// callers spin).
var setCUDAIssuer func(spin time.Duration)

func (f *allreduceFlags) register(cmd *cobra.Command) {
	d := collective.DefaultConfig()
	fs := cmd.Flags()
	fs.StringVar(&f.sizes, "sizes", "1MiB,16MiB,64MiB,256MiB", "comma-separated buffer sizes (512KiB, 64MiB, 1GiB, ...)")
	fs.StringVar(&f.dtype, "dtype", "float32", "element type: float32, float64, float16, bfloat16, int32, int64, uint8")
	fs.IntVar(&f.iters, "iters", 10, "timed iterations per size (the median is reported)")
	fs.IntVar(&f.warmup, "warmup", 3, "untimed iterations per size")
	fs.StringVar(&f.device, "device", "cpu", "buffer memory: cpu or cuda (cuda needs a binary built with -tags cuda)")
	fs.IntVar(&f.channels, "channels", d.Channels, "parallel connections (TCP flows) per ring neighbour")
	fs.StringVar(&f.chunk, "chunk", bytesize.Format(int64(d.ChunkBytes)), "pipelined chunk size")
	fs.StringVar(&f.minChan, "min-channel", "0", "least each channel carries of an operation (fewer channels for smaller operations; 0: the built-in 128KiB)")
	fs.StringVar(&f.window, "window", bytesize.Format(int64(collective.DefaultNetConfig().WindowBytes)), "HTTP/2 flow-control window per stream and connection")
	fs.StringVar(&f.readBuf, "read-buffer", bytesize.Format(int64(collective.DefaultNetConfig().ReadBufferBytes)), "socket read buffer per connection (0: read frames straight from the socket)")
	fs.StringVar(&f.writeBuf, "write-buffer", bytesize.Format(int64(collective.DefaultNetConfig().WriteBufferBytes)), "write batching buffer per connection (0: write frames straight to the socket)")
	fs.DurationVar(&f.timeout, "collective-timeout", d.Timeout, "fail an operation that makes no progress for this long")
	fs.StringVar(&f.plane, "data-plane", collective.DataPlaneTCP, "how frames travel: tcp (a plain TCP lane per link, set up over its gRPC stream) or grpc (on the gRPC streams)")
	fs.BoolVar(&f.noSame, "no-same-host", false, "with --procs and --device cuda: keep the all-reduce on the TCP lanes instead of the same-host ring (CUDA IPC between the processes, the default where they can reach each other's GPU memory)")
	fs.BoolVar(&f.issuer, "cuda-issuer", false, "with --device cuda: enqueue each GPU's staging copies and kernels from one issuing thread per GPU instead of from every channel's goroutine (off by default until measured)")
	fs.DurationVar(&f.spin, "cuda-issuer-spin", cuda.DefaultIssuerConfig().Spin, "with --cuda-issuer: how long the issuing thread looks for work before it sleeps (0: it sleeps at once and callers do not spin while they wait for it)")
	fs.StringVar(&f.sockBuf, "lane-socket-buffer", bytesize.Format(int64(collective.DefaultNetConfig().LaneSocketBuffer)), "SO_SNDBUF/SO_RCVBUF of each TCP lane (0: kernel autotuning)")
	fs.BoolVar(&f.unixLanes, "unix-lanes", false, "carry the lanes between the ranks over Unix sockets, as agents of one host do (off: TCP lanes, compared with raw TCP over the same path)")
}

func (f *allreduceFlags) configs() (collective.Config, collective.NetConfig, collective.AllReduceJobSpec, error) {
	cfg := collective.DefaultConfig()
	gcfg := collective.DefaultNetConfig()
	var spec collective.AllReduceJobSpec
	sizes, err := bytesize.ParseList(f.sizes)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--sizes: %w", err)
	}
	dt, err := collective.ParseDType(f.dtype)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--dtype: %w", err)
	}
	chunk, err := bytesize.Parse(f.chunk)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--chunk: %w", err)
	}
	window, err := bytesize.Parse(f.window)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--window: %w", err)
	}
	rb, err := bytesize.Parse(f.readBuf)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--read-buffer: %w", err)
	}
	wb, err := bytesize.Parse(f.writeBuf)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--write-buffer: %w", err)
	}
	gcfg.ReadBufferBytes, gcfg.WriteBufferBytes = int(rb), int(wb)
	sb, err := bytesize.Parse(f.sockBuf)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--lane-socket-buffer: %w", err)
	}
	gcfg.LaneSocketBuffer = int(sb)
	gcfg.DataPlane = f.plane
	gcfg.UnixLanes = f.unixLanes
	if err := gcfg.Validate(); err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--data-plane/--lane-socket-buffer: %w", err)
	}
	if window > 1<<30 {
		return cfg, gcfg, spec, fmt.Errorf("--window: at most 1GiB, got %s", f.window)
	}
	minChan, err := bytesize.Parse(f.minChan)
	if err != nil {
		return cfg, gcfg, spec, fmt.Errorf("--min-channel: %w", err)
	}
	cfg.MinChannelBytes = int(minChan)
	if f.issuer {
		if setCUDAIssuer == nil {
			return cfg, gcfg, spec, fmt.Errorf("--cuda-issuer: this binary was built without CUDA support (build with -tags cuda)")
		}
		if f.spin < 0 {
			return cfg, gcfg, spec, fmt.Errorf("--cuda-issuer-spin: must be >= 0, got %v", f.spin)
		}
		setCUDAIssuer(f.spin)
	}
	cfg.Channels = f.channels
	cfg.ChunkBytes = int(chunk)
	cfg.NoSameHost = f.noSame
	cfg.Timeout = f.timeout
	gcfg.WindowBytes = int32(window)
	spec = collective.AllReduceJobSpec{Sizes: sizes, DType: dt, Iters: f.iters, Warmup: f.warmup, Device: f.device}
	return cfg, gcfg, spec, nil
}

func newBenchAllReduceCommand() *cobra.Command {
	var f allreduceFlags
	var ranks, workerProcs, rounds int
	var procs, asJSON, noRaw bool
	var shortcut string
	cmd := &cobra.Command{
		Use:   "allreduce",
		Short: "Measure ring all-reduce over the data plane on loopback, against raw TCP",
		Long: `Starts N ranks on 127.0.0.1 (in this process, or one process each with --procs),
runs the built-in allreduce job (every rank checks the result exactly) and prints an
nccl-tests style table: size, count, type, time, algbw, busbw (algbw * 2(n-1)/n) and
the number of wrong elements, then the same bytes moved over raw TCP with the same
number of flows, and the ratio of the two. --data-plane grpc moves the frames on the
gRPC streams themselves instead of TCP lanes (to compare the two). With --device cuda
the ranks of one process share one data-plane server (chunks move device to device;
--shortcut off puts them on TCP), and --channels/--chunk default to 16 x 4MiB with
--procs and 2 x 64MiB without. With --procs and --device cuda the processes all-reduce
on a same-host ring (CUDA IPC: each maps its neighbour's GPU memory; no TCP, no host
copies) where every process can open the others' memory; the algorithm column then
says same-host-ipc, and --no-same-host keeps them on the TCP lanes.`,
		Example: `  gpumesh bench allreduce --ranks 2 --sizes 1MiB,16MiB,64MiB,256MiB
  gpumesh bench allreduce --ranks 4 --procs --channels 8 --iters 20 --json
  gpumesh bench allreduce --ranks 2 --sizes 64MiB,256MiB --data-plane grpc
  gpumesh bench allreduce --ranks 2 --sizes 64MiB,256MiB --procs --rounds 5
  gpumesh bench allreduce --device cuda --ranks 2 --procs --sizes 64MiB,256MiB`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ccfg, gcfg, spec, err := f.configs()
			if err != nil {
				return err
			}
			cfg := collbench.DefaultConfig()
			cfg.Ranks = ranks
			cfg.Sizes, cfg.DType, cfg.Iters, cfg.Warmup, cfg.Device = spec.Sizes, spec.DType, spec.Iters, spec.Warmup, spec.Device
			if ch, chunk, ok := collbench.DeviceDefaults(spec.Device, procs); ok {
				if !cmd.Flags().Changed("channels") {
					ccfg.Channels = ch
				}
				if !cmd.Flags().Changed("chunk") {
					ccfg.ChunkBytes = chunk
				}
			}
			cfg.Collective, cfg.Net = ccfg, gcfg
			cfg.Shortcut = shortcut
			cfg.RawTCP = !noRaw
			cfg.Rounds = rounds
			if procs {
				exe, err := os.Executable()
				if err != nil {
					return fmt.Errorf("--procs: cannot find this executable: %w", err)
				}
				cfg.Procs, cfg.Exe, cfg.WorkerArgs = true, exe, []string{"bench", "allreduce-worker", fmt.Sprintf("--cuda-issuer=%v", f.issuer), "--cuda-issuer-spin", f.spin.String()}
				cfg.WorkerGOMAXPROCS = workerProcs
			}
			if term.IsTerminal(int(os.Stderr.Fd())) {
				cfg.Progress = os.Stderr
			}
			res, err := collbench.Run(cmd.Context(), cfg)
			if res == nil {
				return err
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if jerr := enc.Encode(res); jerr != nil {
					return jerr
				}
			} else {
				collbench.WriteTable(cmd.OutOrStdout(), res)
			}
			return err
		},
	}
	f.register(cmd)
	cmd.Flags().IntVar(&ranks, "ranks", 2, "number of ranks")
	cmd.Flags().BoolVar(&procs, "procs", false, "run every rank in its own process")
	cmd.Flags().StringVar(&shortcut, "shortcut", collbench.ShortcutAuto, "without --procs: auto (ranks share one server, in-memory frames, for --device cuda; a server each, over TCP, for cpu), on or off")
	cmd.Flags().IntVar(&workerProcs, "worker-gomaxprocs", 0, "with --procs: GOMAXPROCS of each rank process (0: Go's default, every core)")
	cmd.Flags().BoolVar(&asJSON, "json", false, "print machine-readable JSON")
	cmd.Flags().BoolVar(&noRaw, "no-raw-tcp", false, "skip the raw TCP baseline")
	cmd.Flags().IntVar(&rounds, "rounds", 1, "repeat everything (each size's all-reduce, then raw TCP) and report medians and the median of the paired ratios (steadier on a shared machine)")
	return cmd
}

func newBenchAllReduceWorkerCommand() *cobra.Command {
	var f allreduceFlags
	cmd := &cobra.Command{
		Use:     "allreduce-worker",
		Short:   "One rank of `bench allreduce --procs` (internal)",
		Hidden:  true,
		Example: "  (started by gpumesh bench allreduce --procs; speaks JSON lines on stdin/stdout)",
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ccfg, gcfg, spec, err := f.configs()
			if err != nil {
				return err
			}
			return collbench.RunWorker(cmd.Context(), os.Stdin, os.Stdout, collbench.WorkerConfig{Collective: ccfg, Net: gcfg, Spec: spec}, nil)
		},
	}
	f.register(cmd)
	return cmd
}
