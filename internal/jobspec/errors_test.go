package jobspec

import (
	"errors"
	"strings"
	"testing"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// want is one expected problem: where it is and what it says.
type want struct {
	line, col int
	field     string
	msg       string // a substring of Msg
}

func TestParseFileErrorsPointIntoTheFile(t *testing.T) {
	cases := []struct {
		name string
		spec string
		want []want
	}{
		{"misspelt field, with a suggestion", "name: x\nranks: 1\nexec:\n  comand: [\"true\"]\n",
			[]want{{4, 3, "exec.comand", `unknown field "comand"; did you mean "command"?`}}},
		{"rank for ranks, JSON on one line", `{"name": "x", "rank": 2, "exec": {"command": ["true"]}}`,
			[]want{{1, 15, "rank", `did you mean "ranks"?`}}},
		{"field at the wrong level", "ranks: 1\ncommand: [\"true\"]\n",
			[]want{{2, 1, "command", "belongs in the exec section"}}},
		{"misspelt and at the wrong level", "ranks: 1\ncomand: [\"true\"]\n",
			[]want{{2, 1, "comand", `did you mean "command" in the exec section (exec: {command: ...})?`}}},
		{"far from any field, lists the fields", "ranks: 1\nexec:\n  command: [x]\n  shell: bash\n",
			[]want{{4, 3, "exec.shell", "exec holds command, env"}}},
		{"words for a number", "ranks: two\nexec: {command: [x]}\n",
			[]want{{1, 8, "ranks", `want a whole number, got "two"`}}},
		{"a list for a value", "ranks: [1, 2]\nexec: {command: [x]}\n",
			[]want{{1, 8, "ranks", "want a single value, got a list"}}},
		{"a value for a list", "ranks: 1\nexec: {command: python3}\n",
			[]want{{2, 17, "exec.command", "want a list"}}},
		{"a value for a section", "ranks: 1\nexec: python3\n",
			[]want{{2, 7, "exec", "want a mapping of fields (command, env, user)"}}},
		{"duration without a unit", "ranks: 1\nexec: {command: [x]}\nkill_timeout: 5\n",
			[]want{{3, 15, "kill_timeout", `durations need a unit: write "5s"`}}},
		{"not a duration", "ranks: 1\nexec: {command: [x]}\nrestart: {delay: soon}\n",
			[]want{{3, 18, "restart.delay", `"soon" is not a duration`}}},
		{"field given twice", "ranks: 1\nranks: 2\nexec: {command: [x]}\n",
			[]want{{2, 1, "ranks", "given twice (first on line 1)"}}},
		{"int32 out of range", "ranks: 99999999999\nexec: {command: [x]}\n",
			[]want{{1, 8, "ranks", "out of range"}}},
		{"validation error placed at its value", "name: x\nranks: 0\nexec: {command: [x]}\n",
			[]want{{2, 8, "ranks", "must be >= 1, got 0"}}},
		{"validation error in a list element", "type: allreduce\nranks: 2\nallreduce:\n  sizes: [1MiB, lots]\n",
			[]want{{4, 17, "allreduce.sizes[1]", `invalid size: "lots"`}}},
		{"validation error of a missing field placed at its section", "ranks: 1\nexec:\n  env: {A: b}\n",
			[]want{{3, 3, "exec.command", "needs a command"}}},
		{"every problem at once, in file order", "name: x\nrank: 2\ntype: allreduce\nallreduce:\n  dtype: complex64\n  itres: 3\n  op: mean\n",
			[]want{
				{2, 1, "rank", `did you mean "ranks"?`},
				{6, 3, "allreduce.itres", `did you mean "iters"?`},
			}},
		{"every validation problem at once", "type: allreduce\nranks: 0\nallreduce:\n  dtype: complex64\n  op: mean\n",
			[]want{
				{2, 8, "ranks", "must be >= 1"},
				{4, 10, "allreduce.dtype", `unknown dtype "complex64"`},
				{5, 7, "allreduce.op", `unknown op "mean"`},
			}},
		{"YAML syntax error keeps its line", "ranks: 1\nexec:\n  command: [x\n",
			[]want{{3, 0, "", "not valid YAML or JSON: did not find expected ',' or ']'"}}},
		{"YAML block error keeps its line", "ranks: 1\nexec:\n  command: [x]\n env: {}\n",
			[]want{{4, 0, "", "not valid YAML or JSON: did not find expected key"}}},
		{"tab indentation", "ranks: 1\nexec:\n\tcommand: [x]\n",
			[]want{{3, 0, "", "tab character"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseFile("job.yaml", []byte(tc.spec))
			if err == nil {
				t.Fatal("accepted an invalid spec")
			}
			if !errors.Is(err, ErrInvalid) {
				t.Fatalf("%v does not wrap ErrInvalid", err)
			}
			var list Errors
			if !errors.As(err, &list) {
				t.Fatalf("%T is not Errors: %v", err, err)
			}
			if len(list) != len(tc.want) {
				t.Fatalf("got %d problems, want %d:\n%v", len(list), len(tc.want), err)
			}
			for i, w := range tc.want {
				e := list[i]
				if e.File != "job.yaml" || e.Line != w.line || e.Column != w.col || e.Field != w.field || !strings.Contains(e.Msg, w.msg) {
					t.Errorf("problem %d = %s:%d:%d %q %q\nwant       job.yaml:%d:%d %q containing %q", i, e.File, e.Line, e.Column, e.Field, e.Msg, w.line, w.col, w.field, w.msg)
				}
			}
			if strings.Contains(err.Error(), "proto:") || strings.Contains(err.Error(), "(line 1:") {
				t.Errorf("message leaks the internal conversion: %v", err)
			}
		})
	}
}

func TestErrorsRead(t *testing.T) {
	_, err := ParseFile("train.yaml", []byte("name: x\nranks: 1\nexec:\n  comand: [x]\n"))
	if got, want := err.Error(), `job spec train.yaml:4:3: exec.comand: unknown field "comand"; did you mean "command"?`; got != want {
		t.Errorf("one problem reads\n%s\nwant\n%s", got, want)
	}
	_, err = ParseFile("train.yaml", []byte("rank: 1\nexec:\n  comand: [x]\n"))
	want := "job spec train.yaml: 2 problems:\n  1:1: rank: unknown field \"rank\"; did you mean \"ranks\"?\n  3:3: exec.comand: unknown field \"comand\"; did you mean \"command\"?"
	if err.Error() != want {
		t.Errorf("two problems read\n%s\nwant\n%s", err, want)
	}
	// Validate alone (the server's check) has no file to point into.
	err = Validate(spec0)
	if err == nil || !strings.HasPrefix(err.Error(), "job spec: ") {
		t.Errorf("Validate error without a place: %v", err)
	}
}

// spec0 is an empty spec with defaults, invalid for want of ranks and a command.
var spec0 = func() *pb.JobSpec { s := &pb.JobSpec{}; ApplyDefaults(s); return s }()

func TestParseFileAcceptsWhatPeopleWrite(t *testing.T) {
	spec, err := ParseFile("x.yaml", []byte("name: 7\nranks: \"2\"\nexec:\n  command: [python3, train.py, --epochs, 3, --fast, true]\n  env: {SEED: 1, 2: x}\nkill_timeout: 2m\nrestart: {delay: 1m30s}\n"))
	if err != nil {
		t.Fatal(err)
	}
	if spec.Name != "7" || spec.Ranks != 2 {
		t.Errorf("name %q ranks %d", spec.Name, spec.Ranks)
	}
	if got := strings.Join(spec.Exec.Command, " "); got != "python3 train.py --epochs 3 --fast true" {
		t.Errorf("command %q", got)
	}
	if spec.Exec.Env["SEED"] != "1" || spec.Exec.Env["2"] != "x" {
		t.Errorf("env %v", spec.Exec.Env)
	}
	if spec.KillTimeout.AsDuration().String() != "2m0s" || spec.Restart.Delay.AsDuration().String() != "1m30s" {
		t.Errorf("durations %v %v", spec.KillTimeout.AsDuration(), spec.Restart.Delay.AsDuration())
	}
	// JSON field names in camelCase are accepted, as protojson does.
	if _, err := ParseFile("x.json", []byte(`{"ranks": 2, "gpusPerRank": 0, "exec": {"command": ["true"]}}`)); err != nil {
		t.Errorf("camelCase JSON names: %v", err)
	}
	// Anchors and aliases resolve.
	if _, err := ParseFile("x.yaml", []byte("x-cmd: &cmd [\"true\"]\nranks: 1\nexec: {command: *cmd}\n")); err == nil {
		t.Errorf("an unknown top-level key with an anchor was accepted")
	}
}
