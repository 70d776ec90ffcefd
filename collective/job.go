package collective

import (
	"context"
	"fmt"
	"io"
	"sort"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// AllReduceJobSpec is the spec of the built-in "allreduce" job.
type AllReduceJobSpec struct {
	// Sizes are buffer sizes in bytes (see bytesize.Parse); each a multiple of
	// the element size.
	Sizes []int64 `json:"sizes"`
	// DType is the element type (default float32).
	DType DType `json:"dtype"`
	// Iters timed iterations per size (default 20); Warmup untimed ones
	// before them (default 3).
	Iters  int `json:"iters"`
	Warmup int `json:"warmup"`
	// Device is "auto", "cpu" or "cuda" (see LookupDevice).
	Device string `json:"device"`
	// LocalRank is the rank's index among the job's ranks on its node (picks
	// the GPU when GPUs is empty).
	LocalRank int `json:"local_rank"`
	// GPUs are the device ordinals the rank was placed on; it computes on
	// the first (ranks sharing one GPU name the same). Empty: LocalRank
	// picks the device.
	GPUs []int `json:"gpus,omitempty"`
	// Progress, if set, is called after each timed iteration (bench UIs).
	Progress func(size int64, iter, iters int) `json:"-"`
}

// Validate fills defaults and checks the spec.
func (s *AllReduceJobSpec) Validate() error {
	if s.DType == 0 {
		s.DType = Float32
	}
	if s.Iters == 0 {
		s.Iters = 20
	}
	if s.Warmup == 0 {
		s.Warmup = 3
	}
	if !s.DType.Valid() {
		return fmt.Errorf("%w: allreduce job: dtype %v", ErrBadDType, s.DType)
	}
	if len(s.Sizes) == 0 {
		return fmt.Errorf("%w: allreduce job: sizes is empty (give e.g. [1MiB, 64MiB])", ErrBadArgument)
	}
	if s.Iters < 1 || s.Warmup < 0 {
		return fmt.Errorf("%w: allreduce job: iters must be >= 1 and warmup >= 0, got %d and %d", ErrBadArgument, s.Iters, s.Warmup)
	}
	for _, b := range s.Sizes {
		if b <= 0 || b%int64(s.DType.Size()) != 0 {
			return fmt.Errorf("%w: allreduce job: size %d bytes is not a positive multiple of %v (%d bytes)", ErrBadArgument, b, s.DType, s.DType.Size())
		}
	}
	return nil
}

// deviceIndex is what the rank passes to Device.Alloc: its placed GPU, or
// its local rank when it was placed without one.
func (s *AllReduceJobSpec) deviceIndex() int {
	if len(s.GPUs) > 0 {
		return s.GPUs[0]
	}
	return s.LocalRank
}

// AllReduceSizeResult is the measurement of one size.
type AllReduceSizeResult struct {
	Bytes int64  `json:"bytes"`
	Count int64  `json:"count"`
	DType string `json:"dtype"`
	// Algorithm is "ring", "recursive-doubling", "same-host-ipc" (the
	// buffer's same-host ring, no network) or "local" (one rank).
	Algorithm string `json:"algorithm"`
	// TimeUs is the median time of one all-reduce (microseconds); MinUs the
	// fastest.
	TimeUs float64 `json:"time_us"`
	MinUs  float64 `json:"min_us"`
	// AlgBW = bytes / time; BusBW = AlgBW * 2(n-1)/n (nccl-tests), GB/s.
	AlgBWGBps float64 `json:"algbw_gbps"`
	BusBWGBps float64 `json:"busbw_gbps"`
	// Wrong is the number of elements that differed from the expected sum.
	Wrong int64 `json:"wrong"`
}

// AllReduceReport is a rank's report of the allreduce job (JSON for
// `gpumesh job status --json`).
type AllReduceReport struct {
	Rank     int                   `json:"rank"`
	Ranks    int                   `json:"ranks"`
	Device   string                `json:"device"`
	Channels int                   `json:"channels"`
	Results  []AllReduceSizeResult `json:"results"`
	Wrong    int64                 `json:"wrong"`
}

// BusBandwidthFactor is 2(n-1)/n, the share of the buffer each rank sends
// in an all-reduce (nccl-tests' busbw factor).
func BusBandwidthFactor(n int) float64 {
	if n <= 1 {
		return 0
	}
	return 2 * float64(n-1) / float64(n)
}

// jobValue is the input of rank r at element i: small non-negative
// integers whose sum over n ranks is exact in every dtype.
func jobValue(dt DType, n, r, i int) float64 {
	limit := 1 << 24
	switch dt {
	case BFloat16:
		limit = 256
	case Float16:
		limit = 2048
	}
	maxv := 4
	if maxv*n > limit {
		maxv = limit / n
	}
	return float64((r*7 + i*3) % (maxv + 1))
}

func jobExpected(dt DType, n, i int) float64 {
	s := 0.0
	for r := 0; r < n; r++ {
		s += jobValue(dt, n, r, i)
	}
	if dt == Uint8 {
		s = float64(uint8(int64(s)))
	}
	return s
}

// fillJob writes rank r's values into buf through its chunk operations
// (works for device buffers too) and checks/reads back through ReadChunk.
func fillJob(buf Buffer, n, r int) error {
	dt := buf.DType()
	count := buf.Len()
	const step = 1 << 20
	stage := NewHostBuffer(dt, min(step, count))
	for off := 0; off < count; off += step {
		l := min(step, count-off)
		for i := 0; i < l; i++ {
			stage.Set(i, jobValue(dt, n, r, off+i))
		}
		if err := buf.WriteChunk(off, Segments{stage.Bytes()[:l*dt.Size()]}); err != nil {
			return err
		}
		if err := buf.Sync(); err != nil {
			return err
		}
	}
	return nil
}

func checkJob(buf Buffer, n int) (int64, error) {
	dt := buf.DType()
	count := buf.Len()
	const step = 1 << 20
	var wrong int64
	for off := 0; off < count; off += step {
		l := min(step, count-off)
		b, err := buf.ReadChunk(off, l)
		if err != nil {
			return wrong, err
		}
		hb := &HostBuffer{dt: dt, n: l, bytes: b}
		if !aligned(b, dt.Size()) {
			hb = NewHostBuffer(dt, l)
			copy(hb.bytes, b)
		}
		for i := 0; i < l; i++ {
			if hb.At(i) != jobExpected(dt, n, off+i) {
				wrong++
			}
		}
		buf.ReleaseChunk(off, l, b)
	}
	return wrong, nil
}

// RunAllReduceJob runs the built-in allreduce job on one rank: for every
// size it fills the buffer with values derived from the rank, all-reduces
// once and checks every element exactly, then times Iters all-reduces (each
// after a Barrier, like nccl-tests and the PyTorch baseline) and reports the
// median time and bus bandwidth. Every rank of comm must call it with the
// same spec. It returns the report and an error wrapping ErrCheckFailed if
// any element was wrong (the report is filled in either case).
func RunAllReduceJob(ctx context.Context, comm *Communicator, spec AllReduceJobSpec, logger hclog.Logger) (AllReduceReport, error) {
	if logger == nil {
		logger = hclog.NewNullLogger()
	}
	rep := AllReduceReport{Rank: comm.Rank(), Ranks: comm.Size(), Channels: comm.Config().Channels}
	if err := spec.Validate(); err != nil {
		return rep, err
	}
	dev, err := LookupDevice(spec.Device)
	if err != nil {
		return rep, err
	}
	rep.Device = dev.Name()
	n := comm.Size()
	for _, size := range spec.Sizes {
		count := int(size / int64(spec.DType.Size()))
		buf, err := dev.Alloc(spec.deviceIndex(), spec.DType, count)
		if err != nil {
			return rep, fmt.Errorf("allreduce job: allocating %s on %s: %w", bytesize.Format(size), dev.Name(), err)
		}
		res, err := runJobSize(ctx, comm, spec, buf, size, count)
		if err == nil {
			// its same-host ring (if any) maps the neighbours' memory:
			// released on every rank before the buffers are freed
			err = comm.ForgetBuffer(buf)
		}
		if c, ok := buf.(io.Closer); ok {
			_ = c.Close()
		}
		if err != nil {
			return rep, err
		}
		rep.Results = append(rep.Results, res)
		rep.Wrong += res.Wrong
		logger.Info("allreduce", "size", bytesize.Format(size), "dtype", spec.DType, "ranks", n,
			"time_us", fmt.Sprintf("%.1f", res.TimeUs), "algbw_gbps", fmt.Sprintf("%.2f", res.AlgBWGBps),
			"busbw_gbps", fmt.Sprintf("%.2f", res.BusBWGBps), "wrong", res.Wrong)
	}
	if rep.Wrong > 0 {
		return rep, fmt.Errorf("%w: rank %d found %d wrong elements", ErrCheckFailed, comm.Rank(), rep.Wrong)
	}
	return rep, nil
}

func runJobSize(ctx context.Context, comm *Communicator, spec AllReduceJobSpec, buf Buffer, size int64, count int) (AllReduceSizeResult, error) {
	n := comm.Size()
	res := AllReduceSizeResult{Bytes: size, Count: int64(count), DType: spec.DType.String(), Algorithm: "ring"}
	switch {
	case n == 1:
		res.Algorithm = "local"
	case comm.useSmall(count, spec.DType):
		res.Algorithm = "recursive-doubling"
	}
	if err := fillJob(buf, n, comm.Rank()); err != nil {
		return res, err
	}
	if err := comm.AllReduce(ctx, buf, OpSum); err != nil {
		return res, err
	}
	if a := comm.LastAllReduceAlgorithm(); a != "" {
		res.Algorithm = a
	}
	wrong, err := checkJob(buf, n)
	if err != nil {
		return res, err
	}
	res.Wrong = wrong
	for i := 0; i < spec.Warmup; i++ {
		if err := comm.AllReduce(ctx, buf, OpSum); err != nil {
			return res, err
		}
	}
	times := make([]float64, 0, spec.Iters)
	for i := 0; i < spec.Iters; i++ {
		if err := comm.Barrier(ctx); err != nil {
			return res, err
		}
		t0 := time.Now()
		if err := comm.AllReduce(ctx, buf, OpSum); err != nil {
			return res, err
		}
		times = append(times, time.Since(t0).Seconds())
		if spec.Progress != nil {
			spec.Progress(size, i+1, spec.Iters)
		}
	}
	sort.Float64s(times)
	med := times[len(times)/2]
	if len(times)%2 == 0 {
		med = (times[len(times)/2-1] + times[len(times)/2]) / 2
	}
	res.TimeUs = med * 1e6
	res.MinUs = times[0] * 1e6
	res.AlgBWGBps = float64(size) / med / 1e9
	res.BusBWGBps = res.AlgBWGBps * BusBandwidthFactor(n)
	return res, nil
}
