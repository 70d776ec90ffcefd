// Package collbench is the harness behind `gpumesh bench allreduce`: it
// starts N ranks on loopback (in this process, or one process each),
// runs the built-in allreduce job on every rank, measures the same bytes
// moved over raw TCP with the same number of flows, and prints an
// nccl-tests style table.
package collbench

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// Config of a benchmark run.
type Config struct {
	// Ranks is the number of ranks (>= 1).
	Ranks int
	// Sizes in bytes.
	Sizes []int64
	DType collective.DType
	// Iters timed and Warmup untimed iterations per size.
	Iters  int
	Warmup int
	// Device is "cpu" or "cuda" (needs a registered CUDA backend).
	Device string
	// Collective and Net configure the data plane (channels, chunk size,
	// windows).
	Collective collective.Config
	Net        collective.NetConfig
	// Procs runs every rank in its own process: Exe WorkerArgs... is
	// started once per rank and must call RunWorker.
	Procs      bool
	Exe        string
	WorkerArgs []string
	// Shortcut says how ranks of one process (no Procs) reach each other:
	// ShortcutAuto (the default) through one data-plane server, its
	// in-memory shortcut (chunks by reference: device memory moves device
	// to device), for every device but "cpu", and over TCP, a server per
	// rank, for "cpu" (what the raw TCP row compares against);
	// ShortcutOn or ShortcutOff force one or the other.
	Shortcut string
	// WorkerGOMAXPROCS, if > 0, sets GOMAXPROCS of each worker process
	// (several workers on one many-core host otherwise each get every core).
	WorkerGOMAXPROCS int
	// RawTCP also measures plain TCP with the same flows (default on in
	// DefaultConfig).
	RawTCP bool
	// Rounds repeats the whole measurement (each size's all-reduce, then
	// raw TCP) and reports medians, the ratio as the median of the rounds'
	// paired ratios: on a shared machine the load moves between
	// measurements, and pairing and medians keep that out of the ratio.
	// Default 1.
	Rounds int
	// Progress receives progress lines (nil: none).
	Progress io.Writer
	Logger   hclog.Logger
}

// Shortcut modes (Config.Shortcut).
const (
	ShortcutAuto = "auto"
	ShortcutOn   = "on"
	ShortcutOff  = "off"
)

// DeviceDefaults returns the channels and chunk size the benchmark uses for
// device when the caller does not choose (ok false: the collective's
// defaults). Device memory over TCP (procs) wants more flows than host
// memory, and the in-memory peer path wants few large chunks, which the
// peer copies move at NVLink speed.
func DeviceDefaults(device string, procs bool) (channels, chunkBytes int, ok bool) {
	if device != "cuda" {
		return 0, 0, false
	}
	if procs {
		return 16, 4 << 20, true
	}
	return 2, 64 << 20, true
}

// shared reports whether the ranks of an in-process run share one server.
func (c Config) shared() bool {
	switch c.Shortcut {
	case ShortcutOn:
		return true
	case ShortcutOff:
		return false
	}
	return c.Device != "cpu"
}

// DefaultConfig returns a 2-rank float32 benchmark of 1, 16, 64, 256 MiB.
func DefaultConfig() Config {
	return Config{
		Ranks:      2,
		Sizes:      []int64{1 << 20, 16 << 20, 64 << 20, 256 << 20},
		DType:      collective.Float32,
		Iters:      10,
		Warmup:     3,
		Device:     "cpu",
		Collective: collective.DefaultConfig(),
		Net:        benchNetConfig(),
		RawTCP:     true,
		Rounds:     1,
	}
}

// benchNetConfig is the data-plane default of the benchmark: the
// node's, but with lanes on TCP even between ranks of this host (no
// same-host Unix lanes), so that they are compared with raw TCP over the
// same path; --unix-lanes measures those instead.
func benchNetConfig() collective.NetConfig {
	n := collective.DefaultNetConfig()
	n.UnixLanes = false
	return n
}

// Validate checks the configuration.
func (c Config) Validate() error {
	if c.Ranks < 1 {
		return fmt.Errorf("bench allreduce: ranks must be >= 1, got %d", c.Ranks)
	}
	if c.Rounds < 1 {
		return fmt.Errorf("bench allreduce: rounds must be >= 1, got %d", c.Rounds)
	}
	switch c.Shortcut {
	case "", ShortcutAuto, ShortcutOn, ShortcutOff:
	default:
		return fmt.Errorf("bench allreduce: shortcut must be %q, %q or %q, got %q", ShortcutAuto, ShortcutOn, ShortcutOff, c.Shortcut)
	}
	if c.Procs && c.Exe == "" {
		return errors.New("bench allreduce: --procs needs the executable to re-run")
	}
	if err := c.Collective.Validate(); err != nil {
		return err
	}
	if err := c.Net.Validate(); err != nil {
		return err
	}
	spec := c.jobSpec()
	return spec.Validate()
}

func (c Config) jobSpec() collective.AllReduceJobSpec {
	return collective.AllReduceJobSpec{Sizes: c.Sizes, DType: c.DType, Iters: c.Iters, Warmup: c.Warmup, Device: c.Device}
}

// Row is one size's line of the table.
type Row struct {
	collective.AllReduceSizeResult
	// RawBusGBps is the raw-TCP figure for the same bytes per rank and
	// flows: (2(n-1)/n * size) / time, comparable to BusBW.
	RawBusGBps float64 `json:"raw_tcp_busbw_gbps,omitempty"`
	// Ratio is BusBW / RawBusGBps (with several rounds: the median of the
	// rounds' ratios, RatioMin and RatioMax their range).
	Ratio    float64 `json:"ratio_to_raw_tcp,omitempty"`
	RatioMin float64 `json:"ratio_min,omitempty"`
	RatioMax float64 `json:"ratio_max,omitempty"`
	// Rounds is how many rounds the medians are over.
	Rounds int `json:"rounds,omitempty"`
}

// Result of a run.
type Result struct {
	Ranks      int `json:"ranks"`
	Channels   int `json:"channels"`
	ChunkBytes int `json:"chunk_bytes"`
	// DataPlane is how frames travelled: "tcp" (lanes) or "grpc".
	DataPlane string `json:"data_plane"`
	Procs     bool   `json:"procs"`
	// Shortcut: ranks of the process shared one server (in-memory frames).
	Shortcut  bool   `json:"shortcut"`
	Device    string `json:"device"`
	CPUs      int    `json:"cpus"`
	GoVersion string `json:"go_version"`
	Date      string `json:"date"`
	Rows      []Row  `json:"rows"`
	Wrong     int64  `json:"wrong"`
}

// Run runs the benchmark (Rounds times; see Config.Rounds).
func Run(ctx context.Context, cfg Config) (*Result, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if _, err := collective.LookupDevice(cfg.Device); err != nil {
		return nil, err
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	var rounds []*Result
	for r := 0; r < cfg.Rounds; r++ {
		res, err := runRound(ctx, cfg)
		if err != nil && res == nil {
			return nil, err
		}
		rounds = append(rounds, res)
		if err != nil {
			return combine(rounds), err
		}
	}
	return combine(rounds), nil
}

// combine reports several rounds: per size, the median time and
// bandwidths, the median and range of the paired ratios, and every wrong
// element.
func combine(rounds []*Result) *Result {
	if len(rounds) == 1 {
		return rounds[0]
	}
	res := *rounds[len(rounds)-1]
	res.Rows = append([]Row(nil), res.Rows...)
	res.Wrong = 0
	for _, r := range rounds {
		res.Wrong += r.Wrong
	}
	for i := range res.Rows {
		var t, alg, bus, raw, ratio []float64
		var wrong int64
		for _, r := range rounds {
			if i >= len(r.Rows) {
				continue
			}
			row := r.Rows[i]
			t, alg, bus, raw = append(t, row.TimeUs), append(alg, row.AlgBWGBps), append(bus, row.BusBWGBps), append(raw, row.RawBusGBps)
			if row.Ratio > 0 {
				ratio = append(ratio, row.Ratio)
			}
			wrong += row.Wrong
		}
		row := &res.Rows[i]
		row.TimeUs, row.AlgBWGBps, row.BusBWGBps, row.RawBusGBps = medianF(t), medianF(alg), medianF(bus), medianF(raw)
		row.Wrong, row.Rounds = wrong, len(t)
		if len(ratio) > 0 {
			row.Ratio = medianF(ratio)
			row.RatioMin, row.RatioMax = slices.Min(ratio), slices.Max(ratio)
		}
	}
	return &res
}

func medianF(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// runRound measures every size once (and raw TCP after it).
func runRound(ctx context.Context, cfg Config) (*Result, error) {
	var reps []collective.AllReduceReport
	var raw []float64 // in-process runs measure raw TCP right after each size
	var err error
	if cfg.Procs {
		reps, err = runProcs(ctx, cfg)
	} else {
		reps, raw, err = runInProcess(ctx, cfg)
	}
	if err != nil {
		return nil, err
	}
	res := &Result{Ranks: cfg.Ranks, Channels: cfg.Collective.Channels, ChunkBytes: cfg.Collective.ChunkBytes, DataPlane: cfg.Net.DataPlane,
		Procs: cfg.Procs, Shortcut: !cfg.Procs && cfg.Ranks > 1 && cfg.shared(), Device: reps[0].Device, CPUs: runtime.NumCPU(), GoVersion: runtime.Version(),
		Date: time.Now().UTC().Format(time.RFC3339)}
	for i, r := range reps[0].Results {
		row := Row{AllReduceSizeResult: r}
		for _, o := range reps[1:] {
			if i < len(o.Results) {
				row.Wrong += o.Results[i].Wrong
			}
		}
		res.Wrong += row.Wrong
		res.Rows = append(res.Rows, row)
	}
	if cfg.RawTCP && cfg.Ranks > 1 {
		for i := range res.Rows {
			if raw == nil {
				g, err := rawBusBW(ctx, cfg, res.Rows[i].Bytes)
				if err != nil {
					return nil, err
				}
				res.Rows[i].RawBusGBps = g
			} else {
				res.Rows[i].RawBusGBps = raw[i]
			}
			if res.Rows[i].RawBusGBps > 0 {
				res.Rows[i].Ratio = res.Rows[i].BusBWGBps / res.Rows[i].RawBusGBps
			}
		}
	}
	progressDone(cfg.Progress)
	if res.Wrong > 0 {
		return res, fmt.Errorf("%w: %d wrong elements", collective.ErrCheckFailed, res.Wrong)
	}
	return res, nil
}

func progress(w io.Writer, format string, args ...any) {
	if w != nil {
		fmt.Fprintf(w, "\r\033[K"+format, args...)
	}
}

func progressDone(w io.Writer) {
	if w != nil {
		fmt.Fprint(w, "\r\033[K")
	}
}

// rawBusBW measures the raw TCP figure for one buffer size.
func rawBusBW(ctx context.Context, cfg Config, size int64) (float64, error) {
	per := int64(float64(size) * collective.BusBandwidthFactor(cfg.Ranks))
	progress(cfg.Progress, "raw TCP %s", bytesize.Format(size))
	t, err := RawTCP(ctx, cfg.Ranks, cfg.Collective.Channels, per, cfg.Iters, cfg.Warmup)
	if err != nil {
		return 0, fmt.Errorf("raw TCP baseline: %w", err)
	}
	return float64(per) / t.Seconds() / 1e9, nil
}

// runInProcess runs the job one size at a time and, when asked, measures raw
// TCP right after each size, so that both numbers of a row see the same
// machine conditions.
func runInProcess(ctx context.Context, cfg Config) ([]collective.AllReduceReport, []float64, error) {
	newGroup := collective.NewLoopbackGroup
	if cfg.shared() {
		newGroup = collective.NewSharedGroup
	}
	g, err := newGroup("bench", 1, cfg.Ranks, cfg.Collective, cfg.Net)
	if err != nil {
		return nil, nil, err
	}
	defer g.Close()
	reps := make([]collective.AllReduceReport, cfg.Ranks)
	var raw []float64
	for _, size := range cfg.Sizes {
		errs := collective.RunAll(g.Comms, func(c *collective.Communicator) error {
			spec := cfg.jobSpec()
			spec.Sizes = []int64{size}
			spec.LocalRank = c.Rank()
			if c.Rank() == 0 && cfg.Progress != nil {
				spec.Progress = func(size int64, it, n int) {
					progress(cfg.Progress, "allreduce %s: iteration %d/%d", bytesize.Format(size), it, n)
				}
			}
			rep, err := collective.RunAllReduceJob(ctx, c, spec, cfg.Logger)
			r := &reps[c.Rank()]
			r.Rank, r.Ranks, r.Device, r.Channels = rep.Rank, rep.Ranks, rep.Device, rep.Channels
			r.Results = append(r.Results, rep.Results...)
			r.Wrong += rep.Wrong
			if errors.Is(err, collective.ErrCheckFailed) {
				return nil // reported in the table
			}
			return err
		})
		if err := errors.Join(errs...); err != nil {
			return nil, nil, err
		}
		if cfg.RawTCP && cfg.Ranks > 1 {
			g, err := rawBusBW(ctx, cfg, size)
			if err != nil {
				return nil, nil, err
			}
			raw = append(raw, g)
		}
	}
	return reps, raw, nil
}

// workerHello is what a worker prints first; workerStart what it reads.
type workerHello struct {
	Addr string `json:"addr"`
}

type workerStart struct {
	Rank  int      `json:"rank"`
	Addrs []string `json:"addrs"`
}

type workerDone struct {
	Report collective.AllReduceReport `json:"report"`
	Error  string                     `json:"error,omitempty"`
}

// WorkerConfig is what a worker process runs with (its CLI rebuilds it
// from the flags that workerFlags passes).
type WorkerConfig struct {
	Collective collective.Config
	Net        collective.NetConfig
	Spec       collective.AllReduceJobSpec
}

func runProcs(ctx context.Context, cfg Config) ([]collective.AllReduceReport, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	type proc struct {
		cmd *exec.Cmd
		in  io.WriteCloser
		out *bufio.Reader
	}
	procs := make([]*proc, cfg.Ranks)
	defer func() {
		for _, p := range procs {
			if p != nil {
				_ = p.in.Close()
				_ = p.cmd.Wait()
			}
		}
	}()
	addrs := make([]string, cfg.Ranks)
	for r := range procs {
		args := append(append([]string{}, cfg.WorkerArgs...), workerFlags(cfg)...)
		cmd := exec.CommandContext(ctx, cfg.Exe, args...)
		cmd.Stderr = os.Stderr
		if cfg.WorkerGOMAXPROCS > 0 {
			cmd.Env = append(os.Environ(), fmt.Sprintf("GOMAXPROCS=%d", cfg.WorkerGOMAXPROCS))
		}
		in, err := cmd.StdinPipe()
		if err != nil {
			return nil, err
		}
		out, err := cmd.StdoutPipe()
		if err != nil {
			return nil, err
		}
		if err := cmd.Start(); err != nil {
			return nil, fmt.Errorf("starting worker %d (%s): %w", r, cfg.Exe, err)
		}
		procs[r] = &proc{cmd: cmd, in: in, out: bufio.NewReader(out)}
		var h workerHello
		if err := readJSON(procs[r].out, &h); err != nil {
			return nil, fmt.Errorf("worker %d: %w", r, err)
		}
		addrs[r] = h.Addr
	}
	for r, p := range procs {
		if err := json.NewEncoder(p.in).Encode(workerStart{Rank: r, Addrs: addrs}); err != nil {
			return nil, fmt.Errorf("worker %d: %w", r, err)
		}
	}
	reps := make([]collective.AllReduceReport, cfg.Ranks)
	var errs []error
	var mu sync.Mutex
	var wg sync.WaitGroup
	for r, p := range procs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var d workerDone
			err := readJSON(p.out, &d)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				errs = append(errs, fmt.Errorf("worker %d: %w", r, err))
				return
			}
			if d.Error != "" {
				errs = append(errs, fmt.Errorf("worker %d: %s", r, d.Error))
			}
			reps[r] = d.Report
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return reps, nil
}

func readJSON(r *bufio.Reader, v any) error {
	line, err := r.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("worker exited early: %w", err)
	}
	return json.Unmarshal(line, v)
}

// workerFlags are the flags a worker command must accept (the CLI's hidden
// worker subcommand parses them back into a WorkerConfig).
func workerFlags(cfg Config) []string {
	sizes := make([]string, len(cfg.Sizes))
	for i, s := range cfg.Sizes {
		sizes[i] = fmt.Sprint(s)
	}
	return []string{
		"--sizes", strings.Join(sizes, ","),
		"--dtype", cfg.DType.String(),
		"--iters", fmt.Sprint(cfg.Iters),
		"--warmup", fmt.Sprint(cfg.Warmup),
		"--device", cfg.Device,
		"--channels", fmt.Sprint(cfg.Collective.Channels),
		"--chunk", fmt.Sprint(cfg.Collective.ChunkBytes),
		"--min-channel", fmt.Sprint(cfg.Collective.MinChannelBytes),
		"--window", fmt.Sprint(cfg.Net.WindowBytes),
		"--read-buffer", fmt.Sprint(cfg.Net.ReadBufferBytes),
		"--write-buffer", fmt.Sprint(cfg.Net.WriteBufferBytes),
		"--collective-timeout", cfg.Collective.Timeout.String(),
		"--data-plane", cfg.Net.DataPlane,
		"--lane-socket-buffer", fmt.Sprint(cfg.Net.LaneSocketBuffer),
		fmt.Sprintf("--unix-lanes=%v", cfg.Net.UnixLanes),
		fmt.Sprintf("--no-same-host=%v", cfg.Collective.NoSameHost),
	}
}

// RunWorker is the body of a worker process: it listens on 127.0.0.1, says
// its address on out, reads its rank and the addresses from in, runs the
// allreduce job and writes its report on out.
func RunWorker(ctx context.Context, in io.Reader, out io.Writer, cfg WorkerConfig, logger hclog.Logger) error {
	s, err := collective.Listen("127.0.0.1:0", cfg.Net)
	if err != nil {
		return err
	}
	defer s.Close()
	enc := json.NewEncoder(out)
	if err := enc.Encode(workerHello{Addr: s.Addr()}); err != nil {
		return err
	}
	var st workerStart
	if err := readJSON(bufio.NewReader(in), &st); err != nil {
		return err
	}
	c, err := collective.New(s.Transport(), collective.Group{Job: "bench", Generation: 1, Rank: st.Rank, Addrs: st.Addrs}, cfg.Collective)
	if err != nil {
		return err
	}
	defer c.Close()
	spec := cfg.Spec
	spec.LocalRank = st.Rank
	rep, err := collective.RunAllReduceJob(ctx, c, spec, logger)
	d := workerDone{Report: rep}
	if err != nil && !errors.Is(err, collective.ErrCheckFailed) {
		d.Error = err.Error()
	}
	return enc.Encode(d)
}

// WriteTable prints the result like nccl-tests.
func WriteTable(w io.Writer, r *Result) {
	mode := "one process"
	if r.Shortcut {
		mode = "one process, one server: in-memory shortcut"
	}
	if r.Procs {
		mode = "one process per rank"
	}
	fmt.Fprintf(w, "# gpumesh allreduce: %d ranks (%s), device %s, data plane %s, %d channels, %s chunks, %d CPUs, %s\n",
		r.Ranks, mode, r.Device, r.DataPlane, r.Channels, bytesize.Format(int64(r.ChunkBytes)), r.CPUs, r.Date)
	fmt.Fprintf(w, "#%11s %12s %9s %19s %10s %8s %8s %8s %10s %7s\n", "size", "count", "type", "algorithm", "time(us)", "algbw", "busbw", "#wrong", "rawTCP", "ratio")
	fmt.Fprintf(w, "#%11s %12s %9s %19s %10s %8s %8s %8s %10s %7s\n", "(B)", "(elements)", "", "", "", "(GB/s)", "(GB/s)", "", "(GB/s)", "")
	for _, row := range r.Rows {
		raw, ratio := "-", "-"
		if row.RawBusGBps > 0 {
			raw = fmt.Sprintf("%.2f", row.RawBusGBps)
			ratio = fmt.Sprintf("%.2f", row.Ratio)
		}
		fmt.Fprintf(w, "%12d %12d %9s %19s %10.1f %8.2f %8.2f %8d %10s %7s\n", row.Bytes, row.Count, row.DType, row.Algorithm,
			row.TimeUs, row.AlgBWGBps, row.BusBWGBps, row.Wrong, raw, ratio)
	}
	fmt.Fprintf(w, "# busbw = algbw * 2(n-1)/n; rawTCP = the same bytes per rank over plain TCP with %d flows per neighbour; ratio = busbw/rawTCP\n", r.Channels)
	for _, row := range r.Rows {
		if row.Rounds > 1 {
			fmt.Fprintf(w, "# %s: medians of %d rounds (each the all-reduce, then raw TCP); ratio = median of the rounds' ratios, range %.2f-%.2f\n",
				bytesize.Format(row.Bytes), row.Rounds, row.RatioMin, row.RatioMax)
		}
	}
}

func median(ds []time.Duration) time.Duration {
	sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
	if len(ds)%2 == 1 {
		return ds[len(ds)/2]
	}
	return (ds[len(ds)/2-1] + ds[len(ds)/2]) / 2
}
