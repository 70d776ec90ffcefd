package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node/driver"
)

type peersJSON struct {
	Peers []struct {
		ID       string `json:"id"`
		NodeName string `json:"node_name"`
		Suffrage string `json:"suffrage"`
		Leader   bool   `json:"leader"`
	} `json:"peers"`
}

// startAgents starts n agents on 127.0.0.2, 127.0.0.3, ... as processes.
func startAgents(t *testing.T, n int) []*procs.Agent {
	t.Helper()
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_ = driver.KillAll(ctx, dir)
	})
	var as []*procs.Agent
	for i := 0; i < n; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i+2)
		as = append(as, procs.NewAgent(t, dir, fmt.Sprintf("agent-%d", i+1), ip, "--bootstrap-expect", "3"))
	}
	for i, a := range as {
		for j, b := range as {
			if i != j {
				a.Args = append(a.Args, "--join", b.GossipAddr())
			}
		}
		a.Start()
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 4000))
			}
		}
	})
	return as
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

func leaderOf(t *testing.T, as []*procs.Agent) (*procs.Agent, error) {
	for _, a := range as {
		if !a.Running() {
			continue
		}
		var p peersJSON
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := procs.CLIJSON(ctx, t, a.RPCAddr(), &p, "raft", "peers", "--timeout", "2s")
		cancel()
		if err != nil {
			continue
		}
		for _, peer := range p.Peers {
			if peer.Leader {
				for _, b := range as {
					if b.Name == peer.NodeName && b.Running() {
						return b, nil
					}
				}
			}
		}
	}
	return nil, fmt.Errorf("no running agent leads")
}

// The multi-process acceptance test: 3 agents, SIGKILL the leader,
// a job submitted to a survivor is accepted, the killed agent restarted with
// its data dir rejoins with the state.
func TestProcessesSurviveLeaderKill(t *testing.T) {
	as := startAgents(t, 3)
	var leader *procs.Agent
	procs.Eventually(t, 30*time.Second, func() (err error) {
		leader, err = leaderOf(t, as)
		return err
	})
	spec := filepath.Join(t.TempDir(), "job.yaml")
	if err := os.WriteFile(spec, []byte("name: e2e\nranks: 2\nexec: {command: [sh, -c, 'echo rank $RANK of $WORLD_SIZE']}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	var first struct {
		ID string `json:"id"`
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := procs.CLIJSON(ctx, t, leader.RPCAddr(), &first, "job", "run", "--detach", spec); err != nil {
		t.Fatal(err)
	}

	leader.Kill()
	var survivor *procs.Agent
	for _, a := range as {
		if a.Running() {
			survivor = a
			break
		}
	}
	var second struct {
		ID string `json:"id"`
	}
	if err := procs.CLIJSON(ctx, t, survivor.RPCAddr(), &second, "job", "run", "--detach", spec); err != nil {
		t.Fatalf("submission to a survivor after SIGKILL of the leader: %v", err)
	}
	procs.Eventually(t, 30*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "status", second.ID)
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		if !strings.Contains(out, "complete") {
			return fmt.Errorf("job not complete yet:\n%s", out)
		}
		return nil
	})

	// The killed agent comes back with its data dir and catches up.
	leader.Start()
	procs.Eventually(t, 30*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, leader.RPCAddr(), "job", "list", "--stale")
		if err != nil {
			return fmt.Errorf("%v: %s", err, stderr)
		}
		if !strings.Contains(out, first.ID) || !strings.Contains(out, second.ID) {
			return fmt.Errorf("restarted agent's replica lacks the jobs:\n%s", out)
		}
		return nil
	})
	var p peersJSON
	if err := procs.CLIJSON(ctx, t, leader.RPCAddr(), &p, "raft", "peers"); err != nil {
		t.Fatal(err)
	}
	found := false
	for _, peer := range p.Peers {
		if peer.NodeName == leader.Name {
			found = true
		}
	}
	if !found {
		t.Fatalf("restarted agent is not a raft peer: %+v", p)
	}
	for _, a := range as {
		if err := a.Signal(syscall.SIGTERM, 10*time.Second); err != nil {
			t.Error(err)
		}
	}
}
