// Command mesh benchmarks gossip membership: how long an in-process mesh
// of N nodes on loopback takes until every node lists every other as
// alive (all nodes join at once), and how long until every survivor sees
// a killed node (shut down without leaving) as dead, split into phases;
// and how many live nodes were wrongly suspected or declared dead.
//
//	go run ./bench/mesh -nodes 50 -trials 20
//	go run ./bench/mesh -nodes 50 -trials 20 -load 2
//	go run ./bench/mesh -nodes 20 -trials 20 -preset memberlist-lan -seeds 1
//
// Presets: "lan" is mesh.DefaultLANConfig (the agent default) moved to
// 127.0.0.1; "local" is mesh.DefaultLocalConfig (`gpumesh dev`, tests);
// "memberlist-lan" is memberlist's own DefaultLANConfig timings with no
// post-join syncs, the baseline. The -probe, -suspicion-mult, ... flags
// override single values of the preset. Only 127.0.0.1 is used.
//
// -transport mem runs the nodes on an in-memory network (mesh.MemNetwork)
// instead of loopback sockets, so that one process can hold 1,000 nodes;
// -delay and -loss set every link's one-way delay and packet loss there.
// With -size-adapt (the default) every node gets Config.ForSize(N), which
// leaves meshes of 64 nodes or fewer unchanged. Each trial prints the
// gossip bytes per node per second (memory transport only) and the
// process CPU per node during the steady phase.
//
//	go run ./bench/mesh -transport mem -nodes 1000 -trials 10 -steady 10s
//
// Those runs are in real time: N simulated nodes share this machine's
// cores, so above a few hundred nodes their probes miss deadlines for
// want of CPU, which N machines would not. TestVirtualMesh (virtual_test.go)
// runs the same trials on the memory transport inside a testing/synctest
// bubble, in virtual time, where each node's processing takes no time, as
// if each had a CPU of its own:
//
//	go test ./bench/mesh -run TestVirtualMesh -v -timeout 0 -args -virtual.nodes 1000 -virtual.trials 10
//
// The CPU-hog soak (10 minutes, 50 real-socket nodes, both cores held by
// hogs; every death in it is false; -hog-nice 5 runs the hogs 5 nicer
// than the mesh, as the agent's unit runs it at Nice=-5 against its tasks
// at 0):
//
//	go run ./bench/mesh -nodes 50 -load 2 -soak 10m [-hog-nice 5]
//
// Every trial also reports how long false deaths lasted, and how many
// lasted the scheduler's NodeLossGrace (-grace, 30 s) or more: a
// generation with a rank on such a node, seen dead so long by the
// leader, would be failed for a node loss.
//
// -load N starts N child processes (this binary again, with -hog) that
// spin on a CPU each, to reproduce a machine whose cores other work
// competes for; they die with this process. -waitload X waits before each
// trial until the 1-minute load average is under X (default N+1.5), with
// the hogs stopped meanwhile, so that other work on a shared machine is
// not mistaken for -load.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/signal"
	"regexp"
	"runtime"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/mesh"
	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// overrides of single preset values (zero: keep the preset's).
type overrides struct {
	probe, probeTimeout, gossip, joinSyncDelay time.Duration
	suspicionMult, suspicionMax, awareness     int
	gossipNodes, retransmit, indirect, sync    int
	failureSync, reconnect                     time.Duration // < 0: the preset's
}

var (
	diag       bool
	debugLog   bool
	ov         = overrides{sync: -1, failureSync: -1, reconnect: -1}
	useMem     bool
	memFault   mesh.LinkFault
	sizeAdapt  bool
	noCompress bool
	nodesFlag  int
	// nodeLossGrace: a false death that lasts this long would fail a
	// generation with a rank on that node (the scheduler's grace).
	nodeLossGrace = consensus.DefaultConfig().NodeLossGrace
	hogNice       int
	// settle: time after convergence before the steady window's bytes
	// and CPU are counted.
	settle time.Duration
	// stopProfile ends -cpuprofile; called before every exit.
	stopProfile = func() {}
)

func main() {
	nodes := flag.Int("nodes", 50, "nodes per trial")
	trials := flag.Int("trials", 20, "trials")
	seeds := flag.Int("seeds", 3, "how many of the first nodes every joiner is given as --join addresses")
	preset := flag.String("preset", "lan", "timing preset: lan | local | memberlist-lan")
	timeout := flag.Duration("timeout", 120*time.Second, "give up on one phase of a trial after this long")
	kill := flag.Bool("kill", true, "after convergence, kill one node and time its detection")
	steady := flag.Duration("steady", 2*time.Second, "idle time between convergence and the kill, in which any suspicion is a false one")
	load := flag.Int("load", 0, "CPU hogs: child processes that each spin on one CPU for the whole run")
	waitLoad := flag.Float64("waitload", -1, "before each trial wait until the 1-minute load average is under this (-1: -load + 1.5; 0: never wait)")
	hog := flag.Bool("hog", false, "internal: be a CPU hog (used by -load)")
	verbose := flag.Bool("v", false, "log memberlist warnings to stderr")
	flag.BoolVar(&debugLog, "debug", false, "log memberlist at debug level to time the first failed probe of the killed node (costs CPU)")
	flag.BoolVar(&diag, "diag", false, "print which node misses which 2 s and 10 s after the joins start")
	flag.IntVar(&ov.sync, "sync", -1, "override JoinSyncRounds (-1: the preset's)")
	flag.DurationVar(&ov.probe, "probe", 0, "override ProbeInterval")
	flag.DurationVar(&ov.failureSync, "failure-sync", -1, "override FailureSyncDelay (0: no push-pull after a death; -1: the preset's)")
	flag.DurationVar(&ov.reconnect, "reconnect", -1, "override ReconnectInterval (0: never rejoin failed members; -1: the preset's)")
	flag.DurationVar(&ov.probeTimeout, "probe-timeout", 0, "override ProbeTimeout")
	flag.DurationVar(&ov.gossip, "gossip", 0, "override GossipInterval")
	flag.DurationVar(&ov.joinSyncDelay, "sync-delay", 0, "override JoinSyncDelay")
	flag.IntVar(&ov.suspicionMult, "suspicion-mult", 0, "override SuspicionMult")
	flag.IntVar(&ov.suspicionMax, "suspicion-max", 0, "override SuspicionMaxTimeoutMult")
	flag.IntVar(&ov.awareness, "awareness", 0, "override AwarenessMaxMultiplier")
	flag.IntVar(&ov.gossipNodes, "gossip-nodes", 0, "override GossipNodes")
	flag.IntVar(&ov.retransmit, "retransmit", 0, "override RetransmitMult")
	flag.IntVar(&ov.indirect, "indirect", 0, "override IndirectChecks")
	transport := flag.String("transport", "udp", "udp: loopback sockets | mem: in-memory network (1,000 nodes in one process)")
	flag.DurationVar(&memFault.Delay, "delay", 0, "-transport mem: one-way delay of every link")
	flag.Float64Var(&memFault.Loss, "loss", 0, "-transport mem: packet loss rate of every link (0..1)")
	flag.BoolVar(&sizeAdapt, "size-adapt", true, "give every node mesh.Config.ForSize(-nodes)")
	cpuProfile := flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
	flag.BoolVar(&noCompress, "no-compress", true, "memberlist's message compression off (Config.NoCompression, the presets' default); -no-compress=false turns it on")
	flag.DurationVar(&settle, "settle", 0, "wait this long after convergence before the steady phase's bytes and CPU are measured (the post-join syncs end within 3.75 s)")
	flag.DurationVar(&nodeLossGrace, "grace", nodeLossGrace, "count false deaths that last this long (the scheduler's NodeLossGrace: a generation with a rank on that node would fail)")
	flag.IntVar(&hogNice, "hog-nice", 0, "run the -load hogs this much nicer than the mesh (5: as the agent's unit, Nice=-5, against its tasks at 0)")
	soak := flag.Duration("soak", 0, "soak: one trial, no kill, this long in the steady phase (every suspicion and death in it is false)")
	flag.Parse()
	switch *transport {
	case "udp":
	case "mem":
		useMem = true
	default:
		fmt.Fprintf(os.Stderr, "unknown -transport %q: use udp or mem\n", *transport)
		os.Exit(2)
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		stopProfile = func() { pprof.StopCPUProfile(); f.Close() }
	}
	if *soak > 0 {
		*trials, *kill, *steady = 1, false, *soak
	}

	if *hog {
		spin()
		return
	}
	if *waitLoad < 0 {
		*waitLoad = float64(*load) + 1.5
	}
	nodesFlag = *nodes
	stopHogs, pauseHogs, err := startHogs(*load)
	if err != nil {
		fmt.Fprintln(os.Stderr, "start CPU hogs:", err)
		os.Exit(1)
	}
	defer stopHogs()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		<-sig
		stopHogs()
		os.Exit(130)
	}()

	c := config(*preset, "x", false)
	smin, _ := c.SuspicionTimeouts(*nodes)
	fmt.Printf("transport=%s delay=%v loss=%g size-adapt=%v compression=%v hog-nice=%d\n", *transport, memFault.Delay, memFault.Loss, sizeAdapt, !noCompress, hogNice)
	fmt.Printf("preset=%s nodes=%d seeds=%d trials=%d load=%d hogs, GOMAXPROCS=%d; probe %v/%v indirect %d, suspicion mult %d (min %v at %d nodes, max ×%d), awareness ×%d, gossip %v × %d, retransmit %d, syncs %d from %v\n",
		*preset, *nodes, *seeds, *trials, *load, runtime.GOMAXPROCS(0), c.ProbeInterval, c.ProbeTimeout, c.IndirectChecks,
		c.SuspicionMult, smin.Round(time.Millisecond), *nodes, c.SuspicionMaxTimeoutMult, c.AwarenessMaxMultiplier,
		c.GossipInterval, c.GossipNodes, c.RetransmitMult, c.JoinSyncRounds, c.JoinSyncDelay)

	var all []result
	var failures []string
	var loads []float64
	for t := 0; t < *trials; t++ {
		if *waitLoad > 0 {
			waitForLoad(*waitLoad, pauseHogs)
		}
		l0 := loadavg()
		r := trial(t, *nodes, *seeds, *preset, *timeout, *steady, *kill, *verbose)
		if r.err != nil {
			failures = append(failures, fmt.Sprintf("trial %d: %v", t, r.err))
		}
		l1 := loadavg()
		loads = append(loads, l0, l1)
		all = append(all, r)
		printTrial(os.Stdout, t, r, fmt.Sprintf("load %.2f-%.2f", l0, l1))
	}
	if len(all) == 0 {
		return
	}
	fmt.Printf("\npreset=%s nodes=%d seeds=%d trials=%d load=%d hogs, load average %.2f-%.2f\n",
		*preset, *nodes, *seeds, *trials, *load, slices.Min(loads), slices.Max(loads))
	printSummary(os.Stdout, all, *kill, "process CPU / nodes")
	for _, f := range failures {
		fmt.Println("FAILED", f)
	}
	stopProfile()
	if len(failures) > 0 {
		stopHogs()
		os.Exit(1)
	}
}

// printTrial prints one trial's line; where says what else ran (the
// load average, or the virtual clock).
func printTrial(w io.Writer, t int, r result, where string) {
	fmt.Fprintf(w, "trial %2d: converge %v (CPU %v, %d packets dropped by full queues) | detect %v = suspect %v + first dead %v + all dead %v (own timeouts %d, confirmations %s) | false: suspect %d/%d/%d dead %d/%d/%d (longest %v, %d >= grace), refutes %d, tcp-rescue %d, push-pulls refused %d | steady: %s B/s/node, CPU %.2f ms/s/node | trial: wall %v, CPU %v (%s)\n",
		t, ms(r.converge), ms(r.joinCPU), r.joinDropped, ms(r.detect), ms(r.suspect), ms(r.firstDead-r.suspect), ms(r.detect-r.firstDead),
		r.timeouts, r.confirms, r.falseSuspect[phaseJoin], r.falseSuspect[phaseSteady], r.falseSuspect[phaseDetect],
		r.falseDead[phaseJoin], r.falseDead[phaseSteady], r.falseDead[phaseDetect], ms(r.longestDead), r.overGrace, r.refutes, r.tcpRescue,
		r.pushPullRefused, bytesRate(r), r.cpuPerNode*1000, r.wall.Round(time.Millisecond), r.cpu.Round(time.Millisecond), where)
}

// printSummary prints the distribution of the trials' figures; cpuWhat
// says what the CPU per node is a share of.
func printSummary(w io.Writer, all []result, kill bool, cpuWhat string) {
	pick := func(f func(result) time.Duration) []time.Duration {
		var d []time.Duration
		for _, r := range all {
			if v := f(r); v > 0 {
				d = append(d, v)
			}
		}
		return d
	}
	report(w, "converge (every node lists all N alive)", pick(func(r result) time.Duration { return r.converge }), 2*time.Second)
	if kill {
		report(w, "detect (every survivor lists the killed node dead)", pick(func(r result) time.Duration { return r.detect }), 3*time.Second)
		if debugLog {
			report(w, "  phase 1a: kill -> first direct probe of it timed out", pick(func(r result) time.Duration { return r.failedPing }), 0)
		}
		report(w, "  phase 1: kill -> first suspicion of it", pick(func(r result) time.Duration { return r.suspect }), 0)
		report(w, "  phase 2: first suspicion -> first dead declaration", pick(func(r result) time.Duration { return r.firstDead - r.suspect }), 0)
		report(w, "  phase 3: first dead declaration -> last survivor knows", pick(func(r result) time.Duration { return r.detect - r.firstDead }), 0)
	}
	var fs, fd [3]int
	refutes, rescues, overGrace := 0, 0, 0
	var longest time.Duration
	for _, r := range all {
		overGrace += r.overGrace
		longest = max(longest, r.longestDead)
		for p := range fs {
			fs[p] += r.falseSuspect[p]
			fd[p] += r.falseDead[p]
		}
		refutes += r.refutes
		rescues += r.tcpRescue
	}
	var bps, cpu []float64
	for _, r := range all {
		if r.bytesPerNode >= 0 && r.converge > 0 {
			bps = append(bps, r.bytesPerNode)
		}
		if r.converge > 0 {
			cpu = append(cpu, r.cpuPerNode*1000)
		}
	}
	if len(cpu) > 0 {
		fmt.Fprintf(w, "steady phase, per node: gossip %s B/s (median of trials), CPU %.2f ms/s (median; %s)\n",
			medianStr(bps), median(cpu), cpuWhat)
	}
	fmt.Fprintf(w, "false suspicions of live nodes (join / steady / detect phase): %d / %d / %d; false deaths ((observer, node) pairs): %d / %d / %d; refutations %d; probes saved by the TCP fallback %d\n",
		fs[0], fs[1], fs[2], fd[0], fd[1], fd[2], refutes, rescues)
	fmt.Fprintf(w, "false deaths lasting >= %v (NodeLossGrace: a generation with a rank on that node, seen so by the leader, would fail): %d; longest false death %v\n",
		nodeLossGrace, overGrace, ms(longest))
}

func median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Clone(v)
	slices.Sort(s)
	return s[len(s)/2]
}

func medianStr(v []float64) string {
	if len(v) == 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", median(v))
}

func bytesRate(r result) string {
	if r.bytesPerNode < 0 {
		return "-"
	}
	return fmt.Sprintf("%.0f", r.bytesPerNode)
}

// cpuTime returns the CPU time this process has used (user + system).
func cpuTime() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// realNow returns the real monotonic clock, also inside a
// testing/synctest bubble, where time.Now is the bubble's virtual clock.
func realNow() time.Duration {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts); err != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

func ms(d time.Duration) string {
	if d <= 0 {
		return "-"
	}
	return d.Round(time.Millisecond).String()
}

// loadavg returns the 1-minute load average: other work on the machine
// slows an in-process mesh, so each trial prints it.
func loadavg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return -1
	}
	v, err := strconv.ParseFloat(strings.Fields(string(b))[0], 64)
	if err != nil {
		return -1
	}
	return v
}

// waitForLoad waits until the 1-minute load average is under max, with
// the CPU hogs stopped meanwhile (so that they do not keep it up).
func waitForLoad(max float64, pauseHogs func(bool)) {
	said := false
	for {
		l := loadavg()
		if l < 0 || l < max {
			if said {
				pauseHogs(false)
				fmt.Printf("  load average %.2f: going on\n", l)
			}
			return
		}
		if !said {
			fmt.Printf("  load average %.2f, not under %.2f: waiting (CPU hogs stopped meanwhile)\n", l, max)
			pauseHogs(true)
			said = true
		}
		time.Sleep(5 * time.Second)
	}
}

func report(w io.Writer, what string, d []time.Duration, target time.Duration) {
	if len(d) == 0 {
		fmt.Fprintf(w, "%s: no data\n", what)
		return
	}
	s := slices.Clone(d)
	slices.Sort(s)
	over := ""
	if target > 0 {
		n := 0
		for _, v := range s {
			if v >= target {
				n++
			}
		}
		over = fmt.Sprintf(" (%d of %d >= %v)", n, len(s), target)
	}
	fmt.Fprintf(w, "%s: n=%d min %v median %v p90 %v max %v%s\n", what, len(s),
		s[0].Round(time.Millisecond), s[len(s)/2].Round(time.Millisecond),
		s[len(s)*9/10].Round(time.Millisecond), s[len(s)-1].Round(time.Millisecond), over)
}

// startHogs starts n copies of this binary with -hog. Each spins on one
// CPU until stopHogs kills it or this process dies (Pdeathsig, and the
// hog also exits when its parent changes).
func startHogs(n int) (stop func(), pause func(bool), err error) {
	var procs []*exec.Cmd
	var once sync.Once
	stop = func() {
		once.Do(func() {
			for _, p := range procs {
				_ = p.Process.Kill()
				_ = p.Wait()
			}
		})
	}
	pause = func(paused bool) {
		sig := syscall.SIGCONT
		if paused {
			sig = syscall.SIGSTOP
		}
		for _, p := range procs {
			_ = p.Process.Signal(sig)
		}
	}
	if n == 0 {
		return stop, pause, nil
	}
	exe, err := os.Executable()
	if err != nil {
		return stop, pause, err
	}
	for i := 0; i < n; i++ {
		cmd := exec.Command(exe, "-hog", "-hog-nice", strconv.Itoa(hogNice))
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
		if err := cmd.Start(); err != nil {
			stop()
			return stop, pause, err
		}
		procs = append(procs, cmd)
	}
	return stop, pause, nil
}

var sink atomic.Uint64

// spin burns one CPU: a single thread, no goroutines but this one. It
// exits when its parent goes away.
func spin() {
	runtime.GOMAXPROCS(1)
	if hogNice != 0 {
		// Niceness is per thread on Linux: raise this one's, and spin on it.
		runtime.LockOSThread()
		prio, err := syscall.Getpriority(syscall.PRIO_PROCESS, 0) // 20 - nice
		if err == nil {
			err = syscall.Setpriority(syscall.PRIO_PROCESS, 0, 20-prio+hogNice)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "hog: set niceness:", err)
		}
	}
	parent := os.Getppid()
	x := uint64(1)
	for {
		for i := 0; i < 50_000_000; i++ {
			x = x*6364136223846793005 + 1442695040888963407
		}
		sink.Store(x)
		if os.Getppid() != parent {
			return
		}
	}
}

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
		shown := pairs
		if len(shown) > 30 {
			shown = shown[:30]
		}
		fmt.Printf("  at %v: %d (observer, missing) pairs: %s\n", at, len(pairs), strings.Join(shown, "; "))
	}
	return len(pairs)
}

func config(preset string, name string, verbose bool) mesh.Config {
	var c mesh.Config
	switch preset {
	case "lan":
		c = mesh.DefaultLANConfig()
		c.BindAddr, c.BindPort = "127.0.0.1", 0
		c.JoinRetryMin, c.JoinRetryMax = 20*time.Millisecond, 500*time.Millisecond
	case "local":
		c = mesh.DefaultLocalConfig()
	case "memberlist-lan":
		c = mesh.DefaultLANConfig()
		c.BindAddr, c.BindPort = "127.0.0.1", 0
		c.JoinRetryMin, c.JoinRetryMax = 20*time.Millisecond, 500*time.Millisecond
		c.ProbeInterval, c.ProbeTimeout, c.IndirectChecks = time.Second, 500*time.Millisecond, 3
		c.SuspicionMult, c.SuspicionMaxTimeoutMult, c.AwarenessMaxMultiplier = 4, 6, 8
		c.GossipInterval, c.GossipNodes, c.RetransmitMult = 200*time.Millisecond, 3, 4
		c.PushPullInterval, c.GossipToTheDeadTime = 30*time.Second, 30*time.Second
		c.TCPTimeout, c.DeadNodeReclaimTime = 10*time.Second, 0
		c.JoinSyncRounds, c.FailureSyncDelay, c.ReconnectInterval = 0, 0, 0
	default:
		fmt.Fprintf(os.Stderr, "unknown preset %q: use lan, local or memberlist-lan\n", preset)
		os.Exit(2)
	}
	if ov.sync >= 0 {
		c.JoinSyncRounds = ov.sync
	}
	if ov.failureSync >= 0 {
		c.FailureSyncDelay = ov.failureSync
	}
	if ov.reconnect >= 0 {
		c.ReconnectInterval = ov.reconnect
	}
	setD := func(dst *time.Duration, v time.Duration) {
		if v > 0 {
			*dst = v
		}
	}
	setI := func(dst *int, v int) {
		if v > 0 {
			*dst = v
		}
	}
	setD(&c.ProbeInterval, ov.probe)
	setD(&c.ProbeTimeout, ov.probeTimeout)
	setD(&c.GossipInterval, ov.gossip)
	setD(&c.JoinSyncDelay, ov.joinSyncDelay)
	setI(&c.SuspicionMult, ov.suspicionMult)
	setI(&c.SuspicionMaxTimeoutMult, ov.suspicionMax)
	setI(&c.AwarenessMaxMultiplier, ov.awareness)
	setI(&c.GossipNodes, ov.gossipNodes)
	setI(&c.RetransmitMult, ov.retransmit)
	setI(&c.IndirectChecks, ov.indirect)
	if sizeAdapt {
		c = c.ForSize(nodesFlag)
	}
	c.NoCompression = noCompress
	c.NodeName, c.NodeID = name, "id-"+name
	c.Meta = mesh.Meta{
		InstanceType: "p5.48xlarge", AvailabilityZone: "us-east-1a", Region: "us-east-1",
		Lifecycle: mesh.LifecycleSpot, ServerEligible: true, Version: "bench",
		Addrs: mesh.Addresses{RPC: "127.0.0.1:7947", Raft: "127.0.0.1:7948", HTTP: "127.0.0.1:7949"},
	}
	for i := 0; i < 8; i++ {
		c.Meta.GPUs = append(c.Meta.GPUs, mesh.GPU{Model: "NVIDIA H100 80GB HBM3", MemoryBytes: 85520809984})
	}
	_ = verbose
	if err := c.Validate(); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	return c
}

// Trial phases, for counting false suspicions and deaths.
const (
	phaseJoin   = iota // from the joins to convergence
	phaseSteady        // converged, nothing killed: every suspicion is false
	phaseDetect        // one node killed: suspicions of any other are false
)

type result struct {
	converge, detect time.Duration
	// suspect: kill -> first node suspects the victim; firstDead: kill ->
	// first node declares it dead (all relative to the kill).
	suspect, firstDead time.Duration
	failedPing         time.Duration // kill -> first direct probe of the victim timed out (-debug only)
	timeouts           int           // survivors whose own suspicion timer declared the victim dead
	confirms           string        // peer confirmations those timers had, e.g. "1,1,2"
	falseSuspect       [3]int        // "Suspect X has failed" lines about live nodes, by phase
	falseDead          [3]int        // (observer, live node) failed events, by phase
	// longestDead is the longest an observer listed a live node dead
	// (until it saw it alive again, or the end of the trial);
	// overGrace counts the (observer, node) false deaths that lasted
	// NodeLossGrace or more: with a leader among those observers, a
	// generation with a rank on that node would have been failed.
	longestDead time.Duration
	overGrace   int
	refutes     int // "Refuting a suspect/dead message" lines
	tcpRescue   int // probes that only the TCP fallback saved
	// pushPullRefused: push-pulls (joins, syncs) a node refused because
	// it already served memberlist's limit of 128 at once.
	pushPullRefused int
	bytesPerNode    float64       // steady phase: gossip bytes sent per node per second (-1: not counted)
	cpuPerNode      float64       // steady phase: process CPU seconds per node per second
	joinCPU         time.Duration // process CPU from the joins to convergence (or the timeout)
	// joinDropped: packets dropped by full receive queues from the joins
	// to convergence (memory transport only; -1: not counted).
	joinDropped int64
	// wall and cpu: the trial's real duration and the process CPU it
	// used (in a virtual-time run, wall is real time, not the bubble's).
	wall, cpu time.Duration
	err       error
}

var (
	reFailedPing = regexp.MustCompile(`Failed UDP ping: (\S+) \(timeout reached\)`)
	reSuspect    = regexp.MustCompile(`Suspect (\S+) has failed`)
	reMarking    = regexp.MustCompile(`Marking (\S+) as failed, suspect timeout reached \((\d+) peer confirmations\)`)
)

// recorder collects timestamps and counts of one trial from memberlist's
// log lines and the nodes' events.
type recorder struct {
	mu              sync.Mutex
	phase           int
	victim          string
	killed          time.Time
	firstSusp       time.Time
	firstFailedPing time.Time
	firstDead       time.Time
	lastDead        time.Time
	deadSeen        map[string]bool         // survivors that list the victim dead
	falseSince      map[[2]string]time.Time // (observer, live node) listed dead since
	confirms        []string
	res             result
	verbose         bool
}

func (r *recorder) logLine(node, line string) {
	now := time.Now()
	r.mu.Lock()
	defer r.mu.Unlock()
	switch {
	case strings.Contains(line, "Refuting a"):
		r.res.refutes++
	case strings.Contains(line, "over TCP but UDP probes failed"):
		r.res.tcpRescue++
	case strings.Contains(line, "Too many pending push/pull requests"):
		r.res.pushPullRefused++
	}
	if m := reFailedPing.FindStringSubmatch(line); m != nil && r.phase == phaseDetect && m[1] == r.victim && r.firstFailedPing.IsZero() {
		r.firstFailedPing = now
	}
	if m := reSuspect.FindStringSubmatch(line); m != nil {
		if r.phase == phaseDetect && m[1] == r.victim {
			if r.firstSusp.IsZero() {
				r.firstSusp = now
			}
		} else {
			r.res.falseSuspect[r.phase]++
		}
	}
	if m := reMarking.FindStringSubmatch(line); m != nil && r.phase == phaseDetect && m[1] == r.victim {
		r.res.timeouts++
		r.confirms = append(r.confirms, m[2])
		if r.firstDead.IsZero() || now.Before(r.firstDead) {
			r.firstDead = now
		}
	}
	if r.verbose && (strings.Contains(line, "[WARN]") || strings.Contains(line, "[ERROR]")) {
		fmt.Fprintf(os.Stderr, "%s: %s", node, line)
	}
}

func (r *recorder) event(observer string, ev mesh.Event) {
	if ev.Member.Name == observer {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	key := [2]string{observer, ev.Member.Name}
	if ev.Type == mesh.EventJoin {
		if t, ok := r.falseSince[key]; ok {
			delete(r.falseSince, key)
			r.falseDeathEnded(time.Since(t))
		}
		return
	}
	if ev.Type != mesh.EventFailed {
		return
	}
	if r.phase == phaseDetect && ev.Member.Name == r.victim {
		if !r.deadSeen[observer] {
			r.deadSeen[observer] = true
			t := ev.Member.Since
			if r.firstDead.IsZero() || t.Before(r.firstDead) {
				r.firstDead = t
			}
			if t.After(r.lastDead) {
				r.lastDead = t
			}
		}
		return
	}
	r.res.falseDead[r.phase]++
	if _, ok := r.falseSince[key]; !ok {
		r.falseSince[key] = time.Now()
	}
}

// falseDeathEnded records how long one false death lasted. The caller
// holds r.mu.
func (r *recorder) falseDeathEnded(d time.Duration) {
	r.res.longestDead = max(r.res.longestDead, d)
	if d >= nodeLossGrace {
		r.res.overGrace++
	}
}

func (r *recorder) setPhase(p int) {
	r.mu.Lock()
	r.phase = p
	r.mu.Unlock()
}

// lineWriter hands each log line to the recorder.
type lineWriter struct {
	node string
	r    *recorder
}

func (w lineWriter) Write(p []byte) (int, error) {
	w.r.logLine(w.node, string(p))
	return len(p), nil
}

func trial(t, n, seeds int, preset string, timeout, steady time.Duration, kill, verbose bool) (res result) {
	wall0, cpu0 := realNow(), cpuTime()
	defer func() { res.wall, res.cpu = realNow()-wall0, cpuTime()-cpu0 }()
	rec := &recorder{deadSeen: map[string]bool{}, falseSince: map[[2]string]time.Time{}, verbose: verbose}
	ms := make([]*mesh.Mesh, n)
	var memNet *mesh.MemNetwork
	var trs []*mesh.MemTransport
	res.bytesPerNode = -1
	if useMem {
		memNet = mesh.NewMemNetwork()
		memNet.SetDefault(memFault)
	}
	var subWG sync.WaitGroup
	defer func() {
		var wg sync.WaitGroup
		for _, m := range ms {
			if m != nil {
				wg.Add(1)
				go func() { defer wg.Done(); m.Shutdown() }()
			}
		}
		wg.Wait()
		subWG.Wait()
	}()
	for i := range ms {
		name := fmt.Sprintf("t%d-n%02d", t, i)
		c := config(preset, name, verbose)
		// Info level: memberlist's suspicion, death and refutation lines,
		// not its per-probe debug lines.
		level := hclog.Info
		if debugLog {
			level = hclog.Debug
		}
		c.Logger = hclog.New(&hclog.LoggerOptions{Name: name, Level: level, Output: lineWriter{name, rec}, DisableTime: true})
		if memNet != nil {
			tr := memNet.NewTransport()
			trs = append(trs, tr)
			c.Transport = tr
		}
		m, err := mesh.New(c)
		if err != nil {
			res.err = err
			return res
		}
		ms[i] = m
		events, _ := m.Subscribe() // closed by Shutdown
		subWG.Add(1)
		go func() {
			defer subWG.Done()
			for ev := range events {
				rec.event(name, ev)
			}
		}()
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
	start, startCPU := time.Now(), cpuTime()
	joinErr := make(chan error, n)
	for i := 1; i < n; i++ {
		go func() {
			_, err := ms[i].Join(ctx, seedAddrs)
			joinErr <- err
		}()
	}
	diagDone := make(chan struct{})
	if diag {
		go func() {
			defer close(diagDone)
			for _, at := range []time.Duration{time.Second, 2 * time.Second, 3 * time.Second, 4 * time.Second, 5 * time.Second, 10 * time.Second} {
				time.Sleep(at - time.Since(start))
				if missing(ms, at) == 0 {
					return
				}
			}
		}()
	} else {
		close(diagDone)
	}
	defer func() { <-diagDone }()
	finish := func() result {
		rec.mu.Lock()
		defer rec.mu.Unlock()
		for k, t := range rec.falseSince { // still dead at the end
			delete(rec.falseSince, k)
			rec.falseDeathEnded(time.Since(t))
		}
		out := rec.res
		out.converge, out.err = res.converge, res.err
		out.bytesPerNode, out.cpuPerNode = res.bytesPerNode, res.cpuPerNode
		out.detect, out.joinCPU, out.joinDropped = res.detect, res.joinCPU, res.joinDropped
		if !rec.killed.IsZero() {
			if !rec.firstSusp.IsZero() {
				out.suspect = rec.firstSusp.Sub(rec.killed)
			}
			if !rec.firstFailedPing.IsZero() {
				out.failedPing = rec.firstFailedPing.Sub(rec.killed)
			}
			if !rec.firstDead.IsZero() {
				out.firstDead = rec.firstDead.Sub(rec.killed)
			}
		}
		out.confirms = strings.Join(rec.confirms, ",")
		return out
	}
	converged := waitAll(ctx, ms, func(m *mesh.Mesh) bool { return m.NumAlive() == n })
	res.joinCPU = cpuTime() - startCPU
	res.joinDropped = -1
	if memNet != nil {
		res.joinDropped = 0
		for _, tr := range trs {
			res.joinDropped += int64(tr.Stats().Dropped)
		}
	}
	if !converged {
		res.err = fmt.Errorf("not converged after %v: alive counts %v", timeout, counts(ms))
		return finish()
	}
	res.converge = time.Since(start)
	for i := 1; i < n; i++ {
		if err := <-joinErr; err != nil {
			res.err = fmt.Errorf("join: %w", err)
			return finish()
		}
	}
	rec.setPhase(phaseSteady)
	if steady > 0 {
		// Let the post-join syncs finish first, so that the window shows
		// the gossip of a settled mesh (still the steady phase: any
		// suspicion in it is false).
		time.Sleep(settle)
		sent := func() (b uint64) {
			for _, tr := range trs {
				b += tr.Stats().Bytes()
			}
			return b
		}
		b0, c0, t0 := sent(), cpuTime(), time.Now()
		time.Sleep(steady)
		secs := time.Since(t0).Seconds()
		res.cpuPerNode = (cpuTime() - c0).Seconds() / secs / float64(n)
		if memNet != nil {
			res.bytesPerNode = float64(sent()-b0) / secs / float64(n)
		}
	}
	if !kill {
		return finish()
	}
	victim := ms[n-1]
	rec.mu.Lock()
	rec.victim, rec.phase, rec.killed = victim.Name(), phaseDetect, time.Now()
	rec.mu.Unlock()
	victim.Shutdown()
	ctx2, cancel2 := context.WithTimeout(context.Background(), timeout)
	defer cancel2()
	tick := time.NewTicker(5 * time.Millisecond)
	defer tick.Stop()
	for {
		rec.mu.Lock()
		done, last, killed := len(rec.deadSeen) == n-1, rec.lastDead, rec.killed
		rec.mu.Unlock()
		if done {
			res.detect = last.Sub(killed)
			return finish()
		}
		select {
		case <-ctx2.Done():
			res.err = fmt.Errorf("killed node not seen dead by all after %v", timeout)
			return finish()
		case <-tick.C:
		}
	}
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
