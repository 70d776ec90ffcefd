// Command mesh benchmarks gossip membership: how long an in-process mesh
// of N nodes on loopback takes until every node lists every other as
// alive (all nodes join at once), and how long until every survivor sees
// a killed node (shut down without leaving) as dead.
//
//	go run ./bench/mesh -nodes 50 -trials 20
//	go run ./bench/mesh -nodes 20 -trials 20 -preset memberlist-lan -seeds 1
//
// Presets: "lan" is mesh.DefaultLANConfig (the agent default);
// "memberlist-lan" is memberlist's own DefaultLANConfig timings with no
// post-join syncs, the baseline. Only 127.0.0.1 is used.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/mesh"
	"github.com/hashicorp/go-hclog"
)

func main() {
	nodes := flag.Int("nodes", 50, "nodes per trial")
	trials := flag.Int("trials", 20, "trials")
	seeds := flag.Int("seeds", 3, "how many of the first nodes every joiner is given as --join addresses")
	preset := flag.String("preset", "lan", "timing preset: lan | memberlist-lan")
	timeout := flag.Duration("timeout", 120*time.Second, "give up on one phase of a trial after this long")
	kill := flag.Bool("kill", true, "after convergence, kill one node and time its detection")
	verbose := flag.Bool("v", false, "log memberlist warnings to stderr")
	flag.BoolVar(&diag, "diag", false, "print which node misses which 2 s and 10 s after the joins start")
	flag.IntVar(&syncRounds, "sync", -1, "override JoinSyncRounds (-1: the preset's)")
	flag.Parse()

	var joinTimes, deadTimes []time.Duration
	var failures []string
	for t := 0; t < *trials; t++ {
		j, d, err := trial(t, *nodes, *seeds, *preset, *timeout, *kill, *verbose)
		if err != nil {
			failures = append(failures, fmt.Sprintf("trial %d: %v", t, err))
		}
		if j > 0 {
			joinTimes = append(joinTimes, j)
		}
		if d > 0 {
			deadTimes = append(deadTimes, d)
		}
		fmt.Printf("trial %2d: all see all %v, all see killed node dead %v (load average %s)\n", t, j.Round(time.Millisecond), d.Round(time.Millisecond), loadavg())
	}
	fmt.Printf("\npreset=%s nodes=%d seeds=%d trials=%d\n", *preset, *nodes, *seeds, *trials)
	report("converge (every node lists all N alive)", joinTimes)
	if *kill {
		report("detect (every survivor lists the killed node dead)", deadTimes)
	}
	for _, f := range failures {
		fmt.Println("FAILED", f)
	}
	if len(failures) > 0 {
		os.Exit(1)
	}
}

// loadavg returns the 1-minute load average: other work on the machine
// slows an in-process mesh, so each trial prints it.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "?"
	}
	return strings.Fields(string(b))[0]
}

func report(what string, d []time.Duration) {
	if len(d) == 0 {
		fmt.Printf("%s: no data\n", what)
		return
	}
	s := slices.Clone(d)
	slices.Sort(s)
	fmt.Printf("%s: n=%d min %v median %v p90 %v max %v\n", what, len(s),
		s[0].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond),
		s[len(s)*9/10].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond))
}

var (
	syncRounds = -1
	diag       bool
)

// missing prints, at 2 s (and 10 s) after the joins started, which node
// still misses which (nodes are numbered in creation order; node 0 is the first seed).
func missing(ms []*mesh.Mesh, at time.Duration) int {
	idx := map[string]int{}
	for i, m := range ms {
		idx[m.Name()] = i
	}
	var pairs []string
	for i, m := range ms {
		seen := map[string]bool{}
		for _, mem := range m.Members() {
			if mem.State == mesh.StateAlive || mem.State == mesh.StateSuspect {
				seen[mem.Name] = true
			}
		}
		for j, o := range ms {
			if !seen[o.Name()] {
				pairs = append(pairs, fmt.Sprintf("%d misses %d", i, j))
			}
		}
	}
	if len(pairs) > 0 {
		fmt.Printf("  at %v: %d (observer, missing) pairs: %s\n", at, len(pairs), strings.Join(pairs, "; "))
	}
	return len(pairs)
}

func config(preset string, name string, verbose bool) mesh.Config {
	c := mesh.DefaultLANConfig()
	c.BindAddr, c.BindPort = "127.0.0.1", 0
	c.JoinRetryMin, c.JoinRetryMax = 20*time.Millisecond, 500*time.Millisecond
	switch preset {
	case "lan":
	case "memberlist-lan":
		c.ProbeInterval, c.ProbeTimeout = time.Second, 500*time.Millisecond
		c.SuspicionMult, c.SuspicionMaxTimeoutMult = 4, 6
		c.GossipInterval, c.GossipNodes, c.RetransmitMult = 200*time.Millisecond, 3, 4
		c.PushPullInterval, c.GossipToTheDeadTime = 30*time.Second, 30*time.Second
		c.TCPTimeout, c.DeadNodeReclaimTime = 10*time.Second, 0
		c.JoinSyncRounds = 0
	default:
		fmt.Fprintf(os.Stderr, "unknown preset %q: use lan or memberlist-lan\n", preset)
		os.Exit(2)
	}
	if syncRounds >= 0 {
		c.JoinSyncRounds = syncRounds
	}
	c.NodeName, c.NodeID = name, "id-"+name
	c.Meta = mesh.Meta{
		InstanceType: "p5.48xlarge", AvailabilityZone: "us-east-1a", Region: "us-east-1",
		Lifecycle: mesh.LifecycleSpot, ServerEligible: true, Version: "bench",
		Addrs: mesh.Addresses{RPC: "127.0.0.1:7947", Raft: "127.0.0.1:7948", HTTP: "127.0.0.1:7949"},
	}
	for i := 0; i < 8; i++ {
		c.Meta.GPUs = append(c.Meta.GPUs, mesh.GPU{Model: "NVIDIA H100 80GB HBM3", MemoryBytes: 85520809984})
	}
	if verbose {
		c.Logger = hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Warn, Output: os.Stderr})
	}
	return c
}

func trial(t, n, seeds int, preset string, timeout time.Duration, kill, verbose bool) (join, dead time.Duration, err error) {
	ms := make([]*mesh.Mesh, n)
	defer func() {
		var wg sync.WaitGroup
		for _, m := range ms {
			if m != nil {
				wg.Add(1)
				go func() { defer wg.Done(); m.Shutdown() }()
			}
		}
		wg.Wait()
	}()
	for i := range ms {
		m, err := mesh.New(config(preset, fmt.Sprintf("t%d-n%02d", t, i), verbose))
		if err != nil {
			return 0, 0, err
		}
		ms[i] = m
	}
	if seeds < 1 {
		seeds = 1
	}
	var seedAddrs []string
	for i := 0; i < seeds && i < n; i++ {
		seedAddrs = append(seedAddrs, ms[i].Addr())
	}

	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	start := time.Now()
	joinErr := make(chan error, n)
	for i := 1; i < n; i++ {
		go func() {
			_, err := ms[i].Join(ctx, seedAddrs)
			joinErr <- err
		}()
	}
	diagDone := make(chan struct{})
	joinStart := start
	if diag {
		go func() {
			defer close(diagDone)
			for _, at := range []time.Duration{2 * time.Second, 10 * time.Second} {
				time.Sleep(at - time.Since(joinStart))
				if missing(ms, at) == 0 {
					return
				}
			}
		}()
	} else {
		close(diagDone)
	}
	defer func() { <-diagDone }()
	if !waitAll(ctx, ms, func(m *mesh.Mesh) bool { return m.NumAlive() == n }) {
		return 0, 0, fmt.Errorf("not converged after %v: alive counts %v", timeout, counts(ms))
	}
	join = time.Since(start)
	for i := 1; i < n; i++ {
		if err := <-joinErr; err != nil {
			return join, 0, fmt.Errorf("join: %w", err)
		}
	}
	if !kill {
		return join, 0, nil
	}
	victim := ms[n-1]
	name := victim.Name()
	start = time.Now()
	victim.Shutdown()
	survivors := ms[:n-1]
	ctx2, cancel2 := context.WithTimeout(context.Background(), timeout)
	defer cancel2()
	if !waitAll(ctx2, survivors, func(m *mesh.Mesh) bool {
		mem, ok := m.Member(name)
		return ok && mem.State == mesh.StateDead
	}) {
		return join, 0, fmt.Errorf("killed node not seen dead by all after %v", timeout)
	}
	return join, time.Since(start), nil
}

// waitAll polls until cond holds for every mesh, checking each one only
// until it first holds.
func waitAll(ctx context.Context, ms []*mesh.Mesh, cond func(*mesh.Mesh) bool) bool {
	done := make([]bool, len(ms))
	left := len(ms)
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		for i, m := range ms {
			if !done[i] && cond(m) {
				done[i] = true
				left--
			}
		}
		if left == 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-tick.C:
		}
	}
}

func counts(ms []*mesh.Mesh) string {
	var b strings.Builder
	for _, m := range ms {
		fmt.Fprintf(&b, "%d ", m.NumAlive())
	}
	return b.String()
}
