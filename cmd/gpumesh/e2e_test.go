package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
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
func startAgents(t *testing.T, n int, args ...string) []*procs.Agent {
	t.Helper()
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < n; i++ {
		ip := fmt.Sprintf("127.0.0.%d", i+2)
		as = append(as, procs.NewAgent(t, dir, fmt.Sprintf("agent-%d", i+1), ip, append([]string{"--bootstrap-expect", "3"}, args...)...))
	}
	procs.StartJoined(as)
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
	poll.Until(t, 30*time.Second, func() (err error) {
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
	poll.Until(t, 30*time.Second, func() error {
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
	poll.Until(t, 30*time.Second, func() error {
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

type jobJSON struct {
	Job struct {
		ID         string `json:"id"`
		Status     string `json:"status"`
		Generation uint64 `json:"generation"`
		WorldSize  int    `json:"world_size"`
	} `json:"job"`
	Allocations []struct {
		Generation   uint64 `json:"generation"`
		Rank         int    `json:"rank"`
		NodeName     string `json:"node_name"`
		ClientStatus string `json:"client_status"`
	} `json:"allocations"`
}

// Issue 3's acceptance: SIGKILL the agent holding rank 1 of a long-running
// 2-rank job; the job runs again as generation 2 on the remaining agents
// within 10 s, and the logs of both generations can be read. The node
// loss grace is short here: this is the node-loss path (the default grace
// would keep the generation for 30 s, waiting for the agent to return).
func TestProcessesReplaceRanksOfKilledNode(t *testing.T) {
	as := startAgents(t, 3, "--node-loss-grace", "1s")
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	spec := filepath.Join(t.TempDir(), "job.yaml")
	if err := os.WriteFile(spec, []byte("name: long\nranks: 2\nplacement: spread\nexec: {command: [sh, -c, 'echo gen $GPUMESH_GENERATION rank $RANK of $WORLD_SIZE; exec sleep 600']}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	var sub struct {
		ID string `json:"id"`
	}
	if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &sub, "job", "run", "--detach", spec); err != nil {
		t.Fatal(err)
	}
	var victim *procs.Agent
	poll.Until(t, 30*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		running := 0
		for _, al := range j.Allocations {
			if al.ClientStatus == "running" {
				running++
			}
			if al.Rank == 1 {
				for _, a := range as {
					if a.Name == al.NodeName {
						victim = a
					}
				}
			}
		}
		if running != 2 || victim == nil {
			return fmt.Errorf("want 2 running ranks, have %d", running)
		}
		return nil
	})
	var survivor *procs.Agent
	for _, a := range as {
		if a != victim {
			survivor = a
		}
	}
	killed := time.Now()
	victim.Kill()
	var elapsed time.Duration
	poll.Until(t, 30*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, survivor.RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		running := 0
		for _, al := range j.Allocations {
			if al.Generation == 2 && al.ClientStatus == "running" {
				if al.NodeName == victim.Name {
					return fmt.Errorf("generation 2 placed on the dead node")
				}
				running++
			}
		}
		if running != 2 {
			return fmt.Errorf("generation 2 has %d running ranks (job %s gen %d)", running, j.Job.Status, j.Job.Generation)
		}
		elapsed = time.Since(killed)
		return nil
	})
	t.Logf("generation 2 running on the survivors %v after SIGKILL", elapsed.Round(time.Millisecond))
	if elapsed > 10*time.Second {
		t.Errorf("re-placement took %v, want under 10 s", elapsed)
	}
	// Generation 2 logs, and generation 1's rank 0 from a survivor.
	for _, c := range []struct{ rank, gen, want string }{{"0", "2", "gen 2 rank 0 of 2"}, {"1", "2", "gen 2 rank 1 of 2"}} {
		poll.Until(t, 10*time.Second, func() error {
			out, stderr, err := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "logs", sub.ID, "--rank", c.rank, "--generation", c.gen)
			if err != nil || !strings.Contains(out, c.want) {
				return fmt.Errorf("logs rank %s gen %s: %q %s %v", c.rank, c.gen, out, stderr, err)
			}
			return nil
		})
	}
	// The killed agent comes back; generation 1's rank 1 logs are readable
	// from it, and its orphaned task is stopped (the scheduler wants it gone).
	victim.Start()
	poll.Until(t, 30*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "logs", sub.ID, "--rank", "1", "--generation", "1")
		if err != nil || !strings.Contains(out, "gen 1 rank 1 of 2") {
			return fmt.Errorf("gen 1 rank 1 logs: %q %s %v", out, stderr, err)
		}
		return nil
	})
	if _, stderr, err := procs.CLI(ctx, t, survivor.RPCAddr(), "job", "stop", sub.ID); err != nil {
		t.Fatalf("stop: %v %s", err, stderr)
	}
}

// An agent restart keeps its job: SIGKILL the agent (only its process; its
// exec task lives on) of a rank of a running 2-rank job and start it again
// within the node loss grace. The leader marks the node down meanwhile, yet
// generation 1 goes on, the restarted agent adopts the task, and the task
// is not started a second time.
func TestProcessesAgentRestartKeepsGeneration(t *testing.T) {
	as := startAgents(t, 3, "--node-loss-grace", "60s")
	poll.Until(t, 30*time.Second, func() error { _, err := leaderOf(t, as); return err })
	spec := filepath.Join(t.TempDir(), "job.yaml")
	if err := os.WriteFile(spec, []byte("name: keep\nranks: 2\nplacement: spread\nexec: {command: [sh, -c, 'echo started gen $GPUMESH_GENERATION rank $RANK; exec sleep 600']}\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	var sub struct {
		ID string `json:"id"`
	}
	if err := procs.CLIJSON(ctx, t, as[0].RPCAddr(), &sub, "job", "run", "--detach", spec); err != nil {
		t.Fatal(err)
	}
	leader, err := leaderOf(t, as)
	if err != nil {
		t.Fatal(err)
	}
	var victim *procs.Agent
	var victimRank string
	poll.Until(t, 30*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, leader.RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		running := 0
		for _, al := range j.Allocations {
			if al.ClientStatus != "running" {
				continue
			}
			running++
			for _, a := range as {
				if a.Name == al.NodeName && a != leader {
					victim, victimRank = a, strconv.Itoa(al.Rank)
				}
			}
		}
		if running != 2 || victim == nil {
			return fmt.Errorf("want 2 running ranks, one off the leader; have %d", running)
		}
		return nil
	})
	if err := victim.Signal(syscall.SIGKILL, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	// The leader sees the node down (the old scheduler moved the whole
	// generation at this point).
	poll.Until(t, 30*time.Second, func() error {
		if st := nodeStatus(ctx, t, leader, victim.Name); st != "down" {
			return fmt.Errorf("%s is %q, not down yet", victim.Name, st)
		}
		return nil
	})
	victim.Start()
	poll.Until(t, 60*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, victim.RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.Status != "running" || j.Job.Generation != 1 {
			return fmt.Errorf("job %s at generation %d, want running at generation 1", j.Job.Status, j.Job.Generation)
		}
		if st := nodeStatus(ctx, t, leader, victim.Name); st != "ready" {
			return fmt.Errorf("%s is %q, not ready again yet", victim.Name, st)
		}
		return nil
	})
	// Back and ready: still generation 1 with both ranks running, and the
	// task started once (its log has one "started" line).
	var j jobJSON
	if err := procs.CLIJSON(ctx, t, leader.RPCAddr(), &j, "job", "status", sub.ID); err != nil {
		t.Fatal(err)
	}
	for _, al := range j.Allocations {
		if al.Generation != 1 || al.ClientStatus != "running" {
			t.Fatalf("after the restart: rank %d of generation %d is %s", al.Rank, al.Generation, al.ClientStatus)
		}
	}
	out, stderr, err := procs.CLI(ctx, t, leader.RPCAddr(), "job", "logs", sub.ID, "--rank", victimRank, "--generation", "1")
	if err != nil {
		t.Fatalf("logs: %v %s", err, stderr)
	}
	if n := strings.Count(out, "started gen 1"); n != 1 {
		t.Fatalf("the adopted task started %d times: %q", n, out)
	}
	if _, stderr, err := procs.CLI(ctx, t, leader.RPCAddr(), "job", "stop", sub.ID); err != nil {
		t.Fatalf("stop: %v %s", err, stderr)
	}
}

// nodeStatus is a node's status in the cluster state as an agent answers it.
func nodeStatus(ctx context.Context, t *testing.T, a *procs.Agent, name string) string {
	var resp struct {
		Nodes []struct {
			Name   string `json:"name"`
			Status string `json:"status"`
		} `json:"nodes"`
	}
	if err := procs.CLIJSON(ctx, t, a.RPCAddr(), &resp, "nodes"); err != nil {
		return err.Error()
	}
	for _, n := range resp.Nodes {
		if n.Name == name {
			return n.Status
		}
	}
	return "missing"
}
