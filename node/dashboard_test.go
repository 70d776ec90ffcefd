//go:build linux

package node

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// chromium finds a headless-capable Chromium, or "".
func chromium() string {
	for _, name := range []string{"chromium", "chromium-browser", "google-chrome", "google-chrome-stable"} {
		if p, err := exec.LookPath(name); err == nil {
			return p
		}
	}
	return ""
}

// runChromium loads url headless and returns what it printed (the DOM with
// --dump-dom). Virtual time lets the page's fetches and timers run first.
func runChromium(t *testing.T, bin, url string, extra ...string) []byte {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	args := append([]string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
		"--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
		"--user-data-dir=" + t.TempDir(), "--window-size=1400,1000", "--virtual-time-budget=5000"}, extra...)
	args = append(args, url)
	cmd := exec.CommandContext(ctx, bin, args...)
	// Files, not pipes: Chromium's helper processes may keep them open.
	dir := t.TempDir()
	out, err := os.Create(filepath.Join(dir, "stdout"))
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	errf, err := os.Create(filepath.Join(dir, "stderr"))
	if err != nil {
		t.Fatal(err)
	}
	defer errf.Close()
	cmd.Stdout, cmd.Stderr = out, errf
	// Its own process group, so that every helper it started ends with it;
	// killed with the test binary however that ends (the parent-death
	// signal fires when the forking thread ends: Run forks and waits on
	// this goroutine's thread, locked until it returns).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	runtime.LockOSThread()
	runErr := cmd.Run()
	runtime.UnlockOSThread()
	if cmd.Process != nil {
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
	}
	if runErr != nil {
		e, _ := os.ReadFile(errf.Name())
		t.Fatalf("chromium %s: %v\n%s", url, runErr, e)
	}
	b, err := os.ReadFile(out.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestDashboardFeed(t *testing.T) {
	dc, f, c := startGPUCluster(t)
	id := submitSleeper(t, c, 2)
	poll.Until(t, 30*time.Second, func() error {
		var v dashView
		if err := json.Unmarshal([]byte(httpGet(t, "http://"+f.HTTPAddr()+"/v1/dashboard")), &v); err != nil {
			return err
		}
		l := dc.Leader()
		if l == nil || v.Leader != l.Name() || v.Node != f.Name() {
			return fmt.Errorf("leader %q node %q (an election is under way?)", v.Leader, v.Node)
		}
		roles := map[string]int{}
		for _, m := range v.Members {
			roles[m.Role]++
		}
		if len(v.Members) != 3 || roles["leader"] != 1 || roles["voter"] != 2 {
			return fmt.Errorf("members %+v", v.Members)
		}
		if len(v.Jobs) != 1 || v.Jobs[0].ID != id || v.Jobs[0].Status != "running" || len(v.Jobs[0].Ranks) != 2 {
			return fmt.Errorf("jobs %+v", v.Jobs)
		}
		for _, r := range v.Jobs[0].Ranks {
			if r.Status != "running" || r.Node == "" {
				return fmt.Errorf("rank %+v", r)
			}
		}
		if len(v.GPUs) != 3 || len(v.GPUs[0].GPUs) != 2 || v.GPUs[0].GPUs[1].Utilization != 97 {
			return fmt.Errorf("gpus %+v", v.GPUs)
		}
		return nil
	})
	// The page and its assets are served; other paths are not.
	page := httpGet(t, "http://"+f.HTTPAddr()+"/")
	if err := contains(page, "<title>gpumesh</title>", "app.js", "style.css"); err != nil {
		t.Fatalf("index.html: %v", err)
	}
	if err := contains(httpGet(t, "http://"+f.HTTPAddr()+"/app.js"), "/v1/dashboard"); err != nil {
		t.Fatal(err)
	}
}

// TestDashboardInChromium loads the page from a follower of a 3-node dev
// cluster in headless Chromium and checks that the rendered page shows the
// leader and a running job. Set GPUMESH_DASHBOARD_SCREENSHOT to a .png path
// to keep a screenshot.
func TestDashboardInChromium(t *testing.T) {
	bin := chromium()
	if bin == "" {
		t.Skip("chromium is not installed (Debian: apt-get install chromium); skipping the browser test of the dashboard")
	}
	dc, f, c := startGPUCluster(t)
	id := submitSleeper(t, c, 2)
	waitRanksRunning(t, c, id, 2)
	url := "http://" + f.HTTPAddr() + "/"
	poll.Until(t, 60*time.Second, func() error {
		l := dc.Leader()
		if l == nil {
			return fmt.Errorf("no leader")
		}
		leader := l.Name()
		dom := string(runChromium(t, bin, url, "--dump-dom"))
		return contains(dom,
			`data-leader="`+leader+`"`,
			`data-node="`+leader+`" data-role="leader"`,
			`data-job="`+id+`" data-status="running"`,
			`data-rank="1" data-status="running"`,
			`data-gpu-node="`+f.Name()+`"`,
		)
	})
	shot := os.Getenv("GPUMESH_DASHBOARD_SCREENSHOT")
	if shot == "" {
		shot = filepath.Join(t.TempDir(), "dashboard.png")
	}
	shot, _ = filepath.Abs(shot)
	runChromium(t, bin, url, "--screenshot="+shot)
	b, err := os.ReadFile(shot)
	if err != nil || !bytes.HasPrefix(b, []byte("\x89PNG")) || len(b) < 10_000 {
		t.Fatalf("screenshot %s: %d bytes, %v", shot, len(b), err)
	}
}

// TestDashboardOnClientNode: a client (no Raft replica) builds the same
// view through a server's Control API, and exports no Raft series.
func TestDashboardOnClientNode(t *testing.T) {
	dc := startCluster(t, 4, func(i int, c *Config) {
		if i == 3 {
			c.Server = false
		}
	})
	cl := dc.Agents[3]
	id := submitSleeper(t, client(t, cl), 1)
	poll.Until(t, 30*time.Second, func() error {
		var v dashView
		if err := json.Unmarshal([]byte(httpGet(t, "http://"+cl.HTTPAddr()+"/v1/dashboard")), &v); err != nil {
			return err
		}
		l := dc.Leader()
		if l == nil || v.Role != "client" || v.Leader != l.Name() {
			return fmt.Errorf("role %q leader %q", v.Role, v.Leader)
		}
		var self *dashMember
		for i := range v.Members {
			if v.Members[i].Name == cl.Name() {
				self = &v.Members[i]
			}
		}
		if len(v.Members) != 4 || self == nil || self.Role != "client" {
			return fmt.Errorf("members %+v", v.Members)
		}
		if len(v.Jobs) != 1 || v.Jobs[0].ID != id || v.Jobs[0].Status != "running" || len(v.Jobs[0].Ranks) != 1 || v.Jobs[0].Ranks[0].Status != "running" {
			return fmt.Errorf("jobs %+v", v.Jobs)
		}
		return nil
	})
	mfs := scrape(t, cl)
	if _, ok := metricValue(mfs, "gpumesh_raft_term", nil); ok {
		t.Fatal("a client exports Raft series")
	}
	if v, ok := metricValue(mfs, "gpumesh_agent_role", map[string]string{"role": "client"}); !ok || v != 1 {
		t.Fatalf("client role series: %v %v", v, ok)
	}
	if v, ok := metricValue(mfs, "gpumesh_members", map[string]string{"state": "alive"}); !ok || v != 4 {
		t.Fatalf("members alive on the client: %v %v", v, ok)
	}
}

// A dead member is shown down, not ready; with no leader the roles are the
// gossiped ones and a banner says what is wrong, not a raw gRPC error.
func TestDashboardDeadMembersAndNoLeader(t *testing.T) {
	dc := startCluster(t, 3, nil)
	var watch *Agent
	var others []*Agent
	for _, a := range dc.Agents {
		if watch == nil && !a.IsLeader() {
			watch = a
		} else {
			others = append(others, a)
		}
	}
	view := func() dashView {
		var v dashView
		if err := json.Unmarshal([]byte(httpGet(t, "http://"+watch.HTTPAddr()+"/v1/dashboard")), &v); err != nil {
			t.Fatal(err)
		}
		return v
	}
	member := func(v dashView, name string) dashMember {
		for _, m := range v.Members {
			if m.Name == name {
				return m
			}
		}
		t.Fatalf("no member %s in %+v", name, v.Members)
		return dashMember{}
	}
	// One follower dies: shown down while the leader still answers.
	var gone *Agent
	for _, a := range others {
		if !a.IsLeader() {
			gone = a
		}
	}
	// Every member has gossiped its duty (the page shows it when no leader
	// answers).
	poll.Until(t, 20*time.Second, func() error {
		for _, m := range watch.mesh.Members() {
			if m.role != "voter" {
				return fmt.Errorf("%s gossips %q", m.Name, m.role)
			}
		}
		return nil
	})
	gone.Shutdown()
	poll.Until(t, 30*time.Second, func() error {
		v := view()
		if m := member(v, gone.Name()); m.State != "dead" || m.Status != "down" {
			return fmt.Errorf("stopped member: state %s status %s", m.State, m.Status)
		}
		if v.Banner != "" {
			return fmt.Errorf("banner with a leader: %s", v.Banner)
		}
		return nil
	})
	// The leader goes too: no leader.
	for _, a := range others {
		if a != gone {
			a.Shutdown()
		}
	}
	poll.Until(t, 30*time.Second, func() error {
		v := view()
		// Gossip forgets dead members after a while: 1 of 3, or of 2.
		if !strings.HasPrefix(v.Banner, "No leader: 1 of ") || !strings.Contains(v.Banner, "voters answer") {
			return fmt.Errorf("banner %q, errors %v", v.Banner, v.Errors)
		}
		for _, e := range v.Errors {
			if strings.Contains(e, "rpc error") {
				return fmt.Errorf("raw gRPC error shown: %s", e)
			}
		}
		for _, m := range v.Members {
			if m.Role != "voter" {
				return fmt.Errorf("member %s shown as %s, want the voter it gossiped (watching %s, stopped %s first; %+v)", m.Name, m.Role, watch.Name(), gone.Name(), v.Members)
			}
		}
		if m := member(v, watch.Name()); m.Status != "ready" || m.State != "alive" {
			return fmt.Errorf("the serving node: %+v", m)
		}
		return nil
	})
}
