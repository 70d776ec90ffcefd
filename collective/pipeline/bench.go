package pipeline

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// Compute models of the pipeline benchmark.
const (
	// ComputeSleep makes every forward and backward wait a fixed time
	// instead of computing, so that P stages sharing a few cores still
	// behave like P devices working in parallel: the measured bubble is the
	// schedule's, not CPU contention's.
	ComputeSleep = "sleep"
	// ComputeMLP runs the real MLP job (RunJob) on the CPU.
	ComputeMLP = "mlp"
)

// BenchConfig configures Bench.
type BenchConfig struct {
	// Stages and MicroBatches of the pipeline.
	Stages, MicroBatches int
	// Schedule is Schedule1F1B, ScheduleGPipe or ScheduleInterleaved.
	Schedule string
	// Chunks per stage of the interleaved schedule (each chunk's compute is
	// ForwardTime/Chunks forward); 1 otherwise.
	Chunks int
	// Device is "cpu" (the only one this build has).
	Device string
	// Compute is ComputeSleep (default) or ComputeMLP.
	Compute string
	// Steps is the number of training steps timed (after one warm-up step).
	Steps int
	// ForwardTime is one micro-batch's forward time per stage (sleep
	// compute); backward takes twice as long.
	ForwardTime time.Duration
	// Rows and Width shape the activation sent per micro-batch
	// (Rows×Width float32), and Rows is the micro-batch's samples.
	Rows, Width int
	// BandwidthBytes is the payload each link carries in the bandwidth
	// phase, in messages of MessageBytes; 0 skips the phase.
	BandwidthBytes, MessageBytes int64
	// BandwidthRounds is how many times the bandwidth phase alternates
	// the stage path and raw TCP.
	BandwidthRounds int
	// InFlight bounds queued messages per link direction.
	InFlight int
	// Transport is TransportTCP (ConnectTCP links, one flow each) or
	// TransportGRPC (the collective data plane, Channels flows per link).
	Transport string
	// Channels is the number of flows per link with TransportGRPC.
	Channels int
	// DataPlane is how TransportGRPC moves frames: collective.DataPlaneTCP
	// (TCP lanes set up over the gRPC streams, the default) or
	// collective.DataPlaneGRPC (on the gRPC streams).
	DataPlane string
	// Layers is the weight layers of the MLP (ComputeMLP), all Width wide,
	// split over the stages; 0 means one per stage.
	Layers int
	// Balance is how ComputeMLP splits the layers: BalanceMACs
	// (multiply-adds, the default) or BalanceMeasured (MeasureLayerCosts on
	// the first stage's device before the run).
	Balance string
	// SyncMessages is RunConfig.SyncMessages for every stage (an
	// asynchronous device's messages downloaded while the stage waits).
	SyncMessages bool
	// PinnedRecv is RunConfig.PinnedRecv for every stage (received
	// messages uploaded from page-locked memory the device lends).
	PinnedRecv bool
	// Trace puts every stage's action spans of the timed run into
	// BenchResult.StageTraces.
	Trace bool
}

// Ways of balancing the stages of the MLP bench.
const (
	BalanceMACs     = "macs"
	BalanceMeasured = "measured"
)

// Transports of the benchmark.
const (
	TransportTCP  = "tcp"
	TransportGRPC = "grpc"
)

// DefaultBenchConfig returns a p=4, m=16 1F1B run with sleep compute.
func DefaultBenchConfig() BenchConfig {
	return BenchConfig{
		Stages: 4, MicroBatches: 16, Schedule: Schedule1F1B, Chunks: 1, Device: DeviceCPU, Compute: ComputeSleep,
		Steps: 5, ForwardTime: 10 * time.Millisecond, Rows: 32, Width: 1024,
		BandwidthBytes: 1 << 30, MessageBytes: 4 << 20, BandwidthRounds: 7, InFlight: 2,
		Transport: TransportTCP, Channels: 4, DataPlane: collective.DataPlaneTCP,
		Balance: BalanceMACs,
	}
}

// Validate checks the config.
func (c *BenchConfig) Validate() error {
	switch {
	case c.Stages < 2:
		return fmt.Errorf("%w: bench needs at least 2 stages, got %d", ErrInvalidSpec, c.Stages)
	case c.MicroBatches < 1:
		return fmt.Errorf("%w: micro-batches must be >= 1, got %d", ErrInvalidSpec, c.MicroBatches)
	case c.Schedule != Schedule1F1B && c.Schedule != ScheduleGPipe && c.Schedule != ScheduleInterleaved:
		return fmt.Errorf("%w: schedule must be %q, %q or %q, got %q", ErrInvalidSpec, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved, c.Schedule)
	case c.Schedule == ScheduleInterleaved && (c.Chunks < 2 || c.MicroBatches%c.Stages != 0):
		return fmt.Errorf("%w: the interleaved schedule needs chunks >= 2 (got %d) and micro-batches a multiple of stages (got %d and %d)", ErrInvalidSpec, c.Chunks, c.MicroBatches, c.Stages)
	case c.Schedule != ScheduleInterleaved && c.Chunks > 1:
		return fmt.Errorf("%w: chunks need the %q schedule", ErrInvalidSpec, ScheduleInterleaved)
	case c.Device != DeviceCPU && c.Device != DeviceCUDA:
		return fmt.Errorf("%w: device must be %q or %q, got %q", ErrInvalidSpec, DeviceCPU, DeviceCUDA, c.Device)
	case c.Device == DeviceCUDA && openBenchDevices == nil:
		return fmt.Errorf("%w: device cuda: this binary was built without CUDA support (build with -tags cuda)", ErrNoDevice)
	case c.Device == DeviceCUDA && c.Compute != ComputeMLP:
		return fmt.Errorf("%w: device cuda runs the real model: use --compute mlp", ErrInvalidSpec)
	case c.Compute != ComputeSleep && c.Compute != ComputeMLP:
		return fmt.Errorf("%w: compute must be %q or %q, got %q", ErrInvalidSpec, ComputeSleep, ComputeMLP, c.Compute)
	case c.Steps < 1:
		return fmt.Errorf("%w: steps must be >= 1, got %d", ErrInvalidSpec, c.Steps)
	case c.ForwardTime <= 0:
		return fmt.Errorf("%w: forward time must be > 0, got %v", ErrInvalidSpec, c.ForwardTime)
	case c.Rows < 1 || c.Width < 1:
		return fmt.Errorf("%w: rows and width must be >= 1, got %d and %d", ErrInvalidSpec, c.Rows, c.Width)
	case c.BandwidthBytes < 0 || (c.BandwidthBytes > 0 && (c.MessageBytes < 4 || c.MessageBytes > MaxMessageBytes)):
		return fmt.Errorf("%w: bandwidth bytes must be >= 0 and message bytes in [4, %d], got %d and %d", ErrInvalidSpec, MaxMessageBytes, c.BandwidthBytes, c.MessageBytes)
	case c.InFlight < 1:
		return fmt.Errorf("%w: in-flight must be >= 1, got %d", ErrInvalidSpec, c.InFlight)
	case c.Transport != TransportTCP && c.Transport != TransportGRPC:
		return fmt.Errorf("%w: transport must be %q or %q, got %q", ErrInvalidSpec, TransportTCP, TransportGRPC, c.Transport)
	case c.Transport == TransportGRPC && c.DataPlane != collective.DataPlaneTCP && c.DataPlane != collective.DataPlaneGRPC:
		return fmt.Errorf("%w: data plane must be %q or %q, got %q", ErrInvalidSpec, collective.DataPlaneTCP, collective.DataPlaneGRPC, c.DataPlane)
	case c.Transport == TransportGRPC && (c.Channels < 1 || c.Channels > 64):
		return fmt.Errorf("%w: channels must be 1..64, got %d", ErrInvalidSpec, c.Channels)
	case c.Layers != 0 && c.Layers < c.Stages*max(c.Chunks, 1):
		return fmt.Errorf("%w: %d layers cannot fill %d stages × %d chunks", ErrInvalidSpec, c.Layers, c.Stages, max(c.Chunks, 1))
	case c.Layers != 0 && c.Compute != ComputeMLP:
		return fmt.Errorf("%w: --layers shapes the real model: use --compute mlp", ErrInvalidSpec)
	case c.Balance != "" && c.Balance != BalanceMACs && c.Balance != BalanceMeasured:
		return fmt.Errorf("%w: balance must be %q or %q, got %q", ErrInvalidSpec, BalanceMACs, BalanceMeasured, c.Balance)
	case c.BandwidthBytes > 0 && c.BandwidthRounds < 1:
		return fmt.Errorf("%w: bandwidth rounds must be >= 1, got %d", ErrInvalidSpec, c.BandwidthRounds)
	}
	return nil
}

// BenchResult is what Bench measured.
type BenchResult struct {
	Transport string `json:"transport"`
	// DataPlane is how the collective data plane moved frames (transport
	// grpc only): tcp lanes or grpc streams.
	DataPlane    string `json:"data_plane,omitempty"`
	Stages       int    `json:"stages"`
	MicroBatches int    `json:"micro_batches"`
	Schedule     string `json:"schedule"`
	Chunks       int    `json:"chunks"`
	Compute      string `json:"compute"`
	// Devices are the GPUs the stages ran on (stage s on Devices[s mod n]).
	Devices       []string `json:"devices,omitempty"`
	Steps         int      `json:"steps"`
	ForwardMillis float64  `json:"forward_ms"`
	// ActivationBytes is one micro-batch's activation (and gradient).
	ActivationBytes int     `json:"activation_bytes"`
	WallSeconds     float64 `json:"wall_seconds"`
	SamplesPerSec   float64 `json:"samples_per_sec"`
	// Bubble is 1 − Σ busy / (stages × wall); TheoryBubble (p−1)/(m+p−1).
	Bubble float64 `json:"bubble"`
	// BusyOn says where busy time was measured: "host" (time in Forward
	// and Backward) or "device" (an asynchronous device's time on that
	// work, with staged messages).
	BusyOn string `json:"busy_on,omitempty"`
	// Receives says where the stages received messages: "pinned" (the
	// device's page-locked memory, uploads queued without a wait) or
	// "pageable" (the links' memory).
	Receives     string    `json:"receives,omitempty"`
	TheoryBubble float64   `json:"theory_bubble"`
	StageBubbles []float64 `json:"stage_bubbles"`
	// StageTraces are the stages' action spans (BenchConfig.Trace), in
	// microseconds from the first stage's start.
	StageTraces [][]ActionSpan `json:"stage_traces,omitempty"`
	// StageLayers are the weight layers [start, end) of each stage
	// (ComputeMLP); LayerCosts the measured seconds per micro-batch of each
	// layer (BalanceMeasured).
	StageLayers [][2]int  `json:"stage_layers,omitempty"`
	LayerCosts  []float64 `json:"layer_costs,omitempty"`
	// Bandwidth phase: every link streams at once, one TCP flow per link.
	Flows        int     `json:"flows"`
	MessageBytes int64   `json:"message_bytes"`
	LinkBytes    int64   `json:"link_bytes"`
	StageGBps    float64 `json:"stage_gbps"`
	RawTCPGBps   float64 `json:"raw_tcp_gbps"`
	// StageToRawPercent is the median over rounds of stage/raw, each
	// round measuring both back to back; RatioPercents are all of them.
	StageToRawPercent float64   `json:"stage_to_raw_percent"`
	RatioPercents     []float64 `json:"ratio_percents"`
}

// openBenchDevices opens the GPUs for --device cuda; set by the cuda build.
// It returns the devices and a function that releases them.
var openBenchDevices func(stages int) ([]Device, func(), error)

// sleepModel waits instead of computing and sends a fixed-size tensor.
type sleepModel struct {
	fwd, bwd   time.Duration
	rows, cols int
	payload    []float32 // shared, never written
	first      bool
}

func (m *sleepModel) msg() *Message {
	return &Message{Rows: m.rows, Cols: m.cols, Data: m.payload}
}

func (m *sleepModel) Forward(step, mb int, in *Message) (*Message, error) {
	time.Sleep(m.fwd)
	return m.msg(), nil
}

func (m *sleepModel) Backward(step, mb int, grad *Message) (*Message, error) {
	time.Sleep(m.bwd)
	if m.first {
		return nil, nil
	}
	return m.msg(), nil
}

func (m *sleepModel) EndStep(step int) (float64, error) { return 0, nil }

// chunkedSleep is a stage of sleep models, one per chunk (interleaved).
type chunkedSleep struct{ parts []*sleepModel }

func (m *chunkedSleep) Chunk(c int) StageModel { return m.parts[c] }
func (m *chunkedSleep) Forward(step, mb int, in *Message) (*Message, error) {
	return m.parts[0].Forward(step, mb, in)
}
func (m *chunkedSleep) Backward(step, mb int, g *Message) (*Message, error) {
	return m.parts[0].Backward(step, mb, g)
}
func (m *chunkedSleep) EndStep(int) (float64, error) { return 0, nil }

// loopbackPipeline connects p stages over TCP on 127.0.0.1.
func loopbackPipeline(ctx context.Context, job string, p int, ring bool) ([]StageLinks, error) {
	lns := make([]net.Listener, p)
	addrs := make([]string, p)
	defer func() {
		for _, ln := range lns {
			if ln != nil {
				ln.Close()
			}
		}
	}()
	for s := range lns {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, err
		}
		lns[s], addrs[s] = ln, ln.Addr().String()
	}
	links := make([]StageLinks, p)
	errs := make([]error, p)
	var wg sync.WaitGroup
	for s := 0; s < p; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			links[s], errs[s] = ConnectTCP(ctx, TCPConfig{JobID: job, Stage: s, Stages: p, Addrs: addrs, Listener: lns[s], ConnectTimeout: 10 * time.Second, Ring: ring})
		}(s)
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		for _, l := range links {
			l.Close()
		}
		return nil, err
	}
	return links, nil
}

func dataPlaneOf(cfg BenchConfig) string {
	if cfg.Transport == TransportGRPC {
		return cfg.DataPlane
	}
	return ""
}

// benchLinks connects p stages on loopback with the configured transport.
// The returned function closes whatever servers it started.
func benchLinks(ctx context.Context, cfg BenchConfig, job string, p int) ([]StageLinks, func(), error) {
	if cfg.Transport == TransportTCP {
		links, err := loopbackPipeline(ctx, job, p, cfg.Schedule == ScheduleInterleaved)
		return links, func() {}, err
	}
	var servers []*collective.Server
	cleanup := func() {
		for _, s := range servers {
			s.Close()
		}
	}
	addrs := make([]string, p)
	for s := 0; s < p; s++ {
		gcfg := collective.DefaultNetConfig()
		gcfg.DataPlane = cfg.DataPlane
		gcfg.UnixLanes = false // TCP lanes, as the raw TCP figure they are compared with
		srv, err := collective.Listen("127.0.0.1:0", gcfg)
		if err != nil {
			cleanup()
			return nil, nil, err
		}
		servers = append(servers, srv)
		addrs[s] = srv.Addr()
	}
	links := make([]StageLinks, p)
	for s := 0; s < p; s++ {
		l, err := OpenCollectiveLinks(servers[s].Transport(), CollectiveConfig{JobID: job, Stage: s, Stages: p, Addrs: addrs, Channels: cfg.Channels, ChunkBytes: 1 << 20, Ring: cfg.Schedule == ScheduleInterleaved})
		if err != nil {
			for _, l := range links {
				l.Close()
			}
			cleanup()
			return nil, nil, err
		}
		links[s] = l
	}
	return links, cleanup, nil
}

// Bench runs a pipeline over loopback TCP and measures samples/s, the
// bubble beside theory, and stage-to-stage bandwidth beside raw TCP with the
// same number of flows.
func Bench(ctx context.Context, cfg BenchConfig) (*BenchResult, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	p, m := cfg.Stages, cfg.MicroBatches
	res := &BenchResult{
		Transport: cfg.Transport, DataPlane: dataPlaneOf(cfg), Stages: p, MicroBatches: m, Schedule: cfg.Schedule, Compute: cfg.Compute, Steps: cfg.Steps,
		ForwardMillis: float64(cfg.ForwardTime) / 1e6, ActivationBytes: cfg.Rows * cfg.Width * 4,
		TheoryBubble: TheoreticalBubble(p, m), Chunks: max(cfg.Chunks, 1),
	}
	if cfg.Schedule == ScheduleInterleaved {
		res.TheoryBubble = InterleavedBubble(p, m, cfg.Chunks)
	}
	var devs []Device
	if cfg.Device == DeviceCUDA {
		d, release, err := openBenchDevices(p)
		if err != nil {
			return nil, err
		}
		defer release()
		devs = d
		for _, d := range devs {
			res.Devices = append(res.Devices, d.Name())
		}
	}
	if cfg.Compute == ComputeMLP {
		spec := benchSpec(cfg, 1)
		if cfg.Balance == BalanceMeasured {
			var dev Device = CPU{}
			if len(devs) > 0 {
				dev = devs[0]
			}
			if cfg.SyncMessages {
				dev = syncDevice{dev} // measured as the run will use it
			}
			costs, err := MeasureLayerCosts(ctx, dev, spec, 20)
			if err != nil {
				return nil, fmt.Errorf("measuring layer costs: %w", err)
			}
			res.LayerCosts, spec.LayerCosts = costs, costs
		}
		if ranges, err := spec.StageLayers(p); err == nil {
			res.StageLayers = ranges
		}
	}
	// One untimed warm-up step, then the timed steps, each on fresh links.
	for _, steps := range []int{1, cfg.Steps} {
		if err := benchSchedule(ctx, cfg, steps, devs, res); err != nil {
			return nil, err
		}
	}
	if cfg.BandwidthBytes > 0 {
		if err := benchBandwidth(ctx, cfg, res); err != nil {
			return nil, err
		}
	}
	return res, nil
}

func benchSchedule(ctx context.Context, cfg BenchConfig, steps int, devs []Device, res *BenchResult) error {
	p, m := cfg.Stages, cfg.MicroBatches
	links, cleanup, err := benchLinks(ctx, cfg, "bench", p)
	if err != nil {
		return err
	}
	defer cleanup()
	stats := make([]StageStats, p)
	pinned := make([]bool, p)
	errs := make([]error, p)
	var wg sync.WaitGroup
	var start sync.WaitGroup
	start.Add(1)
	payload := make([]float32, cfg.Rows*cfg.Width)
	spec := benchSpec(cfg, steps)
	spec.LayerCosts = res.LayerCosts
	for s := 0; s < p; s++ {
		wg.Add(1)
		go func(s int) {
			defer wg.Done()
			start.Wait()
			if cfg.Compute == ComputeMLP {
				rc := RunConfig{JobID: "bench", Stage: s, Stages: p, Links: links[s], SyncMessages: cfg.SyncMessages, PinnedRecv: cfg.PinnedRecv, Trace: cfg.Trace}
				if len(devs) > 0 {
					rc.Device = devs[s%len(devs)] // stage s on GPU s mod the GPUs
				}
				rep, err := RunJob(ctx, rc, spec)
				if err == nil {
					stats[s] = rep.StageStats
					pinned[s] = rep.PinnedRecv
				}
				errs[s] = err
				return
			}
			v := max(cfg.Chunks, 1)
			var model StageModel = &sleepModel{fwd: cfg.ForwardTime, bwd: 2 * cfg.ForwardTime, rows: cfg.Rows, cols: cfg.Width, payload: payload, first: s == 0}
			if v > 1 {
				cm := &chunkedSleep{}
				for c := 0; c < v; c++ {
					cm.parts = append(cm.parts, &sleepModel{fwd: cfg.ForwardTime / time.Duration(v), bwd: 2 * cfg.ForwardTime / time.Duration(v), rows: cfg.Rows, cols: cfg.Width, payload: payload, first: s == 0 && c == 0})
				}
				model = cm
			}
			stats[s], errs[s] = RunStage(ctx, StageConfig{
				JobID: "bench", Stage: s, Stages: p, Schedule: cfg.Schedule, Chunks: max(cfg.Chunks, 1), MicroBatches: m, Steps: steps,
				Links: links[s], InFlight: cfg.InFlight, RecvTimeout: time.Minute, Trace: cfg.Trace,
			}, model)
		}(s)
	}
	start.Done()
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return err
	}
	first, last := stats[0].Start, stats[0].End
	var busy float64
	for _, st := range stats {
		if st.Start.Before(first) {
			first = st.Start
		}
		if st.End.After(last) {
			last = st.End
		}
		busy += st.BusySeconds
	}
	wall := last.Sub(first).Seconds()
	res.WallSeconds = wall
	res.BusyOn = "host"
	if stats[0].BusyOnDevice {
		res.BusyOn = "device"
	}
	if cfg.Compute == ComputeMLP {
		res.Receives = "pageable"
		if pinned[p-1] { // the last stage receives on every step
			res.Receives = "pinned"
		}
	}
	res.SamplesPerSec = float64(steps*m*cfg.Rows) / wall
	res.Bubble = 1 - busy/(float64(p)*wall)
	res.StageBubbles = res.StageBubbles[:0]
	res.StageTraces = nil
	for _, st := range stats {
		res.StageBubbles = append(res.StageBubbles, 1-st.BusySeconds/wall)
		if cfg.Trace {
			off := float64(st.Start.Sub(first).Nanoseconds()) / 1e3
			tr := make([]ActionSpan, len(st.Trace))
			for i, a := range st.Trace {
				a.StartUS += off
				a.EndUS += off
				tr[i] = a
			}
			res.StageTraces = append(res.StageTraces, tr)
		}
	}
	return nil
}

// benchSpec is the MLP job of the bench: equal layers (one per stage
// unless cfg.Layers says), so that by multiply-adds stages cost the same.
func benchSpec(cfg BenchConfig, steps int) JobSpec {
	spec := JobSpec{
		BatchSize: cfg.Rows * cfg.MicroBatches, MicroBatches: cfg.MicroBatches, Steps: steps, Seed: 1, Schedule: cfg.Schedule, InFlight: cfg.InFlight,
		Device: cfg.Device,
	}
	layers := cfg.Layers
	if layers == 0 {
		layers = cfg.Stages
	}
	for i := 0; i <= layers; i++ {
		spec.Layers = append(spec.Layers, cfg.Width)
	}
	return spec
}

// benchBandwidth streams BandwidthBytes over every link at once through the
// pipeline's send/receive queues, then the same bytes over raw TCP
// connections, one per link.
func benchBandwidth(ctx context.Context, cfg BenchConfig, res *BenchResult) error {
	p := cfg.Stages
	links := p - 1
	flows := links
	if cfg.Transport == TransportGRPC {
		flows *= cfg.Channels
	}
	n := int(cfg.BandwidthBytes / cfg.MessageBytes)
	if n < 1 {
		n = 1
	}
	elems := int(cfg.MessageBytes / 4)
	res.Flows, res.MessageBytes, res.LinkBytes = flows, int64(elems*4), int64(n*elems*4)

	// Alternate the two paths, so load from elsewhere on the machine hits
	// both alike; report the best of each and the median of the paired
	// ratios.
	var ratios []float64
	for round := 0; round < cfg.BandwidthRounds; round++ {
		stage, err := stageStream(ctx, cfg, links, n, elems)
		if err != nil {
			return err
		}
		// The same bytes per link, spread over the same number of flows.
		raw, err := rawStream(flows, max(1, n*links/flows), elems*4)
		if err != nil {
			return err
		}
		res.StageGBps = max(res.StageGBps, stage)
		res.RawTCPGBps = max(res.RawTCPGBps, raw)
		ratios = append(ratios, 100*stage/raw)
	}
	sort.Float64s(ratios)
	res.RatioPercents = ratios
	res.StageToRawPercent = ratios[len(ratios)/2]
	return nil
}

func stageStream(ctx context.Context, cfg BenchConfig, nLinks, n, elems int) (float64, error) {
	links, cleanup, err := benchLinks(ctx, cfg, "bandwidth", nLinks+1)
	if err != nil {
		return 0, err
	}
	defer cleanup()
	payload := make([]float32, elems)
	errs := make([]error, 2*nLinks)
	var wg sync.WaitGroup
	var mu sync.Mutex
	var last time.Time // when the last receiver had all its data
	t0 := time.Now()
	for f := 0; f < nLinks; f++ {
		snd := newEndpoint("receiver", links[f].Next, cfg.InFlight, time.Minute, "bandwidth", 0)
		rcv := newEndpoint("sender", links[f+1].Prev, cfg.InFlight, time.Minute, "bandwidth", 0)
		wg.Add(2)
		go func(f int) {
			defer wg.Done()
			for i := 0; i < n; i++ {
				if err := snd.Post(ctx, &Message{Tag: Tag{JobID: "bandwidth", MicroBatch: i, Dir: DirActivation}, Rows: 1, Cols: elems, Data: payload}); err != nil {
					errs[2*f] = err
					snd.close()
					return
				}
			}
			if err := snd.sendFinish(ctx); err != nil {
				errs[2*f] = err
			}
			snd.awaitFinish(ctx, 2*time.Second)
			snd.close()
		}(f)
		go func(f int) {
			defer wg.Done()
			for i := 0; i < n; i++ {
				m, err := rcv.Expect(ctx, Tag{JobID: "bandwidth", MicroBatch: i, Dir: DirActivation})
				if err != nil {
					errs[2*f+1] = err
					rcv.close()
					return
				}
				m.Release()
			}
			mu.Lock()
			if now := time.Now(); now.After(last) {
				last = now
			}
			mu.Unlock()
			if err := rcv.sendFinish(ctx); err != nil {
				errs[2*f+1] = err
			}
			rcv.awaitFinish(ctx, 2*time.Second)
			rcv.close()
		}(f)
	}
	wg.Wait()
	el := last.Sub(t0).Seconds()
	for _, l := range links {
		l.Close()
	}
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(nLinks) * float64(n) * float64(elems*4) / el / 1e9, nil
}

// rawStream writes n messages of size bytes over each of flows loopback
// TCP connections and reads them on the other end.
func rawStream(flows, n, size int) (float64, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	conns := make([][2]net.Conn, flows)
	for f := range conns {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			return 0, err
		}
		s, err := ln.Accept()
		if err != nil {
			c.Close()
			return 0, err
		}
		conns[f] = [2]net.Conn{c, s}
	}
	defer func() {
		for _, c := range conns {
			c[0].Close()
			c[1].Close()
		}
	}()
	errs := make([]error, 2*flows)
	var wg sync.WaitGroup
	t0 := time.Now()
	for f := range conns {
		wg.Add(2)
		go func(f int) {
			defer wg.Done()
			buf := make([]byte, size)
			for i := 0; i < n; i++ {
				if _, err := conns[f][0].Write(buf); err != nil {
					errs[2*f] = err
					return
				}
			}
		}(f)
		go func(f int) {
			defer wg.Done()
			buf := make([]byte, size)
			for i := 0; i < n; i++ {
				if _, err := io.ReadFull(conns[f][1], buf); err != nil {
					errs[2*f+1] = err
					return
				}
			}
		}(f)
	}
	wg.Wait()
	el := time.Since(t0).Seconds()
	if err := errors.Join(errs...); err != nil {
		return 0, err
	}
	return float64(flows) * float64(n) * float64(size) / el / 1e9, nil
}
