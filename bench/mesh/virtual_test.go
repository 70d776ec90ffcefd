package main

// The virtual-time simulation: the same trials as `-transport mem`, each
// run inside a testing/synctest bubble. There, time.Now, timers, tickers
// and sleeps follow a virtual clock that advances only when every
// goroutine of the bubble is durably blocked (on a channel, a select, a
// timer; not on a mutex or a system call). Every simulated node's
// processing therefore takes zero virtual time, however many nodes share
// this machine's cores: the model of N machines that each have a CPU of
// their own, which the 1,000-node target is about, instead of N
// nodes competing for 2 cores. Link delay and loss are the MemNetwork's
// (virtual timers); every memberlist timeout (probe, suspicion, TCP
// deadline) runs on the same clock.
//
//	go test ./bench/mesh -run TestVirtualMesh -v                          # 50 nodes, 1 trial (CI)
//	go test ./bench/mesh -run TestVirtualMesh -v -timeout 0 \
//	    -args -virtual.nodes 50,200,500,1000 -virtual.trials 10 -virtual.steady 10s
//
// Each trial prints the same line as the real-time benchmark (converge,
// detect and their phases in virtual time; false suspicions and deaths;
// steady gossip bytes and CPU per node per virtual second), plus the
// trial's real wall time and process CPU. The test fails when a trial
// misses the targets: every node sees every other alive within
// 5 s of a mass join, a killed node is seen dead by all within 5 s, no
// live node is declared dead. These are virtual durations, set by the
// protocol's timers alone; the machine's speed and load only change how
// long the run takes.

import (
	"flag"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gpumesh/gpumesh/mesh"
)

var (
	virtualNodes  = flag.String("virtual.nodes", "50", "TestVirtualMesh: mesh sizes to simulate, comma-separated")
	virtualTrials = flag.Int("virtual.trials", 1, "TestVirtualMesh: trials per size")
	virtualSteady = flag.Duration("virtual.steady", 2*time.Second, "TestVirtualMesh: virtual time between convergence and the kill (gossip bytes and CPU are measured in it)")
	virtualDelay  = flag.Duration("virtual.delay", 0, "TestVirtualMesh: one-way delay of every link")
	virtualLoss   = flag.Float64("virtual.loss", 0, "TestVirtualMesh: packet loss rate of every link (0..1)")
	virtualSettle = flag.Duration("virtual.settle", 0, "TestVirtualMesh: virtual time after convergence before the steady window begins (4s: after the post-join syncs)")
	virtualSeeds  = flag.Int("virtual.seeds", 3, "TestVirtualMesh: how many of the first nodes every joiner is given as join addresses")
	virtualDiag   = flag.Bool("virtual.diag", false, "TestVirtualMesh: print which node misses which 1-5 s and 10 s after the joins start")
)

// Targets of issue 22, in virtual time.
const (
	virtualConvergeTarget = 5 * time.Second
	virtualDetectTarget   = 5 * time.Second
)

// virtualDrain is how long the bubble's clock runs on after a trial has
// shut its nodes down, so that memberlist's goroutines still in a probe
// or a stream exchange reach their timeouts and exit (synctest fails a
// test whose bubble keeps goroutines blocked for good).
const virtualDrain = time.Minute

func TestVirtualMesh(t *testing.T) {
	var sizes []int
	for _, f := range strings.Split(*virtualNodes, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 2 {
			t.Fatalf("-virtual.nodes %q: want sizes of 2 or more, comma-separated", *virtualNodes)
		}
		sizes = append(sizes, n)
	}
	defer func(m bool, f mesh.LinkFault, a, c, d bool, n int, s time.Duration) {
		useMem, memFault, sizeAdapt, noCompress, diag, nodesFlag, settle = m, f, a, c, d, n, s
	}(useMem, memFault, sizeAdapt, noCompress, diag, nodesFlag, settle)
	useMem, sizeAdapt, noCompress, diag, settle = true, true, true, *virtualDiag, *virtualSettle
	memFault = mesh.LinkFault{Delay: *virtualDelay, Loss: *virtualLoss}

	for _, n := range sizes {
		t.Run(fmt.Sprintf("nodes=%d", n), func(t *testing.T) {
			nodesFlag = n
			c := config("lan", "x", false)
			fmt.Printf("virtual time: nodes=%d seeds=%d trials=%d delay=%v loss=%g; probe %v/%v indirect %d, suspicion mult %d, gossip %v × %d, retransmit %d, join peers %d, syncs %d from %v\n",
				n, *virtualSeeds, *virtualTrials, memFault.Delay, memFault.Loss, c.ProbeInterval, c.ProbeTimeout, c.IndirectChecks,
				c.SuspicionMult, c.GossipInterval, c.GossipNodes, c.RetransmitMult, c.JoinMaxPeers, c.JoinSyncRounds, c.JoinSyncDelay)
			var all []result
			for i := 0; i < *virtualTrials; i++ {
				var r result
				synctest.Test(t, func(t *testing.T) {
					r = trial(i, n, *virtualSeeds, "lan", 2*time.Minute, *virtualSteady, true, false)
					time.Sleep(virtualDrain)
				})
				all = append(all, r)
				printTrial(os.Stdout, i, r, "virtual time")
				checkVirtualTargets(t, i, r)
			}
			fmt.Printf("nodes=%d, %d trials in virtual time:\n", n, len(all))
			printSummary(os.Stdout, all, true, "process CPU / nodes, per virtual second")
		})
	}
}

// checkVirtualTargets fails t if trial i missed a target of issue 22.
func checkVirtualTargets(t *testing.T, i int, r result) {
	t.Helper()
	if r.err != nil {
		t.Errorf("trial %d: %v", i, r.err)
		return
	}
	if r.converge >= virtualConvergeTarget {
		t.Errorf("trial %d: every node saw every other alive after %v (virtual), target < %v", i, r.converge, virtualConvergeTarget)
	}
	if r.detect >= virtualDetectTarget {
		t.Errorf("trial %d: every survivor saw the killed node dead after %v (virtual), target < %v", i, r.detect, virtualDetectTarget)
	}
	if d := r.falseDead; d != [3]int{} {
		t.Errorf("trial %d: live nodes declared dead, (observer, node) pairs in join / steady / detect phase: %v, target 0", i, d)
	}
}
