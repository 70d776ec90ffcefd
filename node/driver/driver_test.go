//go:build linux

package driver

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// Test helper modes of this test binary, chosen by environment.
const (
	// envFakeDaemon makes the binary a daemon that starts the task given as
	// JSON in envFakeDaemonSpec under the data dir given here, prints
	// "READY", and blocks until it is killed.
	envFakeDaemon     = "GPUMESH_DRIVER_TEST_DAEMON_DATA_DIR"
	envFakeDaemonSpec = "GPUMESH_DRIVER_TEST_DAEMON_SPEC"
	// envFakeDaemonStopWith=1 sets Config.StopWithDaemon in the fake daemon.
	envFakeDaemonStopWith = "GPUMESH_DRIVER_TEST_DAEMON_STOP_WITH"
)

func TestMain(m *testing.M) {
	// The driver starts supervisors as "<this binary> task-supervise ...".
	if len(os.Args) > 1 && os.Args[1] == SupervisorCommand {
		os.Exit(SupervisorMain(os.Args[2:]))
	}
	if dir := os.Getenv(envFakeDaemon); dir != "" {
		os.Exit(fakeDaemon(dir, os.Getenv(envFakeDaemonSpec)))
	}
	// Orphaned supervisors and tasks (a killed fake daemon's, a killed
	// supervisor's) are adopted by this process, so tests can check that
	// they are gone and reap them, instead of leaving them to init.
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		fmt.Fprintln(os.Stderr, "cannot become a child subreaper:", err)
		os.Exit(1)
	}
	logPollInterval = 5 * time.Millisecond
	// Supervisors are this binary; under -race each would otherwise sleep
	// 1 s at exit.
	if os.Getenv("GORACE") == "" {
		os.Setenv("GORACE", "atexit_sleep_ms=0")
	}
	os.Exit(m.Run())
}

func fakeDaemon(dataDir, specJSON string) int {
	var spec TaskSpec
	if err := json.Unmarshal([]byte(specJSON), &spec); err != nil {
		fmt.Println("bad spec:", err)
		return 1
	}
	d, err := New(Config{DataDir: dataDir, DirCheckInterval: 20 * time.Millisecond, StopWithDaemon: os.Getenv(envFakeDaemonStopWith) == "1"})
	if err != nil {
		fmt.Println("new:", err)
		return 1
	}
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		fmt.Println("start:", err)
		return 1
	}
	fmt.Printf("READY %d %d\n", h.Pid(), h.SupervisorPid())
	select {} // until SIGKILL
}

func newTestDriver(t *testing.T, dataDir string) *Driver {
	t.Helper()
	if dataDir == "" {
		dataDir = t.TempDir()
	}
	d, err := New(Config{
		DataDir:      dataDir,
		PollInterval: 20 * time.Millisecond,
		// Supervisors check their directory often, so that every test of
		// a daemon restart also shows the check leaves a live task alone.
		DirCheckInterval: 20 * time.Millisecond,
		Logger:           hclog.New(&hclog.LoggerOptions{Output: testWriter{t}, Level: hclog.Debug}),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = d.Shutdown() })
	return d
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

var testID = 0

func shSpec(t *testing.T, script string) TaskSpec {
	t.Helper()
	testID++
	return TaskSpec{
		ID:      TaskID{JobID: "job-" + strconv.Itoa(testID), Generation: 1, Rank: 0},
		Command: []string{"sh", "-c", script},
		Env:     []string{"PATH=/usr/bin:/bin", "GREETING=hello"},
		Logs:    LogConfig{MaxFileBytes: 1 << 20, MaxFiles: 3},
	}
}

// cleanupTask makes sure the task's processes are gone when the test ends,
// whatever happened, and shows the supervisor's log on failure.
func cleanupTask(t *testing.T, h *Handle) {
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(h.stateDir, supLogFileName))
			t.Logf("supervisor log:\n%s", b)
		}
		if _, done := h.Result(); !done {
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			_, _ = h.Stop(ctx, StopOptions{Force: true})
		}
	})
}

func readLog(t *testing.T, h *Handle, stream string) string {
	t.Helper()
	r, err := h.Logs(context.Background(), stream, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

func wait(t *testing.T, h *Handle) ExitResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	res, err := h.Wait(ctx)
	if err != nil {
		t.Fatalf("task %s did not exit: %v", h.ID(), err)
	}
	return res
}

// waitForLog waits until a stream of the task contains s.
func waitForLog(t *testing.T, h *Handle, stream, s string) {
	t.Helper()
	poll.Until(t, 20*time.Second, func() bool {
		r, err := h.Logs(context.Background(), stream, false, 0)
		if err != nil {
			return false
		}
		defer r.Close()
		b, _ := io.ReadAll(r)
		return strings.Contains(string(b), s)
	}, "%q in %s of %s", s, stream, h.ID())
}

// assertGone checks that nothing of the task's process group is left.
func assertGone(t *testing.T, pgid, sid int) {
	t.Helper()
	poll.Until(t, 10*time.Second, func() bool { return len(groupMembers(pgid, sid)) == 0 },
		"process group %d to be empty (members %v)", pgid, groupMembers(pgid, sid))
}

func TestStartExitCodesAndLogs(t *testing.T) {
	d := newTestDriver(t, "")
	for _, code := range []int{0, 3} {
		t.Run(strconv.Itoa(code), func(t *testing.T) {
			spec := shSpec(t, fmt.Sprintf(`echo "$GREETING from $PWD"; echo oops >&2; exit %d`, code))
			h, err := d.Start(context.Background(), spec)
			if err != nil {
				t.Fatal(err)
			}
			cleanupTask(t, h)
			if h.Pid() <= 0 || h.SupervisorPid() <= 0 {
				t.Fatalf("pids: task %d supervisor %d", h.Pid(), h.SupervisorPid())
			}
			res := wait(t, h)
			if res.ExitCode != code || res.Signal != 0 || res.Lost || res.Stopped || res.Success() != (code == 0) {
				t.Fatalf("result %+v, want exit code %d", res, code)
			}
			if res.StartedAt.IsZero() || res.FinishedAt.Before(res.StartedAt) {
				t.Errorf("times: %v .. %v", res.StartedAt, res.FinishedAt)
			}
			allocDir := AllocDir(d.cfg.DataDir, spec.ID)
			if got, want := readLog(t, h, Stdout), "hello from "+allocDir+"\n"; got != want {
				t.Errorf("stdout %q, want %q", got, want)
			}
			if got := readLog(t, h, Stderr); got != "oops\n" {
				t.Errorf("stderr %q", got)
			}
			// The result is on disk, for a daemon that restarts.
			var onDisk ExitResult
			if err := readJSON(filepath.Join(stateDirOf(allocDir), exitFileName), &onDisk); err != nil || onDisk.ExitCode != code {
				t.Errorf("exit.json: %+v, %v", onDisk, err)
			}
			// A rank runs once per generation.
			if _, err := d.Start(context.Background(), spec); !errors.Is(err, ErrTaskExited) {
				t.Errorf("second start: err = %v, want ErrTaskExited", err)
			}
			assertGone(t, h.Pid(), h.SupervisorPid())
		})
	}
}

func TestTorchEnvReachesTask(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `echo "rank $RANK of $WORLD_SIZE local $LOCAL_RANK gpus [$CUDA_VISIBLE_DEVICES] deadline-file $GPUMESH_PREEMPT_DEADLINE_FILE"`)
	allocDir := AllocDir(d.cfg.DataDir, spec.ID)
	env, err := BuildEnv(RankEnv{
		JobID: spec.ID.JobID, Generation: 1, Rank: 1, WorldSize: 2, LocalRank: 0, LocalWorldSize: 1,
		GroupRank: 1, GroupWorldSize: 2, MasterAddr: "127.0.0.1", MasterPort: 29500, AllocDir: allocDir,
	}, []string{"PATH=/usr/bin:/bin"}, nil)
	if err != nil {
		t.Fatal(err)
	}
	spec.Env = env
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	if res := wait(t, h); !res.Success() {
		t.Fatalf("result %+v", res)
	}
	want := "rank 1 of 2 local 0 gpus [] deadline-file " + DeadlineFile(allocDir) + "\n"
	if got := readLog(t, h, Stdout); got != want {
		t.Fatalf("stdout %q, want %q", got, want)
	}
}

func TestStartFailures(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, "")
	spec.Command = []string{"no-such-program-gpumesh"}
	_, err := d.Start(context.Background(), spec)
	if !errors.Is(err, ErrStartFailed) || !strings.Contains(err.Error(), "not found in the task's PATH") {
		t.Fatalf("err = %v, want ErrStartFailed naming the PATH", err)
	}
	h, ok := d.Get(spec.ID)
	if ok {
		t.Fatalf("a failed start must not be tracked as a task: %v", h.ID())
	}
	if _, err := d.Start(context.Background(), spec); !errors.Is(err, ErrTaskExited) {
		t.Errorf("restart after failed start: err = %v, want ErrTaskExited", err)
	}
	// Bad specs never reach a process.
	bad := []TaskSpec{
		{ID: TaskID{JobID: "j"}},
		{ID: TaskID{JobID: "../x"}, Command: []string{"true"}},
		{ID: TaskID{JobID: "j", Rank: -1}, Command: []string{"true"}},
		{ID: TaskID{JobID: "j"}, Command: []string{"true"}, KillTimeout: -time.Second},
		{ID: TaskID{JobID: "j"}, Command: []string{"true"}, Logs: LogConfig{MaxFileBytes: 1}},
	}
	for i, s := range bad {
		if _, err := d.Start(context.Background(), s); !errors.Is(err, ErrInvalidSpec) {
			t.Errorf("bad spec %d: err = %v, want ErrInvalidSpec", i, err)
		}
	}
	// A supervisor binary that does not exist.
	d2, err := New(Config{DataDir: t.TempDir(), SupervisorPath: "/nonexistent/gpumesh"})
	if err != nil {
		t.Fatal(err)
	}
	defer d2.Shutdown()
	spec = shSpec(t, "true")
	if _, err := d2.Start(context.Background(), spec); !errors.Is(err, ErrSupervisor) {
		t.Errorf("missing supervisor: err = %v, want ErrSupervisor", err)
	}
	// Nothing ran, so the allocation stays startable.
	if exists(filepath.Join(stateDirOf(AllocDir(d2.cfg.DataDir, spec.ID)), specFileName)) {
		t.Error("spec.json left behind by a supervisor that never started")
	}
}

func TestStartIsIdempotent(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `echo up; exec sleep 600`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	h2, err := d.Start(context.Background(), spec)
	if err != nil || h2 != h {
		t.Fatalf("second start: %v, %v; want the same handle", h2, err)
	}
	other := spec
	other.Command = []string{"sh", "-c", "exit 0"}
	if _, err := d.Start(context.Background(), other); !errors.Is(err, ErrAlreadyRunning) {
		t.Fatalf("different spec: err = %v, want ErrAlreadyRunning", err)
	}
	if err := d.Remove(spec.ID); !errors.Is(err, ErrStillRunning) {
		t.Fatalf("remove running: err = %v", err)
	}
	res, err := h.Stop(context.Background(), StopOptions{Timeout: 10 * time.Second, Reason: "test"})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Stopped || res.StopReason != "test" || res.Signal != int(syscall.SIGTERM) || res.Killed {
		t.Fatalf("result %+v", res)
	}
	if err := d.Remove(spec.ID); err != nil {
		t.Fatal(err)
	}
	if exists(AllocDir(d.cfg.DataDir, spec.ID)) {
		t.Fatal("alloc dir not removed")
	}
}

func TestStopGracefulWritesDeadline(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `trap 'echo "term deadline=$(cat "$GPUMESH_PREEMPT_DEADLINE_FILE")"; exit 7' TERM
echo ready
while :; do sleep 0.01; done`)
	spec.Env = append(spec.Env, "GPUMESH_PREEMPT_DEADLINE_FILE="+DeadlineFile(AllocDir(d.cfg.DataDir, spec.ID)))
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	if exists(DeadlineFile(h.AllocDir())) {
		t.Fatal("deadline file exists before any stop")
	}
	deadline := time.Now().Add(time.Minute).Truncate(time.Second)
	res, err := h.Stop(context.Background(), StopOptions{Deadline: deadline, Reason: "preempted"})
	if err != nil {
		t.Fatal(err)
	}
	if res.ExitCode != 7 || !res.Stopped || res.Killed || res.StopReason != "preempted" {
		t.Fatalf("result %+v, want exit 7 after a graceful stop", res)
	}
	want := fmt.Sprintf("term deadline=%d\n", deadline.Unix())
	if got := readLog(t, h, Stdout); !strings.HasSuffix(got, want) {
		t.Fatalf("stdout %q, want suffix %q", got, want)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

func TestStopKillsAfterTimeout(t *testing.T) {
	d := newTestDriver(t, "")
	// Ignores SIGTERM, and so does its child (an ignored signal stays
	// ignored across exec): only SIGKILL ends the group.
	spec := shSpec(t, `trap '' TERM; sleep 600 & echo ready; wait`)
	spec.KillTimeout = 300 * time.Millisecond
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	if n := len(groupMembers(h.Pid(), h.SupervisorPid())); n != 2 {
		t.Fatalf("group has %d members, want 2 (sh and sleep)", n)
	}
	res, err := h.Stop(context.Background(), StopOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if res.Signal != int(syscall.SIGKILL) || !res.Killed || !res.Stopped || res.ExitCode != -1 {
		t.Fatalf("result %+v, want killed by SIGKILL", res)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

func TestForceStopAndLeftoverChildren(t *testing.T) {
	d := newTestDriver(t, "")
	// The main process exits 0 but leaves a child behind in its group: the
	// supervisor must not leave it running.
	spec := shSpec(t, `sleep 600 & echo "child $!"; exit 0`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	if res := wait(t, h); res.ExitCode != 0 {
		t.Fatalf("result %+v", res)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())

	spec = shSpec(t, `echo ready; exec sleep 600`)
	h, err = d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	res, err := h.Stop(context.Background(), StopOptions{Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if res.Signal != int(syscall.SIGKILL) || !res.Killed {
		t.Fatalf("result %+v, want SIGKILL at once", res)
	}
}

func TestLogsRotateAndFollowLiveTask(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `i=0; while [ $i -lt 200 ]; do echo "line $i"; i=$((i+1)); done; echo done >&2`)
	spec.Logs = LogConfig{MaxFileBytes: 256, MaxFiles: 100}
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := h.Logs(ctx, Stdout, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	sc := bufio.NewScanner(r)
	for i := range 200 {
		if !sc.Scan() {
			t.Fatalf("follow ended at line %d: %v", i, sc.Err())
		}
		if want := fmt.Sprintf("line %d", i); sc.Text() != want {
			t.Fatalf("line %d = %q, want %q", i, sc.Text(), want)
		}
	}
	_, hi, _, _ := logIndexes(h.Spec().LogDir, Stdout)
	if hi < 3 {
		t.Fatalf("expected several rotated files, newest index %d", hi)
	}
	// Once the task has exited, the follow ends with EOF.
	if res := wait(t, h); !res.Success() {
		t.Fatalf("result %+v", res)
	}
	if sc.Scan() {
		t.Fatalf("unexpected line after the end: %q", sc.Text())
	}
	if sc.Err() != nil {
		t.Fatalf("follow ended with %v, want EOF", sc.Err())
	}
}

func TestStopEscalates(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `trap '' TERM; echo ready; while :; do sleep 0.01; done`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	waitForLog(t, h, Stdout, "ready")
	// A long grace first, as a plain stop...
	if err := h.RequestStop(StopOptions{Timeout: time.Hour, Reason: "job stopped"}); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 10*time.Second, func() bool { return exists(DeadlineFile(h.AllocDir())) }, "the deadline file")
	// ...then a later, shorter one (a preemption notice) wins; a longer one
	// would not.
	if err := h.RequestStop(StopOptions{Timeout: 2 * time.Hour}); err != nil {
		t.Fatal(err)
	}
	res, err := h.Stop(context.Background(), StopOptions{Deadline: time.Now().Add(200 * time.Millisecond), Reason: "preempted"})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Killed || res.Signal != int(syscall.SIGKILL) || res.StopReason != "job stopped" {
		t.Fatalf("result %+v, want killed at the earlier deadline, reason of the first stop", res)
	}
	b, err := os.ReadFile(DeadlineFile(h.AllocDir()))
	if err != nil {
		t.Fatal(err)
	}
	secs, err := strconv.ParseInt(strings.TrimSpace(string(b)), 10, 64)
	if err != nil || time.Unix(secs, 0).After(time.Now().Add(time.Minute)) {
		t.Fatalf("deadline file %q: want the earlier deadline", b)
	}
	assertGone(t, h.Pid(), h.SupervisorPid())
}

func TestTorchErrorFileInResult(t *testing.T) {
	d := newTestDriver(t, "")
	spec := shSpec(t, `printf '{"message": {"message": "RuntimeError: boom", "extraInfo": {"py_callstack": "..."}}}' > "$TORCHELASTIC_ERROR_FILE"; exit 1`)
	spec.Env = append(spec.Env, "TORCHELASTIC_ERROR_FILE="+filepath.Join(AllocDir(d.cfg.DataDir, spec.ID), ErrorFileName))
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	res := wait(t, h)
	if res.ExitCode != 1 || res.Error != "RuntimeError: boom" {
		t.Fatalf("result %+v, want exit 1 with the error file's message", res)
	}
}

func TestTaskGetsDefaultSignalDispositions(t *testing.T) {
	d := newTestDriver(t, "")
	// The supervisor catches SIGTERM, SIGINT and SIGHUP; none of that may
	// leak into the task as an ignored or blocked signal.
	spec := shSpec(t, "")
	spec.Command = []string{"grep", "-E", "^Sig(Ign|Blk)", "/proc/self/status"}
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	if res := wait(t, h); !res.Success() {
		t.Fatalf("result %+v", res)
	}
	if got, want := readLog(t, h, Stdout), "SigBlk:\t0000000000000000\nSigIgn:\t0000000000000000\n"; got != want {
		t.Fatalf("task signal state %q, want %q", got, want)
	}
}

func TestTaskInheritsNoDescriptors(t *testing.T) {
	d := newTestDriver(t, "")
	// Only stdin, stdout and stderr reach the task: not the supervisor's
	// lock, ready pipe or log file (fd 3 is ls's own directory handle).
	spec := shSpec(t, "")
	spec.Command = []string{"ls", "/proc/self/fd"}
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	if res := wait(t, h); !res.Success() {
		t.Fatalf("result %+v", res)
	}
	if got := readLog(t, h, Stdout); got != "0\n1\n2\n3\n" {
		t.Fatalf("task's descriptors %q, want 0-2 (and ls's 3)", got)
	}
}

// A task given a user runs with that user's IDs, can write its allocation
// directory (reached through folders it may pass but not list, whatever the
// umask), and cannot remove the driver's state there.
func TestTaskRunsAsUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("switching users needs root")
	}
	u, err := LookupUser("nobody")
	if err != nil {
		t.Skip(err)
	}
	d := newTestDriver(t, "")
	// Tasks reach their allocation directory through the data dir (and the
	// test's temporary folders above it).
	for p := d.cfg.DataDir; p != filepath.Clean(os.TempDir()); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	for p := filepath.Clean(os.TempDir()); p != "/"; p = filepath.Dir(p) {
		if st, err := os.Stat(p); err == nil && st.Mode().Perm()&0o001 == 0 {
			t.Skipf("%s is not traversable by other users", p)
		}
	}
	spec := shSpec(t, `id -u; id -g; echo hi > mine && echo wrote; rm -rf .gpumesh 2>/dev/null; test -d .gpumesh && echo kept; ls .. >/dev/null 2>&1 || echo unlisted`)
	spec.User = u
	// The systemd unit's umask: the folders above the allocation directory
	// must still let the task through.
	old := syscall.Umask(0o027)
	h, err := d.Start(context.Background(), spec)
	syscall.Umask(old)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	if res := wait(t, h); !res.Success() {
		t.Fatalf("result %+v\nstderr %s", res, readLog(t, h, Stderr))
	}
	want := fmt.Sprintf("%d\n%d\nwrote\nkept\nunlisted\n", u.UID, u.GID)
	if got := readLog(t, h, Stdout); got != want {
		t.Fatalf("stdout %q, want %q (stderr %q)", got, want, readLog(t, h, Stderr))
	}
	st, err := os.Stat(filepath.Join(AllocDir(d.cfg.DataDir, spec.ID), "mine"))
	if err != nil || st.Sys().(*syscall.Stat_t).Uid != u.UID {
		t.Fatalf("file the task wrote: %v %v", st, err)
	}
}

// A daemon running at a raised priority (the unit's Nice=-5) starts its
// tasks at the normal one.
func TestTaskRunsAtNormalNice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raising priority needs root")
	}
	d := newTestDriver(t, "")
	// The supervisor is forked from this thread and inherits its niceness.
	runtime.LockOSThread() // never unlocked: the thread ends with the test
	if err := unix.Setpriority(unix.PRIO_PROCESS, unix.Gettid(), -5); err != nil {
		t.Skip(err)
	}
	spec := shSpec(t, `cut -d' ' -f19 /proc/self/stat`)
	h, err := d.Start(context.Background(), spec)
	if err != nil {
		t.Fatal(err)
	}
	cleanupTask(t, h)
	wait(t, h)
	if got := strings.TrimSpace(readLog(t, h, Stdout)); got != "0" {
		t.Fatalf("task niceness %s, want 0", got)
	}
}

// A task user who cannot reach the allocation directory gets a start
// failure that says what to do.
func TestTaskUserWithoutAccessSaysWhy(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("switching users needs root")
	}
	u, err := LookupUser("nobody")
	if err != nil {
		t.Skip(err)
	}
	d := newTestDriver(t, "") // under a 0700 temporary folder
	spec := shSpec(t, "true")
	spec.User = u
	_, err = d.Start(context.Background(), spec)
	if !errors.Is(err, ErrStartFailed) || !strings.Contains(err.Error(), "chmod 711") {
		t.Fatalf("err = %v, want a start failure naming the fix", err)
	}
}
