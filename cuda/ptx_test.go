package cuda

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// The committed PTX must be what `go generate` makes from kernels.cu, and
// must contain every kernel the runtime loads. Skips the rebuild where nvcc
// is not installed.
func TestPTXMatchesSourceAndHasEveryKernel(t *testing.T) {
	ptx := []byte(kernelsPTX)
	if !bytes.Contains(ptx, []byte(".target sm_75")) {
		t.Error("PTX does not target sm_75 (compute_75), so it would not JIT on T4")
	}
	for _, dt := range AllDTypes() {
		for _, k := range []string{"reduce_sum_", "reduce_prod_", "reduce_max_", "reduce_min_", "div_", "fill_", "count_mismatch_"} {
			if !bytes.Contains(ptx, []byte(".entry "+k+dt.String()+"(")) {
				t.Errorf("kernel %s%s missing from kernels.ptx", k, dt)
			}
		}
	}
	if !bytes.Contains(ptx, []byte(".entry spin_ns(")) {
		t.Error("kernel spin_ns missing from kernels.ptx")
	}
	if _, err := os.Stat("kernels/kernels.cu"); err != nil {
		t.Skip("kernels.cu not here (test binary run elsewhere): not rebuilding the PTX")
	}
	nvcc, err := exec.LookPath("nvcc")
	if err != nil {
		t.Skip("nvcc not installed: not rebuilding the PTX")
	}
	// another nvcc release writes different (equally valid) PTX
	ver, _ := exec.Command(nvcc, "--version").Output()
	if rel := releaseLine(ptx); rel == "" || !bytes.Contains(ver, []byte(rel)) {
		t.Skipf("nvcc is not the release that made kernels.ptx (%q): not comparing", rel)
	}
	out := filepath.Join(t.TempDir(), "k.ptx")
	cmd := exec.Command(nvcc, "-ptx", "-arch=compute_75", "-O3", "-o", out, "kernels/kernels.cu")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("nvcc: %v\n%s", err, b)
	}
	fresh, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	// nvcc stamps its version in comments; compare the code only
	if strip(fresh) != strip(ptx) {
		t.Fatal("kernels/kernels.ptx is stale: run go generate ./cuda/ and commit it")
	}
}

func strip(b []byte) string {
	var out []string
	for _, l := range strings.Split(string(b), "\n") {
		if !strings.HasPrefix(strings.TrimSpace(l), "//") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// releaseLine returns "release X.Y" from the PTX header comment.
func releaseLine(ptx []byte) string {
	for _, l := range strings.Split(string(ptx), "\n") {
		if i := strings.Index(l, "release "); i >= 0 && strings.HasPrefix(strings.TrimSpace(l), "//") {
			r := l[i:]
			if j := strings.Index(r, ","); j > 0 {
				r = r[:j]
			}
			return r
		}
	}
	return ""
}
