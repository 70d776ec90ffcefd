package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/mesh/meshtest"
	"github.com/gpumesh/gpumesh/node"
)

// TestClientCommandsAgainstDevCluster runs the client commands in this
// process against a 2-node dev cluster (CPU only, so a job that asks for a
// GPU can never be placed).
func TestClientCommandsAgainstDevCluster(t *testing.T) {
	if testing.Short() {
		t.Skip("starts a dev cluster; skipped with -short")
	}
	logger := meshtest.Logger(t, "dev")
	logger.SetLevel(hclog.Warn)
	dc, err := node.NewDevCluster(node.DevConfig{Nodes: 2, Logger: logger})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dc.Shutdown)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := dc.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	addr := dc.Agents[0].RPCAddr()
	dir := t.TempDir()
	spec := func(name, body string) string {
		p := filepath.Join(dir, name+".yaml")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hello := spec("hello", "name: hello\nranks: 2\nexec: {command: [\"true\"]}\n")
	gpu := spec("gpu", "name: gpu\nranks: 2\ngpus_per_rank: 1\nexec: {command: [\"true\"]}\n")
	cli := func(args ...string) (string, error) {
		return runCLI(t, append(args, "--address", addr)...)
	}
	exitCode := func(err error) int { return exitStatus(err, &bytes.Buffer{}) }

	t.Run("plan says where a spec would go", func(t *testing.T) {
		out, err := cli("job", "plan", hello)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !strings.Contains(out, "hello would be placed now: 2 ranks on 1 node") || !regexp.MustCompile(`(?m)^0\s+node-\d`).MatchString(out) {
			t.Fatalf("plan output:\n%s", out)
		}
		out, err = cli("job", "plan", "--json", hello)
		var res planResult
		if err != nil || json.Unmarshal([]byte(out), &res) != nil || !res.Placeable || len(res.Ranks) != 2 || res.Ranks[0].NodeName == "" {
			t.Fatalf("plan --json: %v\n%s", err, out)
		}
	})
	t.Run("plan says why not, exits 2, submits nothing", func(t *testing.T) {
		out, err := cli("job", "plan", gpu)
		if exitCode(err) != exitNotPlaced {
			t.Fatalf("exit %d (%v), want %d\n%s", exitCode(err), err, exitNotPlaced, out)
		}
		if !strings.Contains(out, "gpu would wait: needs 2 GPUs") {
			t.Fatalf("plan output:\n%s", out)
		}
		if out, _ := cli("job", "list"); !strings.Contains(out, "no jobs") {
			t.Fatalf("plan submitted something:\n%s", out)
		}
	})
	t.Run("run gives up on a job that cannot be placed", func(t *testing.T) {
		out, err := cli("job", "run", "--place-timeout", "1s", gpu)
		if exitCode(err) != exitNotPlaced {
			t.Fatalf("exit %d (%v), want %d\n%s", exitCode(err), err, exitNotPlaced, out)
		}
		for _, want := range []string{"pending: waiting for capacity: needs 2 GPUs", "Ctrl-C stops watching and leaves the job queued"} {
			if !strings.Contains(out, want) {
				t.Errorf("output does not say %q:\n%s", want, out)
			}
		}
		for _, want := range []string{"was not placed within 1s: waiting for capacity: needs 2 GPUs", "gpumesh job stop gpu-"} {
			if !strings.Contains(err.Error(), want) {
				t.Errorf("error does not say %q: %v", want, err)
			}
		}
		id := regexp.MustCompile(`gpu-[0-9a-f]{8}`).FindString(out)
		if _, err := cli("job", "stop", id); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("run --wait prints the all-reduce table", func(t *testing.T) {
		ar := spec("ar", "name: ar\ntype: allreduce\nranks: 2\nallreduce: {sizes: [4KiB, 64KiB], iters: 2, device: cpu}\n")
		out, err := cli("job", "run", "--wait", ar)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !regexp.MustCompile(`BUSBW\(GB/s\)\s+CHECK\n4KiB\s+float32.*ok\n64KiB\s+float32.*ok\n`).MatchString(out) {
			t.Fatalf("no result table:\n%s", out)
		}
		id := regexp.MustCompile(`job (ar-[0-9a-f]+) submitted`).FindStringSubmatch(out)
		if id == nil {
			t.Fatalf("no job ID in:\n%s", out)
		}
		// Stopping a job that already ended says so, not "stopping".
		if out, err := cli("job", "stop", id[1]); err != nil || !strings.Contains(out, "already ended (complete): nothing to stop") {
			t.Fatalf("job stop of an ended job: %v\n%s", err, out)
		}
	})
	t.Run("pipeline results are a table", func(t *testing.T) {
		pl := spec("pl", "name: pl\ntype: pipeline\nranks: 2\npipeline: {layers: [8, 16, 4], microbatches: 2, microbatch_size: 2, steps: 2}\n")
		out, err := cli("job", "run", "--wait", pl)
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		for _, re := range []string{`pipeline: 2 stages, schedule 1f1b, train on cpu, 2 steps`, `STAGE\s+NODE\s+LAYERS\s+SAMPLES/S`, `(?m)^0\s+node-\d\s+0\s`, `(?m)^1\s+node-\d\s+1\s`, `loss: `} {
			if !regexp.MustCompile(re).MatchString(out) {
				t.Errorf("output lacks %s:\n%s", re, out)
			}
		}
		if strings.Contains(out, "param_sum=") {
			t.Errorf("raw dump:\n%s", out)
		}
	})
	t.Run("json numbers are numbers", func(t *testing.T) {
		out, err := cli("job", "list", "--json")
		if err != nil {
			t.Fatal(err)
		}
		if strings.Contains(out, ":  ") {
			t.Errorf("doubled spaces:\n%s", out)
		}
		var v struct {
			Jobs []map[string]any `json:"jobs"`
		}
		if err := json.Unmarshal([]byte(out), &v); err != nil || len(v.Jobs) == 0 {
			t.Fatalf("%v\n%s", err, out)
		}
		for _, j := range v.Jobs {
			if _, ok := j["generation"].(float64); !ok {
				t.Errorf("generation is %T (%v), want a number", j["generation"], j["generation"])
			}
		}
	})
	t.Run("transfer-leadership names the new leader", func(t *testing.T) {
		out, err := cli("raft", "transfer-leadership")
		if err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		if !regexp.MustCompile(`leader is now node-\d \([0-9a-f]+\)`).MatchString(out) {
			t.Fatalf("output: %s", out)
		}
	})
	t.Run("address columns say which address", func(t *testing.T) {
		for cmd, col := range map[string]string{"members": "GOSSIP ADDR", "nodes": "RPC ADDR", "raft peers": "RAFT ADDR"} {
			out, err := cli(strings.Fields(cmd)...)
			if err != nil || !strings.Contains(out, col) {
				t.Errorf("%s: %v\n%s", cmd, err, out)
			}
		}
	})
	if errors.Is(ctx.Err(), context.DeadlineExceeded) {
		t.Fatal("the test ran out of time")
	}
}
