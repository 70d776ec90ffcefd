package main

import (
	"context"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/internal/procs"
	"github.com/gpumesh/gpumesh/node"
)

type membersJSON struct {
	Members []struct {
		Name  string `json:"name"`
		Addr  string `json:"addr"`
		State string `json:"state"`
		Meta  struct {
			Status     string `json:"status"`
			Ineligible bool   `json:"ineligible"`
		} `json:"meta"`
	} `json:"members"`
}

// README's "A cluster on one machine", second form: three agents on
// 127.0.0.2-4 started without --name, joined as the README joins them,
// name themselves apart (host name plus address), form one cluster and run
// examples/allreduce.yaml with --wait. Before default names were unique,
// all three took the host name and never formed a cluster. Then the
// commands of the dev-cluster walk-through: hello.yaml, logs of every rank
// (with their write times), drain (members say draining) and drain
// --disable (ready again).
func TestProcessesReadmeAgentsNameThemselves(t *testing.T) {
	if testing.Short() {
		t.Skip("multi-process test; skipped with -short")
	}
	dir := t.TempDir()
	var as []*procs.Agent
	for i := 0; i < 3; i++ {
		a := procs.NewAgent(t, dir, fmt.Sprintf("g%d", i+1), fmt.Sprintf("127.0.0.%d", i+2))
		a.DefaultName = true
		as = append(as, a)
	}
	// As in README: the first joins the other two, they join the first.
	as[0].Args = append(as[0].Args, "--join", as[1].GossipAddr(), "--join", as[2].GossipAddr())
	as[1].Args = append(as[1].Args, "--join", as[0].GossipAddr())
	as[2].Args = append(as[2].Args, "--join", as[0].GossipAddr())
	for _, a := range as {
		a.Start()
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, a := range as {
				t.Logf("---- %s log ----\n%s", a.Name, tail(a.Logs(), 4000))
			}
		}
	})
	host, _ := os.Hostname()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	poll.Until(t, 60*time.Second, func() error {
		var m membersJSON
		if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &m, "members"); err != nil {
			return err
		}
		names := map[string]bool{}
		for _, mem := range m.Members {
			if mem.State == "alive" {
				names[mem.Name] = true
			}
		}
		for _, a := range as {
			want := node.DefaultNodeName(host, a.IP, a.Ports.Gossip)
			if !names[want] {
				return fmt.Errorf("no alive member %q in %+v", want, m.Members)
			}
		}
		if len(names) != 3 {
			return fmt.Errorf("want 3 alive members, got %+v", m.Members)
		}
		return nil
	})
	poll.Until(t, 60*time.Second, func() error { _, err := leaderOfNamed(t, as); return err })
	out, stderr, err := procs.CLI(ctx, t, as[1].RPCAddr(), "job", "run", "../../examples/allreduce.yaml", "--wait")
	if err != nil {
		t.Fatalf("job run examples/allreduce.yaml --wait: %v\n%s\n%s", err, out, stderr)
	}
	if !strings.Contains(out, "complete") {
		t.Fatalf("job run --wait did not report the job complete:\n%s", out)
	}

	// The commands of README's dev-cluster walk-through, against these agents.
	addr := as[0].RPCAddr()
	var sub struct {
		ID string `json:"id"`
	}
	if err := procs.CLIJSON(ctx, t, addr, &sub, "job", "run", "--detach", "../../examples/hello.yaml"); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 60*time.Second, func() error {
		var j jobJSON
		if err := procs.CLIJSON(ctx, t, addr, &j, "job", "status", sub.ID); err != nil {
			return err
		}
		if j.Job.Status != "complete" {
			return fmt.Errorf("job %s is %s", sub.ID, j.Job.Status)
		}
		return nil
	})
	out, stderr, err = procs.CLI(ctx, t, addr, "job", "logs", sub.ID, "--all", "--tail", "20")
	if err != nil || !strings.Contains(out, "[rank 0] rank 0 of 2") || !strings.Contains(out, "[rank 1] rank 1 of 2") {
		t.Fatalf("job logs --all: %v\n%s\n%s", err, out, stderr)
	}
	out, stderr, err = procs.CLI(ctx, t, addr, "job", "logs", sub.ID, "--all", "--timestamps")
	stamped := regexp.MustCompile(`(?m)^\[rank ([01])\] (\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) rank ([01]) of 2`)
	lines := stamped.FindAllStringSubmatch(out, -1)
	if err != nil || len(lines) != 2 {
		t.Fatalf("job logs --all --timestamps: %v\n%s\n%s", err, out, stderr)
	}
	for _, l := range lines {
		at, _ := time.Parse(time.RFC3339, l[2])
		if l[1] != l[3] || time.Since(at) > 10*time.Minute || time.Until(at) > time.Minute {
			t.Fatalf("job logs --timestamps: line %q: wrong rank or not a time of this test", l[0])
		}
	}
	drained := node.DefaultNodeName(host, as[1].IP, as[1].Ports.Gossip)
	if out, stderr, err := procs.CLI(ctx, t, addr, "node", "drain", drained, "--deadline", "2m"); err != nil {
		t.Fatalf("node drain: %v\n%s\n%s", err, out, stderr)
	}
	memberIs := func(want string) func() error {
		return func() error {
			var m membersJSON
			if err := procs.CLIJSON(ctx, t, as[2].RPCAddr(), &m, "members"); err != nil {
				return err
			}
			for _, mem := range m.Members {
				if mem.Name == drained {
					if mem.Meta.Status != want {
						return fmt.Errorf("members says %s is %s, want %s", drained, mem.Meta.Status, want)
					}
					return nil
				}
			}
			return fmt.Errorf("no member %s", drained)
		}
	}
	poll.Until(t, 30*time.Second, memberIs("draining"))
	if out, stderr, err := procs.CLI(ctx, t, addr, "node", "drain", "--disable", drained); err != nil {
		t.Fatalf("node drain --disable: %v\n%s\n%s", err, out, stderr)
	}
	poll.Until(t, 30*time.Second, memberIs("ready"))
}

// leaderOfNamed is leaderOf for agents that named themselves: it answers
// once any agent reports a Raft leader.
func leaderOfNamed(t *testing.T, as []*procs.Agent) (string, error) {
	for _, a := range as {
		var p peersJSON
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		err := procs.CLIJSON(ctx, t, a.RPCAddr(), &p, "raft", "peers", "--timeout", "2s")
		cancel()
		if err != nil {
			continue
		}
		for _, peer := range p.Peers {
			if peer.Leader {
				return peer.NodeName, nil
			}
		}
	}
	return "", fmt.Errorf("no agent reports a leader")
}
