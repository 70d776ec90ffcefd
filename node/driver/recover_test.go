//go:build linux

package driver

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// tickSpec is a long task that prints a line every 20 ms and ends on
// SIGTERM with the shell's default action.
func tickSpec(t *testing.T) TaskSpec {
	return shSpec(t, `i=0; while :; do echo "tick $i"; i=$((i+1)); sleep 0.02; done`)
}

// logSize is the current end offset of a stream.
func logSize(t *testing.T, h *Handle, stream string) int64 {
	t.Helper()
	r, err := h.Logs(context.Background(), stream, false, -1)
	if err != nil {
		return 0
	}
	defer r.Close()
	_, _ = io.Copy(io.Discard, r)
	return r.Offset()
}

// reapIfChild collects an adopted orphan's zombie, if it is ours.
func reapIfChild(pid int) {
	var ws unix.WaitStatus
	_, _ = unix.Wait4(pid, &ws, unix.WNOHANG, nil)
}

// startFakeDaemon runs a daemon process (this binary, fakeDaemon) that
// starts spec under dataDir, and kills it with SIGKILL once the task runs.
// It returns the task's and its supervisor's PIDs; whatever happens, the
// test leaves neither running.
func startFakeDaemon(t *testing.T, dataDir string, spec TaskSpec, env ...string) (taskPid, supPid int) {
	t.Helper()
	specJSON, _ := json.Marshal(spec)
	daemon := exec.Command(os.Args[0], "-test.run=^$")
	daemon.Env = append(append(os.Environ(), envFakeDaemon+"="+dataDir, envFakeDaemonSpec+"="+string(specJSON)), env...)
	out, err := daemon.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	daemon.Stderr = testWriter{t}
	if err := daemon.Start(); err != nil {
		t.Fatal(err)
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil || !strings.HasPrefix(line, "READY ") {
		_ = daemon.Process.Kill()
		_ = daemon.Wait()
		t.Fatalf("fake daemon said %q, %v", line, err)
	}
	f := strings.Fields(line)
	taskPid, _ = strconv.Atoi(f[1])
	supPid, _ = strconv.Atoi(f[2])
	t.Cleanup(func() {
		// Whatever happens, leave nothing running.
		if members := groupMembers(taskPid, supPid); len(members) > 0 {
			_ = unix.Kill(-taskPid, unix.SIGKILL)
		}
		if sameProcessAlive(supPid) {
			_ = unix.Kill(supPid, unix.SIGKILL)
		}
		reapIfChild(supPid)
	})
	if err := daemon.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = daemon.Wait()
	return taskPid, supPid
}

func TestRecoverAfterDaemonSIGKILL(t *testing.T) {
	dataDir := t.TempDir()
	spec := tickSpec(t)
	// A real daemon process starts the task and is killed with SIGKILL.
	taskPid, supPid := startFakeDaemon(t, dataDir, spec)

	// The task outlived its daemon, and its output still reaches the logs.
	if n := len(groupMembers(taskPid, supPid)); n == 0 {
		t.Fatal("the task died with its daemon")
	}

	// A new daemon finds it.
	d := newTestDriver(t, dataDir)
	hs, err := d.Recover(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if len(hs) != 1 {
		t.Fatalf("recovered %d tasks, want 1", len(hs))
	}
	h := hs[0]
	cleanupTask(t, h)
	if h.ID() != spec.ID || h.Pid() != taskPid || h.SupervisorPid() != supPid {
		t.Fatalf("recovered %v pid %d supervisor %d, want %v %d %d", h.ID(), h.Pid(), h.SupervisorPid(), spec.ID, taskPid, supPid)
	}
	if _, done := h.Result(); done {
		t.Fatal("a running task was recovered as finished")
	}
	size := logSize(t, h, Stdout)
	poll.Until(t, 10*time.Second, func() bool { return logSize(t, h, Stdout) > size+20 }, "logs to keep flowing after the daemon died")

	// Starting it again (as a reconciling daemon would) attaches; it does
	// not start a second copy.
	before := groupMembers(taskPid, supPid)
	h2, err := d.Start(context.Background(), spec)
	if err != nil || h2 != h {
		t.Fatalf("start after recover: %v, %v", h2, err)
	}
	if h2.Pid() != taskPid {
		t.Fatalf("task pid changed to %d", h2.Pid())
	}
	// Nor can a second supervisor be started by hand on the same allocation.
	if code := runSupervisorByHand(t, h.stateDir); code != supervisorDuplicate {
		t.Fatalf("second supervisor exited %d, want %d (duplicate)", code, supervisorDuplicate)
	}
	// The group is still the one shell (and at most one sleep of its loop).
	if after := groupMembers(taskPid, supPid); len(after) > 2 || !slices.Contains(after, taskPid) {
		t.Fatalf("group changed from %v to %v", before, after)
	}

	// Stop it through the new daemon; the exit status comes back although
	// the supervisor is not this process's child.
	res, err := h.Stop(context.Background(), StopOptions{Timeout: 10 * time.Second, Reason: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Stopped || res.Signal != int(syscall.SIGTERM) || res.Lost {
		t.Fatalf("result %+v, want stopped by SIGTERM", res)
	}
	assertGone(t, taskPid, supPid)
	poll.Until(t, 10*time.Second, func() bool { return !sameProcessAlive(supPid) }, "supervisor %d to be gone and reaped", supPid)

	// Recover again: now finished, with the same result.
	d2 := newTestDriver(t, dataDir)
	hs, err = d2.Recover(context.Background())
	if err != nil || len(hs) != 1 {
		t.Fatalf("second recover: %d, %v", len(hs), err)
	}
	if r, done := hs[0].Result(); !done || r.Signal != int(syscall.SIGTERM) || !r.Stopped {
		t.Fatalf("second recover: %+v done=%v", r, done)
	}
}

// sameProcessAlive reports whether pid exists at all (zombies included).
func sameProcessAlive(pid int) bool {
	_, err := os.Stat("/proc/" + strconv.Itoa(pid))
	return err == nil
}

func runSupervisorByHand(t *testing.T, stateDir string) int {
	t.Helper()
	cmd := exec.Command(os.Args[0], SupervisorCommand, "--dir", stateDir)
	cmd.Stderr = testWriter{t}
	err := cmd.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		t.Fatal(err)
	}
	return 0
}

func TestRecoverAfterShutdown(t *testing.T) {
	dataDir := t.TempDir()
	d1 := newTestDriver(t, dataDir)
	spec := tickSpec(t)
	h1, err := d1.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	// A second task ends while no daemon watches.
	quick := shSpec(t, `while [ ! -e go ]; do sleep 0.01; done; exit 5`)
	hq, err := d1.Start(context.Background(), quick)
	if err != nil {
		t.Fatal(err)
	}
	if err := d1.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := d1.Shutdown(); err != nil {
		t.Fatal("second Shutdown:", err)
	}
	if _, err := d1.Start(context.Background(), shSpec(t, "true")); !errors.Is(err, ErrShutdown) {
		t.Fatalf("start after shutdown: %v", err)
	}
	if err := os.WriteFile(filepath.Join(hq.AllocDir(), "go"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() bool { return exists(filepath.Join(hq.stateDir, exitFileName)) }, "the quick task to end")

	d2 := newTestDriver(t, dataDir)
	hs, err := d2.Recover(context.Background())
	if err != nil || len(hs) != 2 {
		t.Fatalf("recover: %d tasks, %v", len(hs), err)
	}
	byJob := map[string]*Handle{hs[0].ID().JobID: hs[0], hs[1].ID().JobID: hs[1]}
	h, q := byJob[spec.ID.JobID], byJob[quick.ID.JobID]
	cleanupTask(t, h)
	if r, done := q.Result(); !done || r.ExitCode != 5 {
		t.Fatalf("quick task: %+v done=%v, want exit 5", r, done)
	}
	if h.Pid() != h1.Pid() {
		t.Fatalf("pid %d, want %d", h.Pid(), h1.Pid())
	}
	// Recover twice returns the same handles.
	again, err := d2.Recover(context.Background())
	if err != nil || len(again) != 2 || (again[0] != h && again[1] != h) {
		t.Fatalf("second recover: %v, %v", again, err)
	}
	res, err := h.Stop(context.Background(), StopOptions{Force: true})
	if err != nil || res.Signal != int(syscall.SIGKILL) {
		t.Fatalf("stop: %+v, %v", res, err)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
	if err := d2.Remove(q.ID()); err != nil {
		t.Fatal(err)
	}
}

func TestSupervisorKilledTaskIsLost(t *testing.T) {
	d := newTestDriver(t, "")
	// A group of two: the shell and a sleep in the background.
	spec := shSpec(t, `sleep 600 & echo ready; wait`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	members := groupMembers(h.Pid(), h.SupervisorPid())
	if len(members) != 2 {
		t.Fatalf("group %v, want 2 members", members)
	}
	t.Cleanup(func() {
		for _, pid := range members {
			reapIfChild(pid) // adopted by this subreaper when their parents died
		}
	})
	if err := unix.Kill(h.SupervisorPid(), unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	res := wait(t, h)
	if !res.Lost || res.Success() || res.ExitCode != -1 {
		t.Fatalf("result %+v, want lost", res)
	}
	// The shell died of its parent-death signal; the driver killed the
	// rest of the group.
	assertGone(t, h.Pid(), h.SupervisorPid())
	// Logs are marked complete, so a follow ends.
	r, err := h.Logs(context.Background(), Stdout, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if b, err := io.ReadAll(r); err != nil || string(b) != "ready\n" {
		t.Fatalf("follow after loss: %q, %v", b, err)
	}
}

func TestKillAll(t *testing.T) {
	dataDir := t.TempDir()
	d := newTestDriver(t, dataDir)
	var hs []*Handle
	for range 3 {
		h, err := d.Start(context.Background(), shSpec(t, `trap '' TERM; sleep 600 & wait`))
		if err != nil {
			t.Fatal(err)
		}
		cleanupTask(t, h)
		hs = append(hs, h)
	}
	// A finished task is left alone.
	done, err := d.Start(context.Background(), shSpec(t, "exit 4"))
	if err != nil {
		t.Fatal(err)
	}
	wait(t, done)
	_ = d.Shutdown() // the daemon goes; the tasks stay
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if err := KillAll(ctx, dataDir); err != nil {
		t.Fatal(err)
	}
	for _, h := range hs {
		assertGone(t, h.Pid(), h.SupervisorPid())
		var res ExitResult
		if err := readJSON(filepath.Join(h.stateDir, exitFileName), &res); err != nil || res.Signal != int(syscall.SIGKILL) {
			t.Fatalf("task %s: %+v, %v", h.ID(), res, err)
		}
	}
	var res ExitResult
	if err := readJSON(filepath.Join(done.stateDir, exitFileName), &res); err != nil || res.ExitCode != 4 {
		t.Fatalf("finished task rewritten: %+v, %v", res, err)
	}
}

// A stop that began before the daemon went away still ends in SIGKILL on
// time: the supervisor, not the daemon, runs the kill timer.
func TestStopCompletesWithoutDaemon(t *testing.T) {
	dataDir := t.TempDir()
	d1 := newTestDriver(t, dataDir)
	spec := shSpec(t, `trap '' TERM; echo ready; while :; do sleep 0.01; done`)
	h, err := d1.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	if err := h.RequestStop(StopOptions{Timeout: 300 * time.Millisecond, Reason: "drain"}); err != nil {
		t.Fatal(err)
	}
	_ = d1.Shutdown()
	poll.Until(t, 20*time.Second, func() bool { return exists(filepath.Join(h.stateDir, exitFileName)) }, "the supervisor to finish the stop")
	d2 := newTestDriver(t, dataDir)
	hs, err := d2.Recover(context.Background())
	if err != nil || len(hs) != 1 {
		t.Fatalf("recover: %v, %v", hs, err)
	}
	res, done := hs[0].Result()
	if !done || !res.Killed || !res.Stopped || res.StopReason != "drain" || res.Signal != int(syscall.SIGKILL) {
		t.Fatalf("result %+v (done %v), want killed after the grace", res, done)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

// orphanTask starts a task that answers SIGTERM, leaves its supervisor
// without a daemon, and opens its log files, which the test can still read
// after its directory is deleted.
func orphanTask(t *testing.T, dataDir string) (h *Handle, stdout, stderr *os.File) {
	t.Helper()
	d := newTestDriver(t, dataDir)
	spec := shSpec(t, `trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.02; done`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	open := func(stream string) *os.File {
		f, err := os.Open(logFileName(h.spec.LogDir, stream, 0))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = f.Close() })
		return f
	}
	stdout, stderr = open(Stdout), open(Stderr)
	if err := d.Shutdown(); err != nil { // the daemon is gone for good
		t.Fatal(err)
	}
	return h, stdout, stderr
}

// waitOrphanGone waits until the task and its supervisor have exited, and
// returns the supervisor's exit code (it is this process's child).
func waitOrphanGone(t *testing.T, h *Handle) int {
	t.Helper()
	sup, task := h.SupervisorPid(), h.Pid()
	poll.Until(t, 20*time.Second, func() bool {
		return !sameProcess(sup, h.state.SupervisorStart) && !sameProcess(task, h.state.TaskStart)
	}, "supervisor %d and task %d to exit", sup, task)
	var ws unix.WaitStatus
	if _, err := unix.Wait4(sup, &ws, 0, nil); err != nil {
		t.Fatalf("reap supervisor: %v", err)
	}
	return ws.ExitStatus()
}

func readAllFile(t *testing.T, f *os.File) string {
	t.Helper()
	b, err := io.ReadAll(f)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// A task whose data directory is deleted while no daemon runs (a killed
// test run's temporary directory, a wiped node) can never be found or
// stopped again: its supervisor stops it the way a plain stop does, says
// why in the task's log, and exits.
func TestOrphanedSupervisorStopsTaskWhenDirDeleted(t *testing.T) {
	dataDir := t.TempDir()
	h, stdout, stderr := orphanTask(t, dataDir)
	if err := os.RemoveAll(dataDir); err != nil {
		t.Fatal(err)
	}
	if code := waitOrphanGone(t, h); code != supervisorOrphaned {
		t.Fatalf("supervisor exit code %d, want %d", code, supervisorOrphaned)
	}
	if out := readAllFile(t, stdout); !strings.Contains(out, "got TERM") {
		t.Fatalf("task's stdout %q: want it stopped with SIGTERM", out)
	}
	if e := readAllFile(t, stderr); !strings.Contains(e, "stopping the task") || !strings.Contains(e, "is gone") {
		t.Fatalf("task's stderr %q: want the supervisor's reason", e)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

// A data directory deleted and made again (a new node in the same place)
// is not the orphan's: it stops its task and writes nothing there.
func TestOrphanedSupervisorLeavesReplacedDirAlone(t *testing.T) {
	dataDir := t.TempDir()
	h, stdout, _ := orphanTask(t, dataDir)
	if err := os.RemoveAll(dataDir); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(h.spec.LogDir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(h.stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(h.stateDir, lockFileName), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if code := waitOrphanGone(t, h); code != supervisorOrphaned {
		t.Fatalf("supervisor exit code %d, want %d", code, supervisorOrphaned)
	}
	if out := readAllFile(t, stdout); !strings.Contains(out, "got TERM") {
		t.Fatalf("task's stdout %q: want it stopped with SIGTERM", out)
	}
	for _, p := range []string{
		filepath.Join(h.stateDir, exitFileName),
		DeadlineFile(h.allocDir),
		closedMarker(h.spec.LogDir, Stdout),
		closedMarker(h.spec.LogDir, Stderr),
	} {
		if exists(p) {
			t.Errorf("%s written into the new directory", p)
		}
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

// A daemon whose tasks do not outlive it (StopWithDaemon: a dev cluster, a
// test) is killed with SIGKILL, its data dir left in place: the supervisor
// stops the task as a plain stop does and records why.
func TestStopWithDaemonStopsTaskWhenDaemonKilled(t *testing.T) {
	dataDir := t.TempDir()
	spec := shSpec(t, `trap 'echo got TERM; exit 7' TERM; echo ready; while :; do sleep 0.02; done`)
	taskPid, supPid := startFakeDaemon(t, dataDir, spec, envFakeDaemonStopWith+"=1")
	stateDir := stateDirOf(AllocDir(dataDir, spec.ID))
	poll.Until(t, 20*time.Second, func() bool { return exists(filepath.Join(stateDir, exitFileName)) }, "the supervisor to stop the task and record it")
	assertGone(t, taskPid, supPid)
	var res ExitResult
	if err := readJSON(filepath.Join(stateDir, exitFileName), &res); err != nil {
		t.Fatal(err)
	}
	if !res.Stopped || res.ExitCode != 7 || !strings.Contains(res.StopReason, "has exited") {
		t.Fatalf("result %+v: want stopped with SIGTERM (exit 7) because the daemon exited", res)
	}
	b, err := os.ReadFile(logFileName(filepath.Join(AllocDir(dataDir, spec.ID), LogDirName), Stderr, 0))
	if err != nil || !strings.Contains(string(b), "its tasks do not outlive it") {
		t.Fatalf("task's stderr %q, %v: want the supervisor's reason", b, err)
	}
}
