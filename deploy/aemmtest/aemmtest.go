// Package aemmtest runs the real Amazon EC2 Metadata Mock
// (github.com/aws/amazon-ec2-metadata-mock, a tool dependency in go.mod) for
// tests: IMDSv2-only, on a free 127.0.0.1 port, with spot interruption and
// rebalance notices that appear after configurable delays. The binary comes
// from `go tool -n ec2-metadata-mock` (built once into the Go build cache),
// so tests must run inside this module.
package aemmtest

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Options configures one mock.
type Options struct {
	// SpotDelay is how long after start the spot interruption notice
	// appears (whole seconds; 0: at once). The notice's deadline is the
	// request time + 2 minutes.
	SpotDelay time.Duration
	// RebalanceDelay is how long after start the rebalance recommendation
	// appears (whole seconds; 0: at once).
	RebalanceDelay time.Duration
	// IPCount is how many distinct client addresses see notices (-x);
	// later ones get 404. 0: the mock's default (2); negative: all.
	IPCount int
	// Values override metadata items, keyed as in the mock's
	// aemm-metadata-default-values.json: "instance-id", "instance-type",
	// "instance-life-cycle", "local-ipv4", "placement-availability-zone",
	// "placement-region", ...
	Values map[string]string
}

var bin struct {
	once sync.Once
	path string
	err  error
}

// Binary returns the path of the ec2-metadata-mock binary.
func Binary(t testing.TB) string {
	t.Helper()
	bin.once.Do(func() {
		// go test puts its own GOROOT/bin first on PATH.
		goBin, err := exec.LookPath("go")
		if err != nil {
			bin.err = fmt.Errorf("the go command is not on PATH (needed to run ec2-metadata-mock through go tool): %v", err)
			return
		}
		out, err := exec.Command(goBin, "tool", "-n", "ec2-metadata-mock").Output()
		if err != nil {
			var stderr string
			if ee, ok := err.(*exec.ExitError); ok {
				stderr = string(ee.Stderr)
			}
			bin.err = fmt.Errorf("go tool -n ec2-metadata-mock: %v %s (is the tool in go.mod? go get -tool github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock@v1.13.0)", err, stderr)
			return
		}
		bin.path = strings.TrimSpace(string(out))
	})
	if bin.err != nil {
		t.Fatal(bin.err)
	}
	return bin.path
}

// Start starts a mock and returns its endpoint ("http://127.0.0.1:PORT").
// It is killed when the test ends; its output is logged if the test failed.
func Start(t testing.TB, o Options) string {
	t.Helper()
	path := Binary(t)
	dir := t.TempDir()
	cfg := map[string]any{"metadata": map[string]any{"values": o.Values}}
	b, _ := json.Marshal(cfg)
	cfgFile := filepath.Join(dir, "aemm-config.json")
	if err := os.WriteFile(cfgFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for attempt := 1; attempt <= 3; attempt++ {
		port, err := freePort()
		if err != nil {
			t.Fatal(err)
		}
		args := []string{
			"-c", cfgFile, "-n", "127.0.0.1", "-p", strconv.Itoa(port), "-I",
			"-d", strconv.Itoa(int(o.SpotDelay / time.Second)),
			"--rebalance-delay-sec", strconv.Itoa(int(o.RebalanceDelay / time.Second)),
		}
		if o.IPCount != 0 {
			args = append(args, "-x", strconv.Itoa(o.IPCount))
		}
		cmd := exec.Command(path, args...)
		// The mock also reads $HOME/aemm-config.json: keep it in the temp dir.
		cmd.Env = append(os.Environ(), "HOME="+dir)
		cmd.Dir = dir
		out := &syncBuffer{}
		cmd.Stdout, cmd.Stderr = out, out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan struct{})
		go func() { cmd.Wait(); close(exited) }()
		stop := func() {
			cmd.Process.Kill()
			<-exited
		}
		endpoint := fmt.Sprintf("http://127.0.0.1:%d", port)
		if ready(endpoint, exited, 30*time.Second) {
			t.Cleanup(func() {
				stop()
				if t.Failed() {
					t.Logf("ec2-metadata-mock output (tail):\n%s", tail(out.String(), 4000))
				}
			})
			return endpoint
		}
		stop()
		t.Logf("ec2-metadata-mock did not come up on port %d (attempt %d):\n%s", port, attempt, tail(out.String(), 2000))
	}
	t.Fatal("ec2-metadata-mock did not start")
	return ""
}

// ready polls for an IMDSv2 token until the mock answers, exits, or the
// timeout passes.
func ready(endpoint string, exited <-chan struct{}, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	c := &http.Client{Timeout: time.Second}
	for time.Now().Before(deadline) {
		select {
		case <-exited:
			return false
		default:
		}
		req, _ := http.NewRequest(http.MethodPut, endpoint+"/latest/api/token", nil)
		req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "60")
		if resp, err := c.Do(req); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return true
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return false
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "..." + s[len(s)-n:]
	}
	return s
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}
