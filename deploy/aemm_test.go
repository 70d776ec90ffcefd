package deploy

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"testing"
	"time"
)

// The real ec2-metadata-mock (a tool dependency in go.mod), built once per
// test binary into a temporary directory that TestMain removes.
var aemm struct {
	once sync.Once
	dir  string
	bin  string
	err  error
}

func TestMain(m *testing.M) {
	code := m.Run()
	if aemm.dir != "" {
		os.RemoveAll(aemm.dir)
	}
	os.Exit(code)
}

func goBinary() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return filepath.Join(runtime.GOROOT(), "bin", "go")
}

func aemmBinary(t *testing.T) string {
	t.Helper()
	aemm.once.Do(func() {
		aemm.dir, aemm.err = os.MkdirTemp("", "gpumesh-aemm-")
		if aemm.err != nil {
			return
		}
		aemm.bin = filepath.Join(aemm.dir, "ec2-metadata-mock")
		cmd := exec.Command(goBinary(), "build", "-o", aemm.bin, "github.com/aws/amazon-ec2-metadata-mock/cmd/ec2-metadata-mock")
		out, err := cmd.CombinedOutput()
		if err != nil {
			aemm.err = fmt.Errorf("building ec2-metadata-mock: %v\n%s", err, out)
		}
	})
	if aemm.err != nil {
		t.Fatal(aemm.err)
	}
	return aemm.bin
}

type aemmOptions struct {
	spotDelay      time.Duration     // -d: the ITN appears this long after start
	rebalanceDelay time.Duration     // --rebalance-delay-sec
	ipCount        int               // -x; 0 means the mock's default (2)
	values         map[string]string // metadata value overrides (config file)
}

// startAEMM starts ec2-metadata-mock in IMDSv2-only mode on a free
// 127.0.0.1 port and returns its endpoint. The process is killed at the end
// of the test; its output is logged on failure.
func startAEMM(t *testing.T, o aemmOptions) string {
	t.Helper()
	bin := aemmBinary(t)
	dir := t.TempDir()
	cfg := map[string]any{"metadata": map[string]any{"values": o.values}}
	b, _ := json.Marshal(cfg)
	cfgFile := filepath.Join(dir, "aemm-config.json")
	if err := os.WriteFile(cfgFile, b, 0o600); err != nil {
		t.Fatal(err)
	}
	for attempt := 0; attempt < 3; attempt++ {
		port := freePort(t)
		args := []string{
			"-c", cfgFile, "-n", "127.0.0.1", "-p", strconv.Itoa(port), "-I",
			"-d", strconv.Itoa(int(o.spotDelay / time.Second)),
			"--rebalance-delay-sec", strconv.Itoa(int(o.rebalanceDelay / time.Second)),
		}
		if o.ipCount != 0 {
			args = append(args, "-x", strconv.Itoa(o.ipCount))
		}
		cmd := exec.Command(bin, args...)
		cmd.Env = append(os.Environ(), "HOME="+dir)
		cmd.Dir = dir
		var out syncBuffer
		cmd.Stdout, cmd.Stderr = &out, &out
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
		if waitAEMM(endpoint, exited, 30*time.Second) {
			t.Cleanup(func() {
				stop()
				if t.Failed() {
					t.Logf("ec2-metadata-mock output (tail):\n%s", tail(out.String(), 4000))
				}
			})
			return endpoint
		}
		stop()
		t.Logf("ec2-metadata-mock did not come up on port %d (attempt %d):\n%s", port, attempt+1, tail(out.String(), 2000))
	}
	t.Fatal("ec2-metadata-mock did not start")
	return ""
}

// waitAEMM polls for an IMDSv2 token until the mock answers, it exits, or
// the deadline passes.
func waitAEMM(endpoint string, exited <-chan struct{}, timeout time.Duration) bool {
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

func freePort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
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
