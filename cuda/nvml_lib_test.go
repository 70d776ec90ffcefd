//go:build cgo

package cuda

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The real go-nvml binding against libraries that lack functions: a call of a
// missing NVML function kills the process with "symbol lookup error", so each
// case runs in a child process (the test binary itself) and the parent checks
// that it exited cleanly with the expected answer. These fail if Discover or
// Sample ever calls a function the library does not export.
func TestNVMLLibraryWithMissingSymbols(t *testing.T) {
	if _, err := exec.LookPath("gcc"); err != nil {
		t.Skip("gcc is needed to build the stand-in NVML libraries")
	}
	if _, err := os.Stat("testdata/fakenvml.c"); err != nil {
		t.Skip("testdata/fakenvml.c not here (test binary run elsewhere): the stand-in libraries cannot be built")
	}
	dir := t.TempDir()
	build := func(name string, defs ...string) string {
		out := filepath.Join(dir, name+".so")
		args := []string{"-shared", "-fPIC", "-o", out, "testdata/fakenvml.c"}
		for _, d := range defs {
			args = append(args, "-D"+d)
		}
		if b, err := exec.Command("gcc", args...).CombinedOutput(); err != nil {
			t.Fatalf("gcc %v: %v\n%s", args, err, b)
		}
		return out
	}
	cases := []struct {
		name       string
		lib        string
		gpus       int
		driver     string
		missing    string // Sample's first missing reading
		unavailble string // part of Unavailable()
	}{
		{name: "no library", lib: filepath.Join(dir, "absent.so"), unavailble: "cannot load"},
		{name: "no functions", lib: build("empty"), unavailble: "lacks nvmlInit_v2"},
		{name: "no UUID", lib: build("nouuid", "HAVE_INIT", "NGPUS=1"), unavailble: "lacks nvmlDeviceGetUUID"},
		{name: "no GPUs, no driver version", lib: build("nogpu", "HAVE_INIT", "HAVE_UUID", "NGPUS=0")},
		{name: "one GPU, no driver version", lib: build("nodriver", "HAVE_INIT", "HAVE_UUID", "NGPUS=1"), gpus: 1, missing: "utilization"},
		{name: "one GPU", lib: build("full", "HAVE_INIT", "HAVE_UUID", "HAVE_DRIVER", "NGPUS=1"), gpus: 1, driver: "999.1", missing: "utilization"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cmd := exec.Command(os.Args[0], "-test.run=^TestNVMLChild$", "-test.v")
			cmd.Env = append(os.Environ(), "GPUMESH_NVML_CHILD="+tc.lib)
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("child with %s died: %v\n%s", tc.lib, err, out)
			}
			var got nvmlChildResult
			line := ""
			for _, l := range strings.Split(string(out), "\n") {
				if strings.HasPrefix(l, "RESULT ") {
					line = strings.TrimPrefix(l, "RESULT ")
				}
			}
			if err := json.Unmarshal([]byte(line), &got); err != nil {
				t.Fatalf("child output: %v\n%s", err, out)
			}
			if got.Err != "" || len(got.GPUs) != tc.gpus || len(got.Samples) != tc.gpus {
				t.Fatalf("got %+v, want %d GPUs and no error", got, tc.gpus)
			}
			if tc.gpus > 0 {
				g := got.GPUs[0]
				if g.UUID != "GPU-fake-0" || g.Model != "Fake GPU" || g.DriverVersion != tc.driver {
					t.Errorf("GPU %+v, want GPU-fake-0, Fake GPU, driver %q", g, tc.driver)
				}
				if s := got.Samples[0]; len(s.Missing) == 0 || s.Missing[0] != tc.missing || s.UUID != "GPU-fake-0" {
					t.Errorf("sample %+v, want first missing %q", s, tc.missing)
				}
			}
			if !strings.Contains(got.Unavailable, tc.unavailble) || (tc.unavailble == "") != (got.Unavailable == "") {
				t.Errorf("Unavailable() = %q, want it to say %q", got.Unavailable, tc.unavailble)
			}
		})
	}
}

type nvmlChildResult struct {
	GPUs        []GPUInfo
	Samples     []GPUMetrics
	Unavailable string
	Err         string
}

// TestNVMLChild is the child of TestNVMLLibraryWithMissingSymbols.
func TestNVMLChild(t *testing.T) {
	lib := os.Getenv("GPUMESH_NVML_CHILD")
	if lib == "" {
		t.Skip("run by TestNVMLLibraryWithMissingSymbols")
	}
	n := newSystemNVML(lib)
	var res nvmlChildResult
	var err error
	if res.GPUs, err = n.Discover(); err == nil {
		res.Samples, err = n.Sample()
	}
	if err != nil {
		res.Err = err.Error()
	}
	res.Unavailable = n.Unavailable()
	b, _ := json.Marshal(res)
	fmt.Printf("RESULT %s\n", b)
	_ = n.Close()
}
