// Package procs runs real gpumesh agents as separate processes for
// multi-process tests: it builds the binary once, starts agents on
// 127.0.0.x addresses, kills them with SIGKILL and restarts them with their
// data dirs, and runs client commands against them. Agents die with the test
// binary, however it ends (a parent-death signal on Linux).
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

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
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

// Agent is one agent process, on a loopback address or inside a network
// namespace. Build it with NewAgent or Prepare; its methods are safe for
// concurrent use.
type Agent struct {
	Name    string
	IP      string
	DataDir string
	Ports   Ports
	Args    []string // extra flags
	// DefaultName starts the agent without --name, so that it names
	// itself (Name stays the harness's label: data dir and log file).
	DefaultName bool
	// Netns, when set, runs the agent inside that network namespace
	// (ip netns exec); Dial then reaches addresses inside it.
	Netns string
	Dial  func(ctx context.Context, addr string) (net.Conn, error)

	t        testing.TB
	mu       sync.Mutex
	cmd      *exec.Cmd
	log      *os.File
	exited   <-chan struct{}
	connOnce sync.Once
	conn     *grpc.ClientConn
}

// Ports of one agent.
type Ports struct{ Gossip, RPC, Raft, HTTP int }

// RPCAddr is the agent's Control API address.
func (a *Agent) RPCAddr() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Ports.RPC)) }

// GossipAddr is the agent's gossip address.
func (a *Agent) GossipAddr() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Ports.Gossip)) }

// HTTPAddr is the agent's metrics and health address.
func (a *Agent) HTTPAddr() string { return net.JoinHostPort(a.IP, strconv.Itoa(a.Ports.HTTP)) }

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

// NewAgent prepares (does not start) an agent on ip with free ports, its
// data in dir/name.
func NewAgent(t testing.TB, dir, name, ip string, args ...string) *Agent {
	return Prepare(t, &Agent{Name: name, IP: ip, DataDir: filepath.Join(dir, name), Args: args})
}

// Prepare readies a (not started) agent: free ports on its IP when Ports is
// zero, the binary built, and a cleanup that kills it, closes its client
// and stops its tasks when the test ends (tasks outlive their agent by
// design; none may outlive the test).
func Prepare(t testing.TB, a *Agent) *Agent {
	t.Helper()
	a.t = t
	if a.Ports == (Ports{}) {
		p := FreePorts(t, a.IP, 4)
		a.Ports = Ports{Gossip: p[0], RPC: p[1], Raft: p[2], HTTP: p[3]}
	}
	Binary(t)
	t.Cleanup(func() {
		a.Kill()
		if a.conn != nil {
			a.conn.Close()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		if err := driver.KillAll(ctx, a.DataDir); err != nil {
			t.Logf("stopping %s's tasks: %v", a.Name, err)
		}
	})
	return a
}

// Start starts the agent process (again, after a kill, with the same data
// dir).
func (a *Agent) Start() {
	a.t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd != nil {
		a.t.Fatalf("%s is already running", a.Name)
	}
	if err := os.MkdirAll(a.DataDir, 0o755); err != nil {
		a.t.Fatal(err)
	}
	log, err := os.OpenFile(a.LogPath(), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		a.t.Fatal(err)
	}
	args := []string{"agent", "--bind", a.IP, "--data-dir", a.DataDir,
		"--gossip-port", strconv.Itoa(a.Ports.Gossip), "--rpc-port", strconv.Itoa(a.Ports.RPC),
		"--raft-port", strconv.Itoa(a.Ports.Raft), "--http-port", strconv.Itoa(a.Ports.HTTP),
		"--log-level", "debug",
		// Tasks run as the test's user: their scripts and data dirs sit in
		// temporary folders only it can enter.
		"--task-user=",
	}
	if !a.DefaultName {
		args = append(args, "--name", a.Name)
	}
	args = append(args, a.Args...)
	cmd := exec.Command(Binary(a.t), args...)
	if a.Netns != "" {
		// ip(8) enters the namespace and execs the agent: the pid is the agent's.
		cmd = exec.Command("ip", append([]string{"netns", "exec", a.Netns, Binary(a.t)}, args...)...)
	}
	cmd.Stdout, cmd.Stderr = log, log
	// Its own process group (Kill reaches all of it), and killed with the
	// test binary however that ends (see startTied).
	exited, err := startTied(cmd)
	if err != nil {
		log.Close()
		a.t.Fatalf("start %s: %v", a.Name, err)
	}
	fmt.Fprintf(log, "==== test harness: started pid %d at %s\n", cmd.Process.Pid, time.Now().UTC().Format(time.RFC3339Nano))
	a.cmd, a.log, a.exited = cmd, log, exited
}

// Running reports whether the process is alive.
func (a *Agent) Running() bool {
	a.mu.Lock()
	defer a.mu.Unlock()
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

// Pid is the agent's process id, or 0.
func (a *Agent) Pid() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return 0
	}
	return a.cmd.Process.Pid
}

// Kill sends SIGKILL to the agent's process group and waits for it.
func (a *Agent) Kill() {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.cmd == nil {
		return
	}
	_ = syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
	<-a.exited
	fmt.Fprintf(a.log, "==== test harness: SIGKILL at %s\n", time.Now().UTC().Format(time.RFC3339Nano))
	a.log.Close()
	a.cmd = nil
}

// Signal sends sig to the agent and waits up to timeout for it to exit.
func (a *Agent) Signal(sig syscall.Signal, timeout time.Duration) error {
	a.mu.Lock()
	defer a.mu.Unlock()
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

// Client is a Control API client of this agent (one connection, reused;
// gRPC reconnects by itself after a restart; closed when the test ends).
func (a *Agent) Client() pb.ControlClient {
	a.connOnce.Do(func() {
		opts := []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
		if a.Dial != nil {
			opts = append(opts, grpc.WithContextDialer(a.Dial))
		}
		c, err := grpc.NewClient(a.RPCAddr(), opts...)
		if err != nil {
			a.t.Fatalf("client of %s: %v", a.Name, err)
		}
		a.conn = c
	})
	return pb.NewControlClient(a.conn)
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
