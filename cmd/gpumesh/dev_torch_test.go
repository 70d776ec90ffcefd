package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node"
)

// prepareDevDemo readies runDevDemo: from the repository root (where the
// README runs the demo), exec tasks supervised by a built gpumesh, TMPDIR
// in a folder of the test's, which it returns.
func prepareDevDemo(t *testing.T) (tmp string) {
	t.Helper()
	if testing.Short() {
		t.Skip("starts a dev cluster; skipped with -short")
	}
	bin := procs.Binary(t)
	old := node.SupervisorPath
	node.SupervisorPath = bin
	t.Cleanup(func() { node.SupervisorPath = old })
	tmp = t.TempDir()
	t.Setenv("TMPDIR", tmp)
	t.Chdir("../..")
	return tmp
}

// runDevDemo runs `gpumesh dev --demo` in this process (after
// prepareDevDemo); ctx ends the command as Ctrl-C does.
func runDevDemo(ctx context.Context, t *testing.T, args ...string) (string, error) {
	root := newRootCommand()
	var out bytes.Buffer
	root.SetOut(&out)
	root.SetErr(&out)
	root.SetArgs(append([]string{"dev", "--demo"}, args...))
	err := root.ExecuteContext(ctx)
	t.Logf("gpumesh dev --demo: %v\n%s", err, out.String())
	return out.String(), err
}

// fakePython writes an executable that answers the demo's torch probe as
// a Python with PyTorch would, and runs body (sh) as the ranks' script.
func fakePython(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "python3")
	script := "#!/bin/sh\nif [ \"$1\" = -c ]; then echo 0.0-fake; exit 0; fi\n" + body + "\n"
	if err := os.WriteFile(p, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// The README's first command with PyTorch present: after the all-reduce,
// train.py runs as a 3-rank exec job on backend gpumesh, and the demo
// prints each step's loss, checks the ranks' parameters and shows the
// agents' collectives. GPUMESH_PYTHON is unset, so the demo finds the
// interpreter itself (here the first python3 on PATH may lack torch).
func TestDevDemoRunsDDPWithPyTorch(t *testing.T) {
	if out, err := exec.Command("/usr/bin/python3", "-c", "import torch").CombinedOutput(); err != nil {
		if py, lerr := exec.LookPath("python3"); lerr != nil || exec.Command(py, "-c", "import torch").Run() != nil {
			t.Skipf("no Python with PyTorch (install Debian's python3-torch): /usr/bin/python3: %v: %s", err, strings.TrimSpace(string(out)))
		}
	}
	t.Setenv(envDemoPython, "")
	prepareDevDemo(t)
	out, err := runDevDemo(context.Background(), t)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	for _, want := range []string{
		"==> all 3 ranks checked the reduced values exactly: OK",
		"==> DDP on the data plane: examples/ddp/train.py trains a small MLP for 8 steps as a 3-rank exec job, backend gpumesh",
		"==> all 3 ranks ended with identical parameters (5508 values, compared exactly): OK",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("output lacks %q", want)
		}
	}
	losses := regexp.MustCompile(`(?m)^    loss by step \(rank 0\):((?: \d+\.\d{4}){8})$`).FindStringSubmatch(out)
	if losses == nil {
		t.Errorf("no line with 8 losses")
	}
	coll := regexp.MustCompile(`(?m)^    the agents ran the ranks' collectives: .*\b(\d+) all_reduce\b.*\(([\d.]+)([KMG]i)?B of the ranks' tensors\)$`).FindStringSubmatch(out)
	if coll == nil {
		t.Fatalf("no line with the agents' all_reduce count and bytes")
	}
	// Every rank all-reduces its gradients at least once a step.
	if n, _ := strconv.Atoi(coll[1]); n < 3*demoDDPSteps {
		t.Errorf("%d all_reduce operations, want >= %d", n, 3*demoDDPSteps)
	}
	if !regexp.MustCompile(`(?m)^==> DDP job demo-ddp-\w+ complete in [\dm.]+s( in generation \d+ .*)?$`).MatchString(out) {
		t.Errorf("no line with the DDP job's wall time")
	}
}

// GPUMESH_PYTHON naming an interpreter without torch: the demo says it
// skips the DDP part and why, and still exits 0.
func TestDevDemoSkipsDDPWithoutTorch(t *testing.T) {
	// A real interpreter without torch: python3 without its site packages;
	// on a machine with no Python at all, a script that fails as it would.
	noTorch := filepath.Join(t.TempDir(), "python-without-torch")
	body := "echo \"ModuleNotFoundError: No module named 'torch'\" >&2; exit 1"
	for _, py := range []string{"python3", "/usr/bin/python3"} {
		if p, err := exec.LookPath(py); err == nil {
			body = fmt.Sprintf("exec %q -I -S \"$@\"", p)
			break
		}
	}
	if err := os.WriteFile(noTorch, []byte("#!/bin/sh\n"+body+"\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv(envDemoPython, noTorch)
	prepareDevDemo(t)
	out, err := runDevDemo(context.Background(), t)
	if err != nil {
		t.Fatalf("demo failed: %v", err)
	}
	want := "==> " + envDemoPython + "=" + noTorch + " cannot import torch ("
	if !strings.Contains(out, want) || !strings.Contains(out, "No module named 'torch'") || !strings.Contains(out, "): skipping the DDP part\n") {
		t.Fatalf("output lacks the skip line %q...", want)
	}
	if !strings.Contains(out, "==> all 3 ranks checked the reduced values exactly: OK") || strings.Contains(out, "DDP on the data plane") {
		t.Fatal("the all-reduce part did not run, or the DDP part did")
	}
}

// A DDP job that fails is not hidden: the demo prints where the ranks'
// output is kept and exits non-zero.
func TestDevDemoReportsAFailedDDPJob(t *testing.T) {
	t.Setenv(envDemoPython, fakePython(t, `echo "rank $RANK says boom" >&2; exit 3`))
	prepareDevDemo(t)
	out, err := runDevDemo(context.Background(), t)
	if !errors.Is(err, errDemoDDPFailed) || exitStatus(err, &bytes.Buffer{}) == exitOK {
		t.Fatalf("demo returned %v, want %v", err, errDemoDDPFailed)
	}
	if !regexp.MustCompile(`(?m)^    rank \d \(gen 2\) failed on node-\d \(exit 3\)$`).MatchString(out) {
		t.Error("the ranks' states are not shown")
	}
	m := regexp.MustCompile(`(?m)^==> the ranks' output and errors: (\S+)$`).FindStringSubmatch(out)
	if m == nil {
		t.Fatal("no line naming the ranks' logs")
	}
	logs, rerr := os.ReadFile(m[1])
	if rerr != nil || !strings.Contains(string(logs), "rank 2 says boom") {
		t.Fatalf("the ranks' logs %s: %v\n%s", m[1], rerr, logs)
	}
}

// Ctrl-C (SIGINT) while the DDP job runs: the demo stops the job and its
// rank processes are gone when it returns, even with a --data-dir that
// stays (a removed data dir would stop them too, seconds later); nothing
// is left in the temporary folder but the agents' log.
func TestDevDemoInterruptedCleansUp(t *testing.T) {
	pids := t.TempDir()
	t.Setenv(envDemoPython, fakePython(t, fmt.Sprintf(`echo $$ > %q/$RANK.tmp && mv %q/$RANK.tmp %q/$RANK; exec sleep 600`, pids, pids, pids)))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	tmp := prepareDevDemo(t)
	dataDir := t.TempDir()
	var err error
	finished := make(chan struct{})
	go func() {
		defer close(finished)
		_, err = runDevDemo(ctx, t, "--data-dir", dataDir)
	}()
	// However the test ends, the demo has ended before it.
	t.Cleanup(func() { cancel(); <-finished })
	var ranks []int
	poll.Until(t, 3*time.Minute, func() error {
		ranks = ranks[:0]
		for r := range 3 {
			b, err := os.ReadFile(filepath.Join(pids, strconv.Itoa(r)))
			if err != nil {
				return err
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil {
				return err
			}
			ranks = append(ranks, pid)
		}
		return nil
	})
	// Ctrl-C: SIGINT to this process, which the demo catches while it runs.
	if err := syscall.Kill(os.Getpid(), syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	select {
	case <-finished:
	case <-time.After(2 * time.Minute):
		t.Fatal("the demo did not end within 2m of its interruption")
	}
	if !errors.Is(err, errDemoInterrupted) {
		t.Fatalf("demo returned %v, want %v", err, errDemoInterrupted)
	}
	for _, pid := range ranks {
		if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
			t.Errorf("rank process %d still exists (%v)", pid, err)
		}
	}
	left, _ := filepath.Glob(filepath.Join(tmp, "gpumesh-dev-*"))
	for _, p := range left {
		if fi, err := os.Stat(p); err == nil && fi.IsDir() {
			t.Errorf("the demo left %s behind", p)
		}
	}
}
