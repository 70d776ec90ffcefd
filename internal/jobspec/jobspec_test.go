package jobspec

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

func TestParseValid(t *testing.T) {
	spec, err := Parse([]byte(`
name: hello
type: exec
ranks: 2
gpus_per_rank: 0
exec:
  command: ["sh", "-c", "echo rank $RANK of $WORLD_SIZE"]
restart: {attempts: 2, delay: 1s}
`))
	if err != nil {
		t.Fatal(err)
	}
	if spec.Name != "hello" || spec.Ranks != 2 || len(spec.Exec.Command) != 3 {
		t.Fatalf("unexpected spec %v", spec)
	}
	if spec.Restart.Attempts != 2 || spec.Restart.Delay.AsDuration().Seconds() != 1 {
		t.Fatalf("restart not parsed: %v", spec.Restart)
	}
	if spec.KillTimeout.AsDuration() != DefaultKillTimeout {
		t.Fatalf("kill timeout default not applied: %v", spec.KillTimeout)
	}
	// The same schema in JSON.
	js, err := Parse([]byte(`{"name":"hello","ranks":2,"exec":{"command":["true"]}}`))
	if err != nil {
		t.Fatal(err)
	}
	if js.Type != TypeExec || js.Placement != "pack" {
		t.Fatalf("defaults not applied: %v", js)
	}
	ck, err := Parse([]byte("name: train\nranks: 2\nexec: {command: [true]}\ncheckpoint: {uri: s3://bucket/runs/a, every: 100}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if ck.Checkpoint.Uri != "s3://bucket/runs/a" || ck.Checkpoint.Every != 100 || ck.Checkpoint.Keep != DefaultCheckpointKeep {
		t.Fatalf("checkpoint: %v", ck.Checkpoint)
	}
	ar, err := Parse([]byte("type: allreduce\nranks: 4\nallreduce: {sizes: [1MiB, 64MiB, 256MiB], dtype: float32, iters: 20, device: auto}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if len(ar.Allreduce.Sizes) != 3 || ar.Allreduce.Op != "sum" {
		t.Fatalf("allreduce: %v", ar.Allreduce)
	}
	// Ranks sharing GPUs: exec, allreduce and pipeline jobs; 1 goes with any
	// gpus_per_rank; left out it stays 0 (read as 1, as specs stored before it).
	for _, spec := range []string{
		"ranks: 4\ngpus_per_rank: 1\nranks_per_gpu: 2\nexec: {command: [true]}",
		"type: allreduce\nranks: 2\ngpus_per_rank: 1\nranks_per_gpu: 2\nallreduce: {device: cuda}",
		"type: pipeline\nranks: 2\ngpus_per_rank: 1\nranks_per_gpu: 2\npipeline: {layers: [8, 8, 4], device: cuda}",
		"ranks: 2\ngpus_per_rank: 2\nranks_per_gpu: 1\nexec: {command: [true]}",
	} {
		if _, err := Parse([]byte(spec)); err != nil {
			t.Errorf("%q: %v", spec, err)
		}
	}
	if sh, _ := Parse([]byte("ranks: 4\ngpus_per_rank: 1\nranks_per_gpu: 2\nexec: {command: [true]}")); sh.GetRanksPerGpu() != 2 {
		t.Errorf("ranks_per_gpu parsed as %d, want 2", sh.GetRanksPerGpu())
	}
	if spec.GetRanksPerGpu() != 0 {
		t.Errorf("ranks_per_gpu left out: %d, want 0", spec.GetRanksPerGpu())
	}
}

func TestParseInvalid(t *testing.T) {
	cases := []struct {
		name, spec, want string
	}{
		{"no command", "ranks: 1\nexec: {command: []}", "exec.command"},
		{"no exec section", "ranks: 1", "exec.command"},
		{"zero ranks", "ranks: 0\nexec: {command: [true]}", "ranks: must be >= 1, got 0"},
		{"negative ranks", "ranks: -3\nexec: {command: [true]}", "ranks: must be >= 1, got -3"},
		{"unknown type", "type: mpi\nranks: 1", `unknown type "mpi"`},
		{"unknown field", "ranks: 1\ncomand: [x]\nexec: {command: [true]}", `unknown field "comand"`},
		{"bad lifecycle", "ranks: 1\nexec: {command: [true]}\nconstraints: {lifecycle: cheap}", "constraints.lifecycle"},
		{"bad gpu memory", "ranks: 1\ngpus_per_rank: 1\nexec: {command: [true]}\nconstraints: {min_gpu_memory: lots}", "constraints.min_gpu_memory"},
		{"elastic and fixed", "ranks: 2\nmin_ranks: 1\nmax_ranks: 3\nexec: {command: [true]}", "either ranks"},
		{"elastic inverted", "min_ranks: 3\nmax_ranks: 2\nexec: {command: [true]}", "max_ranks"},
		{"bad size", "type: allreduce\nranks: 2\nallreduce: {sizes: [lots]}", "allreduce.sizes[0]"},
		{"bad dtype", "type: allreduce\nranks: 2\nallreduce: {dtype: complex64}", "allreduce.dtype"},
		{"cuda without gpus", "type: allreduce\nranks: 2\nallreduce: {device: cuda}", "gpus_per_rank"},
		{"bad duration", "ranks: 1\nexec: {command: [true]}\nkill_timeout: 5", "kill_timeout"},
		{"not yaml", "ranks: [1\n", "not valid YAML"},
		{"empty", "  \n", "empty"},
		{"scalar", "42", "mapping"},
		{"pipeline too many stages", "type: pipeline\nranks: 4\npipeline: {layers: [8, 4]}", "at most 1 stages"},
		{"mixed sections", "type: allreduce\nranks: 2\nexec: {command: [true]}", "allreduce section only"},
		{"bad name", "name: 'my job!'\nranks: 1\nexec: {command: [true]}", "name"},
		{"checkpoint without uri", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {keep: 2}", "checkpoint.uri: where to store"},
		{"checkpoint without a name", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 's3://b/p'}", `name: a job with a checkpoint block needs a name`},
		{"checkpoint bad scheme", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 'gs://b/p'}", `checkpoint.uri: "gs://b/p": unknown scheme`},
		{"checkpoint relative dir", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 'file://ckpt'}", "three slashes"},
		{"checkpoint keep", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 's3://b/p', keep: -1}", "checkpoint.keep"},
		{"checkpoint every", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 's3://b/p', every: -5}", "checkpoint.every"},
		{"checkpoint resume_from", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {uri: 's3://b/p', resume_from: 'a job'}", "checkpoint.resume_from: must be the name or ID"},
		{"checkpoint misspelt", "ranks: 1\nexec: {command: [true]}\ncheckpoint: {url: 's3://b/p'}", `did you mean "uri"`},
		{"checkpoint on allreduce", "type: allreduce\nranks: 2\ncheckpoint: {uri: 's3://b/p'}", "only exec jobs"},
		{"sharing without GPUs", "ranks: 2\nranks_per_gpu: 2\nexec: {command: [true]}", "ranks_per_gpu: 2 ranks share one GPU, so each rank takes exactly one: set gpus_per_rank: 1 (got 0)"},
		{"sharing with two GPUs per rank", "ranks: 2\ngpus_per_rank: 2\nranks_per_gpu: 4\nexec: {command: [true]}", "set gpus_per_rank: 1 (got 2), or remove ranks_per_gpu"},
		{"negative sharing", "ranks: 2\ngpus_per_rank: 1\nranks_per_gpu: -1\nexec: {command: [true]}", "ranks_per_gpu: must be between 1 and 64, got -1"},
		{"too much sharing", "ranks: 2\ngpus_per_rank: 1\nranks_per_gpu: 65\nexec: {command: [true]}", "ranks_per_gpu: must be between 1 and 64, got 65"},
		{"sharing services", "type: service\nreplicas: 2\ngpus_per_rank: 1\nranks_per_gpu: 2\nexec: {command: [true]}\nservice: {ports: [http]}", "ranks_per_gpu: service replicas are placed one at a time"},
		{"sharing misspelt", "ranks: 2\ngpus_per_rank: 1\nrank_per_gpu: 2\nexec: {command: [true]}", `did you mean "ranks_per_gpu"`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Parse([]byte(tc.spec))
			if err == nil {
				t.Fatalf("accepted an invalid spec")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("error %v does not wrap ErrInvalid", err)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %q does not mention %q", err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "job spec") {
				t.Fatalf("error %q does not start with 'job spec'", err)
			}
		})
	}
}

func TestParseTooLarge(t *testing.T) {
	big := "ranks: 1\nexec: {command: [true]}\n# " + strings.Repeat("x", 10<<20) + "\n"
	_, err := Parse([]byte(big))
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("a 10 MB spec: got %v, want ErrTooLarge", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte("ranks: 2\nexec: {command: [echo, hi]}"))
	f.Add([]byte(`{"type":"allreduce","ranks":4,"allreduce":{"sizes":["1MiB"]}}`))
	f.Add([]byte("type: pipeline\nranks: 2\npipeline: {layers: [4, 8, 2]}"))
	f.Fuzz(func(t *testing.T, data []byte) {
		spec, err := Parse(data)
		if err != nil {
			if !errors.Is(err, ErrInvalid) && !errors.Is(err, ErrTooLarge) {
				t.Fatalf("unexpected error type: %v", err)
			}
			return
		}
		// Whatever Parse accepts must validate again after defaults (idempotent).
		ApplyDefaults(spec)
		if err := Validate(spec); err != nil {
			t.Fatalf("accepted spec fails validation: %v", err)
		}
	})
}

// Checkpoints belong to a job by its name, so a job that keeps them must
// name itself: two unnamed jobs would both be "exec" and the second would
// continue the first's checkpoints. The API path (ApplyDefaults, Validate,
// as SubmitJob does) refuses it as the file path does.
func TestCheckpointNeedsAName(t *testing.T) {
	spec := &pb.JobSpec{Ranks: 1, Exec: &pb.ExecSpec{Command: []string{"true"}},
		Checkpoint: &pb.CheckpointSpec{Uri: "file:///shared/ckpt"}}
	ApplyDefaults(spec)
	err := Validate(spec)
	if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), "needs a name") || !strings.Contains(err.Error(), "add name: NAME") {
		t.Fatalf("unnamed job with a checkpoint block: %v", err)
	}
	spec.Name = "train"
	if err := Validate(spec); err != nil {
		t.Fatalf("named: %v", err)
	}
	plain := &pb.JobSpec{Ranks: 1, Exec: &pb.ExecSpec{Command: []string{"true"}}}
	ApplyDefaults(plain)
	if err := Validate(plain); err != nil || plain.Name != TypeExec {
		t.Fatalf("unnamed job without checkpoints: name %q, %v; want the default %q", plain.Name, err, TypeExec)
	}
}

// examples/shared_gpu.yaml, the README's example of ranks sharing GPUs,
// is a valid spec that asks for it.
func TestExampleSharedGPU(t *testing.T) {
	b, err := os.ReadFile("../../examples/shared_gpu.yaml")
	if err != nil {
		t.Fatal(err)
	}
	spec, err := ParseFile("shared_gpu.yaml", b)
	if err != nil {
		t.Fatal(err)
	}
	if spec.GpusPerRank != 1 || spec.RanksPerGpu != 2 || spec.Ranks != 4 {
		t.Fatalf("spec %v", spec)
	}
}

// Every job file under examples/ is a valid spec, and so is
// examples/ddp/job.yaml with its commented checkpoint block turned on, as
// the README tells a user to do.
func TestExamplesParse(t *testing.T) {
	files, err := filepath.Glob("../../examples/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	more, _ := filepath.Glob("../../examples/*/*.yaml")
	files = append(files, more...)
	if len(files) < 5 {
		t.Fatalf("found only %v under examples/", files)
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := ParseFile(f, b); err != nil {
			t.Errorf("%s: %v", f, err)
		}
		if strings.HasSuffix(f, "ddp/job.yaml") {
			on := strings.Replace(string(b), "\n# checkpoint:", "\ncheckpoint:", 1)
			if on == string(b) {
				t.Fatalf("%s: no commented checkpoint block", f)
			}
			spec, err := ParseFile(f, []byte(on))
			if err != nil {
				t.Fatalf("%s with its checkpoint block: %v", f, err)
			}
			if spec.GetCheckpoint().GetUri() == "" {
				t.Fatalf("%s with its checkpoint block: no checkpoint URI in %v", f, spec)
			}
		}
	}
}
