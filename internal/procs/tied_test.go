package procs

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// tiedHelperEnv makes the test binary act as the helper of
// TestTiedChildDiesWithParent instead of running tests.
const tiedHelperEnv = "GPUMESH_PROCS_TIED_HELPER"

func init() {
	if os.Getenv(tiedHelperEnv) == "1" {
		// Keep main on the main thread (init runs there), which Go never
		// ends, so that tiedHelper's starting goroutine runs on another
		// thread, which ends with it.
		runtime.LockOSThread()
	}
}

func TestMain(m *testing.M) {
	if os.Getenv(tiedHelperEnv) == "1" {
		os.Exit(tiedHelper())
	}
	os.Exit(m.Run())
}

// A process started with startTied dies when the process that started it is
// killed with SIGKILL, and lives while it runs, even after the thread that
// called startTied has ended (Linux sends the parent-death signal when the
// forking thread exits).
func TestTiedChildDiesWithParent(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("parent-death signals are Linux only")
	}
	helper := exec.Command(os.Args[0], "-test.run=^$")
	helper.Env = append(os.Environ(), tiedHelperEnv+"=1")
	helper.Stderr = os.Stderr
	stdin, err := helper.StdinPipe() // the helper blocks on it until killed
	if err != nil {
		t.Fatal(err)
	}
	defer stdin.Close()
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = helper.Process.Kill(); _ = helper.Wait() }()
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v (it prints PID n once its child lived through the end of the starting thread)", err)
	}
	pid, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(line), "PID "))
	if err != nil {
		t.Fatalf("helper said %q: %v", line, err)
	}
	if err := helper.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = helper.Wait()
	t.Cleanup(func() {
		if alive(pid) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	poll.Until(t, 20*time.Second, func() bool { return !alive(pid) },
		"the child (pid %d) of a helper killed with SIGKILL is still running", pid)
}

// alive reports whether pid runs (a zombie does not).
func alive(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	// state is the field after the parenthesised command name
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && i+2 < len(s) {
		return s[i+2] != 'Z' && s[i+2] != 'X'
	}
	return true
}

// tiedHelper starts a shell with startTied from a goroutine locked to its
// thread that then ends (so the thread exits), checks that the shell still
// answers, prints "PID n" and waits to be killed.
func tiedHelper() int {
	fail := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "tied helper: "+format+"\n", a...)
		return 1
	}
	// the shell echoes one line, then sleeps (keeping its pid)
	cmd := exec.Command("sh", "-c", `read l; echo "$l"; exec sleep 600`)
	in, err := cmd.StdinPipe()
	if err != nil {
		return fail("%v", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return fail("%v", err)
	}
	type res struct {
		tid int
		err error
	}
	started := make(chan res, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with this goroutine
		_, err := startTied(cmd)
		started <- res{syscall.Gettid(), err}
	}()
	r := <-started
	if r.err != nil {
		return fail("start: %v", r.err)
	}
	task := fmt.Sprintf("/proc/self/task/%d", r.tid)
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, err := os.Stat(task); errors.Is(err, os.ErrNotExist) {
			break
		}
		if time.Now().After(deadline) {
			return fail("the starting thread %d did not exit", r.tid)
		}
		time.Sleep(time.Millisecond)
	}
	// A parent-death signal would have been queued before the thread left
	// /proc: a shell killed by it never echoes.
	if _, err := io.WriteString(in, "ping\n"); err != nil {
		return fail("the child died with the thread that started it (write: %v)", err)
	}
	echo, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || echo != "ping\n" {
		return fail("the child died with the thread that started it (read %q, %v)", echo, err)
	}
	fmt.Printf("PID %d\n", cmd.Process.Pid)
	_, _ = io.Copy(io.Discard, os.Stdin) // until killed
	return 0
}
