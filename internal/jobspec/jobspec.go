// Package jobspec reads job specifications written in YAML or JSON (one
// schema), fills in defaults and validates them. ParseFile reports every
// problem at once, each with the file, its line and column, the field's path
// (exec.command) and what to do ("did you mean ..."). Nothing that fails
// Validate may be stored.
package jobspec

import (
	"fmt"
	"regexp"
	"sort"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Limits on what a job spec may hold.
const (
	// MaxSpecBytes bounds the size of a spec file and of an encoded spec.
	MaxSpecBytes = 256 << 10
	// MaxRanks bounds the ranks of one job.
	MaxRanks = 65536
	// MaxGPUsPerRank bounds gpus_per_rank.
	MaxGPUsPerRank = 64
	// MaxRanksPerGPU bounds ranks_per_gpu.
	MaxRanksPerGPU = 64
	// DefaultKillTimeout is how long a stopped task has between SIGTERM and SIGKILL.
	DefaultKillTimeout = 30 * time.Second
	// DefaultRestartDelay is the wait before a failed generation is placed again.
	DefaultRestartDelay = 5 * time.Second
	// DefaultRestartAttempts is how many generations may fail before the job fails.
	DefaultRestartAttempts = 3
	// DefaultCheckpointKeep is how many complete checkpoints are kept.
	DefaultCheckpointKeep = checkpoint.DefaultKeep
)

// Job types.
const (
	TypeExec      = "exec"
	TypeAllReduce = "allreduce"
	TypePipeline  = "pipeline"
)

// ApplyDefaults fills the fields a person may leave out. It is idempotent.
func ApplyDefaults(s *pb.JobSpec) {
	if s.Type == "" {
		s.Type = TypeExec
	}
	if s.Placement == "" {
		s.Placement = "pack"
	}
	// A job that keeps checkpoints gets no default name: the name is what
	// tells its checkpoints from other jobs' (Validate asks for one).
	if s.Name == "" && s.Checkpoint == nil {
		s.Name = s.Type
	}
	if s.Restart == nil {
		s.Restart = &pb.RestartPolicy{Attempts: DefaultRestartAttempts, Delay: durationpb.New(DefaultRestartDelay)}
	} else if s.Restart.Delay == nil {
		s.Restart.Delay = durationpb.New(DefaultRestartDelay)
	}
	if s.KillTimeout == nil {
		s.KillTimeout = durationpb.New(DefaultKillTimeout)
	}
	if c := s.Checkpoint; c != nil && c.Keep == 0 {
		c.Keep = DefaultCheckpointKeep
	}
	switch s.Type {
	case TypeAllReduce:
		if s.Allreduce == nil {
			s.Allreduce = &pb.AllReduceSpec{}
		}
		a := s.Allreduce
		if len(a.Sizes) == 0 {
			a.Sizes = []string{"1MiB", "16MiB"}
		}
		if a.Dtype == "" {
			a.Dtype = "float32"
		}
		if a.Iters == 0 {
			a.Iters = 5
		}
		if a.Device == "" {
			a.Device = "auto"
		}
		if a.Op == "" {
			a.Op = "sum"
		}
	case TypeService:
		applyServiceDefaults(s)
	case TypePipeline:
		if s.Pipeline == nil {
			s.Pipeline = &pb.PipelineSpec{}
		}
		p := s.Pipeline
		if p.Microbatches == 0 {
			p.Microbatches = 8
		}
		if p.MicrobatchSize == 0 {
			p.MicrobatchSize = 16
		}
		if p.Steps == 0 {
			p.Steps = 10
		}
		if p.LearningRate == 0 {
			p.LearningRate = 0.05
		}
		if p.Schedule == "" {
			p.Schedule = "1f1b"
		}
		if p.Device == "" {
			p.Device = "cpu"
		}
		if p.Mode == "" {
			p.Mode = "train"
		}
		if p.Seed == 0 {
			p.Seed = 1
		}
	}
}

var nameRE = regexp.MustCompile(`^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}$`)

var (
	dtypes    = []string{"float32", "float64", "float16", "bfloat16", "int32", "int64", "uint8"}
	reduceOps = []string{"sum", "avg", "max", "min", "prod"}
)

func oneOf(v string, set []string) bool {
	for _, s := range set {
		if v == s {
			return true
		}
	}
	return false
}

// Validate checks a spec whose defaults were applied. It returns Errors
// holding every field at fault, each with what to do about it, or nil.
func Validate(s *pb.JobSpec) error {
	if s == nil {
		return Errors{{Msg: "no spec given"}}
	}
	if n := proto.Size(s); n > MaxSpecBytes {
		return fmt.Errorf("%w: %d bytes encoded; at most %d", ErrTooLarge, n, MaxSpecBytes)
	}
	var errs Errors
	add := func(field, format string, args ...any) {
		errs = append(errs, fieldErr(field, format, args...))
	}
	validateCommon(s, add)
	validateNotService(s, add)
	switch s.Type {
	case TypeExec:
		validateExec(s, add)
	case TypeAllReduce:
		validateAllReduce(s, add)
	case TypePipeline:
		validatePipeline(s, add)
	case TypeService:
		validateService(s, add)
	}
	return errs.err()
}

// report records one problem: the field's path, then a format and its args.
type report func(field, format string, args ...any)

func validateCommon(s *pb.JobSpec, add report) {
	switch {
	case s.Name == "" && s.Checkpoint != nil:
		add("name", "a job with a checkpoint block needs a name: its checkpoints belong to it by name (a resubmission of the same name "+
			"resumes from them), and unnamed jobs are all called %q, so one could continue another's checkpoints; add name: NAME", s.Type)
	case !nameRE.MatchString(s.Name):
		add("name", "%q is not a valid name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit", s.Name)
	}
	switch s.Type {
	case TypeExec, TypeAllReduce, TypePipeline, TypeService:
	default:
		add("type", "unknown type %q; use exec, allreduce, pipeline or service", s.Type)
	}
	elastic := s.MinRanks != 0 || s.MaxRanks != 0
	switch {
	case elastic && s.Ranks != 0:
		add("ranks", "give either ranks (fixed size) or min_ranks and max_ranks (elastic), not both")
	case elastic:
		if s.MinRanks < 1 {
			add("min_ranks", "must be >= 1, got %d", s.MinRanks)
		}
		if s.MaxRanks < s.MinRanks {
			add("max_ranks", "must be >= min_ranks (%d), got %d", s.MinRanks, s.MaxRanks)
		} else if s.MaxRanks > MaxRanks {
			add("max_ranks", "must be <= %d, got %d", MaxRanks, s.MaxRanks)
		}
		if s.Type == TypePipeline {
			add("min_ranks", "pipeline jobs have one rank per stage and cannot be elastic; set ranks")
		}
	default:
		if s.Ranks < 1 {
			add("ranks", "must be >= 1, got %d (or give min_ranks and max_ranks for an elastic job)", s.Ranks)
		} else if s.Ranks > MaxRanks {
			add("ranks", "must be <= %d, got %d", MaxRanks, s.Ranks)
		}
	}
	if s.GpusPerRank < 0 || s.GpusPerRank > MaxGPUsPerRank {
		add("gpus_per_rank", "must be between 0 and %d, got %d", MaxGPUsPerRank, s.GpusPerRank)
	}
	// ranks_per_gpu 0 (not given) and 1 both mean GPUs of its own per rank.
	switch {
	case s.RanksPerGpu < 0 || s.RanksPerGpu > MaxRanksPerGPU:
		add("ranks_per_gpu", "must be between 1 and %d, got %d", MaxRanksPerGPU, s.RanksPerGpu)
	case s.RanksPerGpu > 1 && s.GpusPerRank != 1:
		add("ranks_per_gpu", "%d ranks share one GPU, so each rank takes exactly one: set gpus_per_rank: 1 (got %d), or remove ranks_per_gpu to give every rank GPUs of its own",
			s.RanksPerGpu, s.GpusPerRank)
	case s.RanksPerGpu > 1 && s.Type == TypeService:
		add("ranks_per_gpu", "service replicas are placed one at a time, each on a GPU of its own; remove ranks_per_gpu (it is for exec, allreduce and pipeline jobs)")
	}
	if s.Placement != "pack" && s.Placement != "spread" {
		add("placement", "unknown placement %q; use pack (fewest nodes, the default) or spread", s.Placement)
	}
	if c := s.Constraints; c != nil {
		if c.Lifecycle != "" && !oneOf(c.Lifecycle, []string{"spot", "on-demand"}) {
			add("constraints.lifecycle", "unknown lifecycle %q; use spot or on-demand", c.Lifecycle)
		}
		if c.MinGpuMemory != "" {
			if _, err := bytesize.Parse(c.MinGpuMemory); err != nil {
				add("constraints.min_gpu_memory", "%v", err)
			} else if s.GpusPerRank == 0 {
				add("constraints.min_gpu_memory", "only makes sense with gpus_per_rank >= 1")
			}
		}
	}
	if r := s.Restart; r != nil {
		if r.Attempts < 0 || r.Attempts > 1000 {
			add("restart.attempts", "must be between 0 and 1000, got %d", r.Attempts)
		}
		if r.Delay != nil && (r.Delay.AsDuration() < 0 || r.Delay.AsDuration() > 24*time.Hour) {
			add("restart.delay", "must be between 0s and 24h, got %s", r.Delay.AsDuration())
		}
	}
	if c := s.Checkpoint; c != nil {
		validateCheckpoint(s, c, add)
	}
	if s.KillTimeout != nil && (s.KillTimeout.AsDuration() < 0 || s.KillTimeout.AsDuration() > time.Hour) {
		add("kill_timeout", "must be between 0s and 1h, got %s", s.KillTimeout.AsDuration())
	}
}

func validateCheckpoint(s *pb.JobSpec, c *pb.CheckpointSpec, add report) {
	if s.Type != TypeExec {
		add("checkpoint", "only exec jobs save checkpoints; remove this section or set type: exec")
	}
	if c.Uri == "" {
		add("checkpoint.uri", "where to store checkpoints is missing; give s3://bucket/prefix or file:///shared/dir")
	} else if _, err := checkpoint.ParseURI(c.Uri); err != nil {
		add("checkpoint.uri", "%s", strings.TrimPrefix(err.Error(), checkpoint.ErrInvalidURI.Error()+": "))
	}
	if c.Keep < 1 || c.Keep > 1000 {
		add("checkpoint.keep", "must be between 1 and 1000, got %d", c.Keep)
	}
	if c.Every < 0 {
		add("checkpoint.every", "must be >= 0 steps (0: save only when preempted), got %d", c.Every)
	}
	if c.ResumeFrom != "" && !nameRE.MatchString(c.ResumeFrom) {
		add("checkpoint.resume_from", "must be the name or ID of the job whose checkpoints to continue from (letters, digits, '_', '.', '-'), got %q", c.ResumeFrom)
	}
}

func validateExec(s *pb.JobSpec, add report) {
	if s.Allreduce != nil {
		add("allreduce", "exec jobs take an exec section only (or set type: allreduce)")
	}
	if s.Pipeline != nil {
		add("pipeline", "exec jobs take an exec section only (or set type: pipeline)")
	}
	if s.Exec == nil || len(s.Exec.Command) == 0 {
		what := "an exec job"
		if s.Type != TypeExec {
			what = "a " + s.Type + " job"
		}
		add("exec.command", `%s needs a command, e.g. exec: {command: ["python3", "train.py"]}`, what)
		return
	}
	if s.Exec.Command[0] == "" {
		add("exec.command[0]", "the program to run is empty")
	}
	keys := make([]string, 0, len(s.Exec.Env))
	for k := range s.Exec.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			add("exec.env", "%q is not a valid environment variable name", k)
		}
	}
}

func validateAllReduce(s *pb.JobSpec, add report) {
	if s.Exec != nil {
		add("exec", "allreduce jobs take an allreduce section only (or set type: exec)")
	}
	if s.Pipeline != nil {
		add("pipeline", "allreduce jobs take an allreduce section only (or set type: pipeline)")
	}
	a := s.Allreduce
	if a == nil {
		add("allreduce", "an allreduce job needs an allreduce section")
		return
	}
	for i, sz := range a.Sizes {
		field := fmt.Sprintf("allreduce.sizes[%d]", i)
		n, err := bytesize.Parse(sz)
		if err != nil {
			add(field, "%v", err)
		} else if n == 0 || n > 16<<30 {
			add(field, "must be between 1 byte and 16GiB, got %s", sz)
		}
	}
	if !oneOf(a.Dtype, dtypes) {
		add("allreduce.dtype", "unknown dtype %q; use one of %s", a.Dtype, strings.Join(dtypes, ", "))
	}
	if !oneOf(a.Op, reduceOps) {
		add("allreduce.op", "unknown op %q; use one of %s", a.Op, strings.Join(reduceOps, ", "))
	}
	if a.Iters < 1 || a.Iters > 100000 {
		add("allreduce.iters", "must be between 1 and 100000, got %d", a.Iters)
	}
	if !oneOf(a.Device, []string{"auto", "cpu", "cuda"}) {
		add("allreduce.device", "unknown device %q; use auto, cpu or cuda", a.Device)
	} else if a.Device == "cuda" && s.GpusPerRank < 1 {
		add("allreduce.device", "device cuda needs gpus_per_rank >= 1")
	}
	if a.Channels < 0 || a.Channels > 64 {
		add("allreduce.channels", "must be between 0 (the node's default) and 64, got %d", a.Channels)
	}
}

func validatePipeline(s *pb.JobSpec, add report) {
	if s.Exec != nil {
		add("exec", "pipeline jobs take a pipeline section only (or set type: exec)")
	}
	if s.Allreduce != nil {
		add("allreduce", "pipeline jobs take a pipeline section only (or set type: allreduce)")
	}
	p := s.Pipeline
	if p == nil {
		add("pipeline", "a pipeline job needs a pipeline section")
		return
	}
	layersOK := len(p.Layers) >= 2
	if !layersOK {
		add("pipeline.layers", "needs at least two widths (input and output), e.g. [64, 128, 10]")
	}
	for i, w := range p.Layers {
		if w < 1 || w > 1<<16 {
			add(fmt.Sprintf("pipeline.layers[%d]", i), "width must be between 1 and 65536, got %d", w)
		}
	}
	if layersOK && int(s.Ranks) > len(p.Layers)-1 {
		add("ranks", "a pipeline of %d layers has at most %d stages, got ranks %d", len(p.Layers)-1, len(p.Layers)-1, s.Ranks)
	}
	if p.Microbatches < 1 || p.Microbatches > 4096 {
		add("pipeline.microbatches", "must be between 1 and 4096, got %d", p.Microbatches)
	}
	if p.MicrobatchSize < 1 || p.MicrobatchSize > 1<<16 {
		add("pipeline.microbatch_size", "must be between 1 and 65536, got %d", p.MicrobatchSize)
	}
	if p.Steps < 1 || p.Steps > 1<<20 {
		add("pipeline.steps", "must be between 1 and 1048576, got %d", p.Steps)
	}
	if !(p.LearningRate > 0 && p.LearningRate < 100) {
		add("pipeline.learning_rate", "must be > 0 and < 100, got %g", p.LearningRate)
	}
	switch {
	case !oneOf(p.Schedule, []string{"gpipe", "1f1b", "interleaved"}):
		add("pipeline.schedule", "unknown schedule %q; use gpipe, 1f1b or interleaved", p.Schedule)
	case p.Chunks < 0 || p.Chunks > 16:
		add("pipeline.chunks", "must be between 0 and 16, got %d", p.Chunks)
	case p.Schedule == "interleaved" && p.Chunks < 2:
		add("pipeline.chunks", "the interleaved schedule needs chunks >= 2 (model chunks per stage), got %d", p.Chunks)
	case p.Schedule != "interleaved" && p.Chunks > 1:
		add("pipeline.chunks", "chunks %d need schedule interleaved", p.Chunks)
	case layersOK && p.Chunks > 1 && int(s.Ranks)*int(p.Chunks) > len(p.Layers)-1:
		add("pipeline.chunks", "%d stages × %d chunks need at least %d layers, the model has %d", s.Ranks, p.Chunks, int(s.Ranks)*int(p.Chunks), len(p.Layers)-1)
	}
	if !oneOf(p.Device, []string{"cpu", "cuda"}) {
		add("pipeline.device", "unknown device %q; use cpu or cuda", p.Device)
	}
	if !oneOf(p.Mode, []string{"train", "inference"}) {
		add("pipeline.mode", "unknown mode %q; use train or inference", p.Mode)
	}
}
