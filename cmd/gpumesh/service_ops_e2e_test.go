package main

import (
	"context"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// What a user running services sees, through the CLI against two agent
// processes, one with a serve port: gpumesh nodes shows the serve address,
// gpumesh service status lists a URL per node (the serve port where there
// is one, the HTTP port elsewhere) and says that a replica whose command
// exits at once is crash-looping, how often in a row and when it tries
// again.
func TestServiceStatusShowsURLsAndCrashLoops(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	serving := procs.NewAgent(t, dir, "agent-1", "127.0.0.2", "--bootstrap-expect", "2", "--ec2", "off", "--serve", "127.0.0.2:0")
	plain := procs.NewAgent(t, dir, "agent-2", "127.0.0.3", "--bootstrap-expect", "2", "--ec2", "off")
	as := []*procs.Agent{serving, plain}
	procs.StartJoined(as)
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 4000))
			}
		}
	})
	var serveAddr string
	poll.Until(t, 60*time.Second, func() error {
		var resp struct {
			Nodes []struct {
				Name      string `json:"name"`
				ServeAddr string `json:"serve_addr"`
			} `json:"nodes"`
		}
		if err := procs.CLIJSON(ctx, t, plain.RPCAddr(), &resp, "nodes"); err != nil {
			return err
		}
		got := map[string]string{}
		for _, n := range resp.Nodes {
			got[n.Name] = n.ServeAddr
		}
		serveAddr = got["agent-1"]
		if len(got) != 2 || !strings.HasPrefix(serveAddr, "127.0.0.2:") || got["agent-2"] != "" {
			return fmt.Errorf("serve addresses in gpumesh nodes: %v", got)
		}
		return nil
	})
	out, stderr, err := procs.CLI(ctx, t, plain.RPCAddr(), "nodes")
	if err != nil || !strings.Contains(out, "SERVE ADDR") || !strings.Contains(out, serveAddr) {
		t.Fatalf("gpumesh nodes: %v %s\n%s", err, stderr, out)
	}
	resp, err := http.Get("http://" + serveAddr + "/svc/crasher/")
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()

	spec := filepath.Join(t.TempDir(), "crasher.yaml")
	if err := os.WriteFile(spec, []byte(`
name: crasher
type: service
replicas: 1
restart: {delay: 200ms, max_delay: 1s}
exec:
  command: [/bin/sh, -c, "echo no model here >&2; exit 3"]
`), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, stderr, err := procs.CLI(ctx, t, plain.RPCAddr(), "job", "run", "--detach", spec); err != nil {
		t.Fatalf("job run: %v %s\n%s", err, stderr, out)
	}
	poll.Until(t, 60*time.Second, func() error {
		out, stderr, err = procs.CLI(ctx, t, plain.RPCAddr(), "service", "status", "crasher")
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		if !strings.Contains(out, "replica 0 crash-looping: ") || !strings.Contains(out, "failures in a row (the last failed, exit 3; never healthy)") {
			return fmt.Errorf("no crash loop shown yet:\n%s", out)
		}
		return nil
	})
	t.Logf("gpumesh service status crasher:\n%s", out)
	for _, want := range []string{
		"running, 1 replica wanted, routed at /svc/crasher/",
		"reach it through any node:",
		"http://" + serveAddr + "/svc/crasher/",
		"http://" + plain.HTTPAddr() + "/svc/crasher/",
	} {
		if !strings.Contains(out, want) {
			t.Fatalf("service status lacks %q:\n%s", want, out)
		}
	}
	if list, stderr, err := procs.CLI(ctx, t, plain.RPCAddr(), "service", "list"); err != nil || !strings.Contains(list, "running, 1 crash-looping") {
		t.Fatalf("service list: %v %s\n%s", err, stderr, list)
	}
	// The logs command it points at shows why (the replica's stderr, on
	// the command's stderr).
	var logsCmd []string
	for _, line := range strings.Split(out, "\n") {
		if f := strings.Fields(line); len(f) > 3 && f[0] == "its" && f[1] == "output:" {
			logsCmd = f[3:] // job logs ...
		}
	}
	if logs, stderr, err := procs.CLI(ctx, t, plain.RPCAddr(), logsCmd...); err != nil || !strings.Contains(stderr, "no model here") {
		t.Fatalf("%v: %v %s\n%q", logsCmd, err, stderr, logs)
	}
	if resp.StatusCode != http.StatusNotFound {
		t.Fatalf("the advertised serve address answered %d for an unknown service, want 404", resp.StatusCode)
	}
}
