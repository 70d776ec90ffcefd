package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/deploy/aemmtest"
	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// Issue 7's end-to-end test: four agents on loopback; agent-1 — the leader,
// a voter, and host of a rank of a running job — reads an
// ec2-metadata-mock (IMDSv2 only) whose spot interruption notice fires after
// a few seconds. Before the deadline: the job runs again at generation + 1
// on the other agents, leadership has moved, a new voter is in place, and
// the interrupted rank got SIGTERM with its deadline.
func TestSpotInterruptionDrainsLeader(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	const noticeDelay = 40 * time.Second
	procs.Binary(t) // build first: the notice's clock starts with the mock
	aemmtest.Binary(t)
	mock := aemmtest.Start(t, aemmtest.Options{SpotDelay: noticeDelay, RebalanceDelay: time.Hour, IPCount: -1, Values: map[string]string{
		"instance-life-cycle": "spot", "instance-type": "p5.48xlarge", "placement-availability-zone": "us-east-1a",
	}})
	noticeAt := time.Now().Add(noticeDelay)

	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < 4; i++ {
		name := fmt.Sprintf("agent-%d", i+1)
		args := []string{"--bootstrap-expect", "3", "--max-ranks-per-node", "4"}
		if i == 0 {
			args = append(args, "--imds-endpoint", mock, "--imds-poll", "500ms")
		} else {
			args = append(args, "--ec2", "off", "--lifecycle", "spot", "--az", "us-east-1a")
		}
		a := procs.NewAgent(t, dir, name, fmt.Sprintf("127.0.0.%d", i+2), args...)
		// Node IDs order the bootstrap set: agent-1 sorts first, so it votes.
		if err := os.MkdirAll(a.DataDir, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(a.DataDir, "node-id"), []byte(fmt.Sprintf("%016d\n", i+1)), 0o644); err != nil {
			t.Fatal(err)
		}
		as = append(as, a)
	}
	procs.StartJoined(as)
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 8000))
			}
		}
	})
	victim := as[0]
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	poll.Until(t, 30*time.Second, func() error {
		var p peersJSON
		if err := procs.CLIJSON(ctx, t, as[1].RPCAddr(), &p, "raft", "peers"); err != nil {
			return err
		}
		voters := 0
		for _, peer := range p.Peers {
			if peer.Suffrage == "voter" {
				voters++
			}
		}
		if voters != 3 {
			return fmt.Errorf("%d voters", voters)
		}
		return nil
	})
	poll.Until(t, 30*time.Second, func() error {
		if l, err := leaderOf(t, as); err == nil && l == victim {
			return nil
		}
		if _, stderr, err := procs.CLI(ctx, t, as[1].RPCAddr(), "raft", "transfer-leadership", "--to", victim.Name); err != nil {
			return fmt.Errorf("%v %s", err, stderr)
		}
		return fmt.Errorf("leader is not %s yet", victim.Name)
	})

	spec := filepath.Join(t.TempDir(), "job.yaml")
	script := `trap 'echo "SIGTERM, deadline $(cat $GPUMESH_PREEMPT_DEADLINE_FILE)"; exit 0' TERM; echo "gen $GPUMESH_GENERATION rank $RANK"; while :; do sleep 0.2; done`
	specJSON, _ := json.Marshal(map[string]any{"name": "spot", "ranks": 4, "placement": "spread", "exec": map[string]any{"command": []string{"sh", "-c", script}}})
	if err := os.WriteFile(spec, specJSON, 0o644); err != nil {
		t.Fatal(err)
	}
	var sub struct {
		ID string `json:"id"`
	}
	if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &sub, "job", "run", "--detach", spec); err != nil {
		t.Fatal(err)
	}
	victimRank := -1
	poll.Until(t, 30*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		running := 0
		for _, al := range j.Allocations {
			if al.ClientStatus == "running" {
				running++
				if al.NodeName == victim.Name {
					victimRank = al.Rank
				}
			}
		}
		if running != 4 || victimRank < 0 {
			nodes, _, _ := procs.CLI(ctx, t, as[2].RPCAddr(), "nodes")
			return fmt.Errorf("%d ranks running, victim rank %d; nodes:\n%s", running, victimRank, nodes)
		}
		return nil
	})
	if time.Now().After(noticeAt) {
		t.Fatalf("the cluster took too long to set up: the notice has fired already")
	}

	// The notice fires; everything must move off agent-1.
	var elapsed time.Duration
	poll.Until(t, 60*time.Second, func() error {
		if time.Now().Before(noticeAt) {
			return fmt.Errorf("notice not due yet")
		}
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.Generation == 1 {
			return fmt.Errorf("still generation 1")
		}
		running := 0
		for _, al := range j.Allocations {
			if al.Generation != j.Job.Generation {
				continue
			}
			if al.NodeName == victim.Name {
				return fmt.Errorf("generation %d placed a rank on the interrupted node", j.Job.Generation)
			}
			if al.ClientStatus == "running" {
				running++
			}
		}
		if running != 4 {
			return fmt.Errorf("generation %d: %d of 4 ranks running", j.Job.Generation, running)
		}
		elapsed = time.Since(noticeAt)
		return nil
	})
	t.Logf("job's new generation running on all ranks %v after the notice", elapsed.Round(time.Millisecond))
	if elapsed > 15*time.Second {
		t.Errorf("took %v from the notice to the new generation, want under 15 s", elapsed)
	}
	poll.Until(t, 30*time.Second, func() error {
		var p peersJSON
		if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &p, "raft", "peers"); err != nil {
			return err
		}
		voters := 0
		for _, peer := range p.Peers {
			if peer.Leader && peer.NodeName == victim.Name {
				return fmt.Errorf("agent-1 still leads")
			}
			if peer.Suffrage == "voter" {
				if peer.NodeName == victim.Name {
					return fmt.Errorf("agent-1 still votes")
				}
				voters++
			}
		}
		if voters != 3 {
			return fmt.Errorf("%d voters, want 3", voters)
		}
		return nil
	})
	t.Logf("leadership moved and a new voter in place %v after the notice", time.Since(noticeAt).Round(time.Millisecond))
	poll.Until(t, 20*time.Second, func() error {
		out, stderr, err := procs.CLI(ctx, t, as[2].RPCAddr(), "job", "logs", sub.ID, "--rank", fmt.Sprint(victimRank), "--generation", "1")
		if err != nil || !strings.Contains(out, "SIGTERM, deadline ") {
			return fmt.Errorf("interrupted rank's log: %q %s %v", out, stderr, err)
		}
		return nil
	})
	var nodes struct {
		Nodes []struct {
			Name   string `json:"name"`
			Status string `json:"status"`
		} `json:"nodes"`
	}
	if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &nodes, "nodes"); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Nodes {
		if n.Name == victim.Name && n.Status != "draining" {
			t.Errorf("agent-1 status %q, want draining", n.Status)
		}
	}
}
