// Package jobspec reads job specifications written in YAML or JSON (one
// schema), fills in defaults and validates them with errors that name the
// field and the fix. Nothing that fails Validate may be stored.
package jobspec

import (
	"encoding/json"
	"errors"
	"fmt"
	"regexp"
	"strings"
	"time"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"sigs.k8s.io/yaml"

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
	// DefaultKillTimeout is how long a stopped task has between SIGTERM and SIGKILL.
	DefaultKillTimeout = 30 * time.Second
	// DefaultRestartDelay is the wait before a failed generation is placed again.
	DefaultRestartDelay = 5 * time.Second
	// DefaultRestartAttempts is how many generations may fail before the job fails.
	DefaultRestartAttempts = 3
)

// Job types.
const (
	TypeExec      = "exec"
	TypeAllReduce = "allreduce"
	TypePipeline  = "pipeline"
)

var (
	// ErrInvalid is wrapped by every validation error.
	ErrInvalid = errors.New("job spec")
	// ErrTooLarge is returned for specs over MaxSpecBytes.
	ErrTooLarge = errors.New("job spec too large")
)

// Error is a validation error for one field.
type Error struct {
	Field string // dotted path, e.g. "allreduce.sizes[1]"
	Msg   string // what is wrong and what to do
}

func (e *Error) Error() string {
	if e.Field == "" {
		return "job spec: " + e.Msg
	}
	return fmt.Sprintf("job spec: %s: %s", e.Field, e.Msg)
}

// Unwrap lets errors.Is(err, ErrInvalid) match.
func (e *Error) Unwrap() error { return ErrInvalid }

func fieldErr(field, format string, args ...any) error {
	return &Error{Field: field, Msg: fmt.Sprintf(format, args...)}
}

// Parse reads a YAML or JSON job spec, applies defaults and validates it.
func Parse(data []byte) (*pb.JobSpec, error) {
	if len(data) > MaxSpecBytes {
		return nil, fmt.Errorf("%w: %d bytes; a spec may hold at most %d bytes (put data in files the job reads, not in the spec)", ErrTooLarge, len(data), MaxSpecBytes)
	}
	if strings.TrimSpace(string(data)) == "" {
		return nil, &Error{Msg: "the file is empty; a spec needs at least type, ranks and the type's section"}
	}
	js, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, &Error{Msg: "not valid YAML or JSON: " + cleanYAMLError(err)}
	}
	if strings.TrimSpace(string(js)) == "null" || !strings.HasPrefix(strings.TrimSpace(string(js)), "{") {
		return nil, &Error{Msg: "the document must be a mapping of fields (name, type, ranks, ...)"}
	}
	js, err = coerceStrings(js)
	if err != nil {
		return nil, err
	}
	spec := &pb.JobSpec{}
	if err := (protojson.UnmarshalOptions{}).Unmarshal(js, spec); err != nil {
		return nil, &Error{Msg: cleanProtoError(err)}
	}
	ApplyDefaults(spec)
	if err := Validate(spec); err != nil {
		return nil, err
	}
	return spec, nil
}

// coerceStrings turns YAML scalars that the schema holds as strings (command
// arguments such as 3 or true, env values, sizes) into strings, so that
// `command: [python3, train.py, --epochs, 3]` means what a person expects.
func coerceStrings(js []byte) ([]byte, error) {
	var doc map[string]any
	if err := json.Unmarshal(js, &doc); err != nil {
		return nil, &Error{Msg: "not valid YAML or JSON: " + err.Error()}
	}
	str := func(v any) any {
		switch x := v.(type) {
		case bool, float64:
			return fmt.Sprint(x)
		}
		return v
	}
	list := func(m map[string]any, key string) {
		if l, ok := m[key].([]any); ok {
			for i := range l {
				l[i] = str(l[i])
			}
		}
	}
	section := func(key string) map[string]any {
		m, _ := doc[key].(map[string]any)
		return m
	}
	if m := section("exec"); m != nil {
		list(m, "command")
		if env, ok := m["env"].(map[string]any); ok {
			for k, v := range env {
				env[k] = str(v)
			}
		}
	}
	if m := section("allreduce"); m != nil {
		list(m, "sizes")
	}
	if m := section("constraints"); m != nil {
		for _, k := range []string{"min_gpu_memory", "az", "instance_type"} {
			if v, ok := m[k]; ok {
				m[k] = str(v)
			}
		}
	}
	if v, ok := doc["name"]; ok {
		doc["name"] = str(v)
	}
	durations := map[string]any{"kill_timeout": doc["kill_timeout"]}
	if r := section("restart"); r != nil {
		durations["restart.delay"] = r["delay"]
	}
	for field, v := range durations {
		if _, isNum := v.(float64); isNum {
			return nil, fieldErr(field, `durations need a unit: write "%vs" for %v seconds`, v, v)
		}
	}
	return json.Marshal(doc)
}

var protoErrPrefix = regexp.MustCompile(`^proto:\s*(\(line \d+:\d+\):\s*)?`)

func cleanProtoError(err error) string {
	msg := protoErrPrefix.ReplaceAllString(err.Error(), "")
	msg = strings.ReplaceAll(msg, "\u00a0", " ")
	if strings.HasPrefix(msg, "unknown field") {
		msg += " (see `gpumesh job run --help` for the fields a spec may hold)"
	}
	if strings.Contains(msg, "google.protobuf.Duration") {
		msg += ` (durations are strings such as "5s" or "2m")`
	}
	return msg
}

func cleanYAMLError(err error) string {
	return strings.TrimPrefix(err.Error(), "error converting YAML to JSON: ")
}

// ApplyDefaults fills the fields a person may leave out. It is idempotent.
func ApplyDefaults(s *pb.JobSpec) {
	if s.Type == "" {
		s.Type = TypeExec
	}
	if s.Placement == "" {
		s.Placement = "pack"
	}
	if s.Name == "" {
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

// Validate checks a spec whose defaults were applied. The error names the
// first field at fault and what to do about it.
func Validate(s *pb.JobSpec) error {
	if s == nil {
		return &Error{Msg: "no spec given"}
	}
	if n := proto.Size(s); n > MaxSpecBytes {
		return fmt.Errorf("%w: %d bytes encoded; at most %d", ErrTooLarge, n, MaxSpecBytes)
	}
	if !nameRE.MatchString(s.Name) {
		return fieldErr("name", "%q is not a valid name: use 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit", s.Name)
	}
	switch s.Type {
	case TypeExec, TypeAllReduce, TypePipeline:
	default:
		return fieldErr("type", "unknown type %q; use exec, allreduce or pipeline", s.Type)
	}
	elastic := s.MinRanks != 0 || s.MaxRanks != 0
	switch {
	case elastic && s.Ranks != 0:
		return fieldErr("ranks", "give either ranks (fixed size) or min_ranks and max_ranks (elastic), not both")
	case elastic:
		if s.MinRanks < 1 {
			return fieldErr("min_ranks", "must be >= 1, got %d", s.MinRanks)
		}
		if s.MaxRanks < s.MinRanks {
			return fieldErr("max_ranks", "must be >= min_ranks (%d), got %d", s.MinRanks, s.MaxRanks)
		}
		if s.MaxRanks > MaxRanks {
			return fieldErr("max_ranks", "must be <= %d, got %d", MaxRanks, s.MaxRanks)
		}
		if s.Type == TypePipeline {
			return fieldErr("min_ranks", "pipeline jobs have one rank per stage and cannot be elastic; set ranks")
		}
	default:
		if s.Ranks < 1 {
			return fieldErr("ranks", "must be >= 1, got %d (or give min_ranks and max_ranks for an elastic job)", s.Ranks)
		}
		if s.Ranks > MaxRanks {
			return fieldErr("ranks", "must be <= %d, got %d", MaxRanks, s.Ranks)
		}
	}
	if s.GpusPerRank < 0 || s.GpusPerRank > MaxGPUsPerRank {
		return fieldErr("gpus_per_rank", "must be between 0 and %d, got %d", MaxGPUsPerRank, s.GpusPerRank)
	}
	if s.Placement != "pack" && s.Placement != "spread" {
		return fieldErr("placement", "unknown placement %q; use pack (fewest nodes, the default) or spread", s.Placement)
	}
	if c := s.Constraints; c != nil {
		if c.Lifecycle != "" && !oneOf(c.Lifecycle, []string{"spot", "on-demand"}) {
			return fieldErr("constraints.lifecycle", "unknown lifecycle %q; use spot or on-demand", c.Lifecycle)
		}
		if c.MinGpuMemory != "" {
			if _, err := bytesize.Parse(c.MinGpuMemory); err != nil {
				return fieldErr("constraints.min_gpu_memory", "%v", err)
			}
			if s.GpusPerRank == 0 {
				return fieldErr("constraints.min_gpu_memory", "only makes sense with gpus_per_rank >= 1")
			}
		}
	}
	if r := s.Restart; r != nil {
		if r.Attempts < 0 || r.Attempts > 1000 {
			return fieldErr("restart.attempts", "must be between 0 and 1000, got %d", r.Attempts)
		}
		if r.Delay != nil && (r.Delay.AsDuration() < 0 || r.Delay.AsDuration() > 24*time.Hour) {
			return fieldErr("restart.delay", "must be between 0s and 24h, got %s", r.Delay.AsDuration())
		}
	}
	if s.KillTimeout != nil && (s.KillTimeout.AsDuration() < 0 || s.KillTimeout.AsDuration() > time.Hour) {
		return fieldErr("kill_timeout", "must be between 0s and 1h, got %s", s.KillTimeout.AsDuration())
	}
	switch s.Type {
	case TypeExec:
		if s.Allreduce != nil || s.Pipeline != nil {
			return fieldErr("type", "exec jobs take an exec section only")
		}
		if s.Exec == nil || len(s.Exec.Command) == 0 {
			return fieldErr("exec.command", `an exec job needs a command, e.g. exec: {command: ["python3", "train.py"]}`)
		}
		if s.Exec.Command[0] == "" {
			return fieldErr("exec.command[0]", "the program to run is empty")
		}
		for k := range s.Exec.Env {
			if k == "" || strings.ContainsAny(k, "=\x00") {
				return fieldErr("exec.env", "%q is not a valid environment variable name", k)
			}
		}
	case TypeAllReduce:
		if s.Exec != nil || s.Pipeline != nil {
			return fieldErr("type", "allreduce jobs take an allreduce section only")
		}
		a := s.Allreduce
		for i, sz := range a.Sizes {
			n, err := bytesize.Parse(sz)
			if err != nil {
				return fieldErr(fmt.Sprintf("allreduce.sizes[%d]", i), "%v", err)
			}
			if n == 0 || n > 16<<30 {
				return fieldErr(fmt.Sprintf("allreduce.sizes[%d]", i), "must be between 1 byte and 16GiB, got %s", sz)
			}
		}
		if !oneOf(a.Dtype, dtypes) {
			return fieldErr("allreduce.dtype", "unknown dtype %q; use one of %s", a.Dtype, strings.Join(dtypes, ", "))
		}
		if !oneOf(a.Op, reduceOps) {
			return fieldErr("allreduce.op", "unknown op %q; use one of %s", a.Op, strings.Join(reduceOps, ", "))
		}
		if a.Iters < 1 || a.Iters > 100000 {
			return fieldErr("allreduce.iters", "must be between 1 and 100000, got %d", a.Iters)
		}
		if !oneOf(a.Device, []string{"auto", "cpu", "cuda"}) {
			return fieldErr("allreduce.device", "unknown device %q; use auto, cpu or cuda", a.Device)
		}
		if a.Device == "cuda" && s.GpusPerRank < 1 {
			return fieldErr("allreduce.device", "device cuda needs gpus_per_rank >= 1")
		}
		if a.Channels < 0 || a.Channels > 64 {
			return fieldErr("allreduce.channels", "must be between 0 (the node's default) and 64, got %d", a.Channels)
		}
	case TypePipeline:
		if s.Exec != nil || s.Allreduce != nil {
			return fieldErr("type", "pipeline jobs take a pipeline section only")
		}
		p := s.Pipeline
		if len(p.Layers) < 2 {
			return fieldErr("pipeline.layers", "needs at least two widths (input and output), e.g. [64, 128, 10]")
		}
		for i, w := range p.Layers {
			if w < 1 || w > 1<<16 {
				return fieldErr(fmt.Sprintf("pipeline.layers[%d]", i), "width must be between 1 and 65536, got %d", w)
			}
		}
		if int(s.Ranks) > len(p.Layers)-1 {
			return fieldErr("ranks", "a pipeline of %d layers has at most %d stages, got ranks %d", len(p.Layers)-1, len(p.Layers)-1, s.Ranks)
		}
		if p.Microbatches < 1 || p.Microbatches > 4096 {
			return fieldErr("pipeline.microbatches", "must be between 1 and 4096, got %d", p.Microbatches)
		}
		if p.MicrobatchSize < 1 || p.MicrobatchSize > 1<<16 {
			return fieldErr("pipeline.microbatch_size", "must be between 1 and 65536, got %d", p.MicrobatchSize)
		}
		if p.Steps < 1 || p.Steps > 1<<20 {
			return fieldErr("pipeline.steps", "must be between 1 and 1048576, got %d", p.Steps)
		}
		if !(p.LearningRate > 0 && p.LearningRate < 100) {
			return fieldErr("pipeline.learning_rate", "must be > 0 and < 100, got %g", p.LearningRate)
		}
		if !oneOf(p.Schedule, []string{"gpipe", "1f1b", "interleaved"}) {
			return fieldErr("pipeline.schedule", "unknown schedule %q; use gpipe, 1f1b or interleaved", p.Schedule)
		}
		if p.Schedule == "interleaved" && p.Chunks < 2 {
			return fieldErr("pipeline.chunks", "the interleaved schedule needs chunks >= 2 (model chunks per stage), got %d", p.Chunks)
		}
		if p.Schedule != "interleaved" && p.Chunks > 1 {
			return fieldErr("pipeline.chunks", "chunks %d need schedule interleaved", p.Chunks)
		}
		if p.Chunks < 0 || p.Chunks > 16 {
			return fieldErr("pipeline.chunks", "must be between 0 and 16, got %d", p.Chunks)
		}
		if p.Chunks > 1 && int(s.Ranks)*int(p.Chunks) > len(p.Layers)-1 {
			return fieldErr("pipeline.chunks", "%d stages × %d chunks need at least %d layers, the model has %d", s.Ranks, p.Chunks, int(s.Ranks)*int(p.Chunks), len(p.Layers)-1)
		}
		if !oneOf(p.Device, []string{"cpu", "cuda"}) {
			return fieldErr("pipeline.device", "unknown device %q; use cpu or cuda", p.Device)
		}
		if !oneOf(p.Mode, []string{"train", "inference"}) {
			return fieldErr("pipeline.mode", "unknown mode %q; use train or inference", p.Mode)
		}
	}
	return nil
}
