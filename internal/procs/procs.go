// Package procs runs real gpumesh agents as separate processes for
// multi-process tests: it builds the binary once, starts agents on
// 127.0.0.x addresses, kills them with SIGKILL and restarts them with their
// data dirs, and runs client commands against them.
package procs

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/node/driver"
)

var (
	buildOnce sync.Once
	binPath   string
	buildErr  error
)

// Binary builds cmd/gpumesh once per test process and returns its path.
func Binary(t testing.TB) string {
	t.Helper()
	buildOnce.Do(func() {
		removeStaleBinaries()
		dir, err := os.MkdirTemp("", binDirPrefix+strconv.Itoa(os.Getpid())+"-")
		if err != nil {
			buildErr = err
			return
		}
		binPath = filepath.Join(dir, "gpumesh")
		_, file, _, _ := runtime.Caller(0)
		root := filepath.Join(filepath.Dir(file), "..", "..")
		cmd := exec.Command("go", "build", "-o", binPath, "./cmd/gpumesh")
		cmd.Dir = root
		out, err := cmd.CombinedOutput()
		if err != nil {
			buildErr = fmt.Errorf("go build: %v\n%s", err, out)
		}
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return binPath
}

// binDirPrefix names the temporary directories Binary builds into:
// gpumesh-bin-<pid>-<random>.
const binDirPrefix = "gpumesh-bin-"

// removeStaleBinaries deletes the build directories of test processes
// that have exited (a test binary cannot remove its own at exit; each
// holds a ~70 MB binary). A directory whose process still runs, or whose
// name carries no pid, is left alone.
func removeStaleBinaries() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), binDirPrefix+"*-*"))
	for _, d := range dirs {
		pidStr, _, ok := strings.Cut(strings.TrimPrefix(filepath.Base(d), binDirPrefix), "-")
		pid, err := strconv.Atoi(pidStr)
		if !ok || err != nil || pid <= 0 || pid == os.Getpid() {
			continue
		}
		if err := syscall.Kill(pid, 0); errors.Is(err, syscall.ESRCH) {
			_ = os.RemoveAll(d)
		}
	}
}

// Agent is one agent process.
type Agent struct {
	Name    string
	IP      string
	DataDir string
	Ports   Ports
	Args    []string // extra flags

	t      testing.TB
	bin    string
	cmd    *exec.Cmd
	log    *os.File
	exited chan struct{}
}

// Ports of one agent.
type Ports struct{ Gossip, RPC, Raft, HTTP int }

// RPCAddr is the agent's Control API address.
func (a *Agent) RPCAddr() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Ports.RPC)) }

// GossipAddr is the agent's gossip address.
func (a *Agent) GossipAddr() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Ports.Gossip)) }

// LogPath is where the agent's output goes.
func (a *Agent) LogPath() string { return filepath.Join(a.DataDir, "..", a.Name+".log") }

// FreePorts finds n free TCP+UDP ports on ip.
func FreePorts(t testing.TB, ip string, n int) []int {
	t.Helper()
	var ports []int
	var lns []net.Listener
	defer func() {
		for _, l := range lns {
			l.Close()
		}
	}()
	for len(ports) < n {
		l, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
		if err != nil {
			t.Fatalf("free port on %s: %v", ip, err)
		}
		p := l.Addr().(*net.TCPAddr).Port
		u, err := net.ListenPacket("udp", net.JoinHostPort(ip, strconv.Itoa(p)))
		if err != nil {
			l.Close()
			continue
		}
		u.Close()
		lns = append(lns, l)
		ports = append(ports, p)
	}
	return ports
}

// NewAgent prepares (does not start) an agent on ip with free ports.
func NewAgent(t testing.TB, dir, name, ip string, args ...string) *Agent {
	p := FreePorts(t, ip, 4)
	a := &Agent{
		Name: name, IP: ip, DataDir: filepath.Join(dir, name),
		Ports: Ports{Gossip: p[0], RPC: p[1], Raft: p[2], HTTP: p[3]},
		Args:  args, t: t, bin: Binary(t),
	}
	t.Cleanup(func() {
		a.Kill()
		// Tasks outlive their agent by design; none may outlive the test.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = driver.KillAll(ctx, a.DataDir)
	})
	return a
}

// Start starts the agent process.
func (a *Agent) Start() {
	a.t.Helper()
	if err := os.MkdirAll(a.DataDir, 0o755); err != nil {
		a.t.Fatal(err)
	}
	log, err := os.OpenFile(a.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	args := []string{"agent",
		"--name", a.Name, "--bind", a.IP, "--data-dir", a.DataDir,
		"--gossip-port", strconv.Itoa(a.Ports.Gossip), "--rpc-port", strconv.Itoa(a.Ports.RPC),
		"--raft-port", strconv.Itoa(a.Ports.Raft), "--http-port", strconv.Itoa(a.Ports.HTTP),
		"--log-level", "debug",
		// Tasks run as the test's user: their scripts and data dirs sit in
		// temporary folders only it can enter.
		"--task-user=",
	}
	args = append(args, a.Args...)
	cmd := exec.Command(a.bin, args...)
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		log.Close()
		a.t.Fatalf("start %s: %v", a.Name, err)
	}
	a.cmd, a.log = cmd, log
	a.exited = make(chan struct{})
	go func(c *exec.Cmd, done chan struct{}) { _ = c.Wait(); close(done) }(cmd, a.exited)
}

// Running reports whether the process is alive.
func (a *Agent) Running() bool {
	if a.cmd == nil {
		return false
	}
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// Kill sends SIGKILL to the agent's process group and waits for it.
func (a *Agent) Kill() {
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	<-a.exited
	a.log.Close()
	a.cmd = nil
}

// Signal sends sig to the agent and waits up to timeout for it to exit.
func (a *Agent) Signal(sig syscall.Signal, timeout time.Duration) error {
	if a.cmd == nil {
		return nil
	}
	_ = a.cmd.Process.Signal(sig)
	select {
	case <-a.exited:
		a.log.Close()
		a.cmd = nil
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("%s did not exit within %s of %s", a.Name, timeout, sig)
	}
}

// Logs returns what the agent printed so far.
func (a *Agent) Logs() string {
	b, _ := os.ReadFile(a.LogPath())
	return string(b)
}

// CLI runs a gpumesh client command against addr and returns stdout.
func CLI(ctx context.Context, t testing.TB, addr string, args ...string) (string, string, error) {
	args = append(args, "--address", addr)
	cmd := exec.CommandContext(ctx, Binary(t), args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	return out.String(), errb.String(), err
}

// CLIJSON runs a client command with --json and decodes its output into v.
func CLIJSON(ctx context.Context, t testing.TB, addr string, v any, args ...string) error {
	out, stderr, err := CLI(ctx, t, addr, append(args, "--json")...)
	if err != nil {
		return fmt.Errorf("%v: %s", err, stderr)
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("decoding %q: %v", out, err)
	}
	return nil
}

// Eventually polls cond every interval until it returns nil or timeout
// passes, and then fails the test with cond's last error.
func Eventually(t testing.TB, timeout time.Duration, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	var err error
	for {
		if err = cond(); err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("condition not met within %s: %v", timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// StartJoined gives every agent the gossip address of every other one as a
// --join flag and starts them all.
func StartJoined(as []*Agent) {
	for i, a := range as {
		for j, b := range as {
			if i != j {
				a.Args = append(a.Args, "--join", b.GossipAddr())
			}
		}
		a.Start()
	}
}
