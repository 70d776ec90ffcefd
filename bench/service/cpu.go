package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"text/tabwriter"
	"time"

	"golang.org/x/sys/unix"
)

// The cpu mode measures what decides the target whatever else the
// machine runs: the CPU time the router spends per request against the
// replica's, over a fixed number of requests under the same closed-loop
// load. With one core each, the router keeps up with ≥ 80% of a direct
// connection's requests/s only if it spends ≤ 1.25× the replica's CPU per
// request.
//
// Every round loads the replica directly, then through each router, with
// -c keep-alive clients; it reads each process's user+sys time
// (/proc/PID/stat) and its read and write system calls (/proc/PID/io
// syscr, syscw) when -n/10 requests have been answered (warm-up) and again
// -n requests later, while the load goes on.

// cpuRun is one measured run: the replica's and the router's use per
// request (the router's zero for a direct run).
type cpuRun struct {
	replica, path  string
	round          int
	reqPerS        float64
	replicaUS      float64 // replica CPU µs per request
	routerUS       float64 // router CPU µs per request
	replicaR       float64 // replica read syscalls per request
	replicaW       float64 // replica write syscalls per request
	routerR        float64
	routerW        float64
	directUS       float64 // the same round's direct run: replica CPU µs per request
	routerReplica  float64 // routerUS / replicaUS of this run
	routerDirectUS float64 // routerUS / directUS
}

// procUse is one process's counters at one moment.
type procUse struct {
	ticks       int64 // utime + stime, in clock ticks
	syscr, sysw int64
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times (100 on every
// Linux architecture Go supports).
const clockTicks = 100

func readUse(pid int) (procUse, error) {
	var u procUse
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// The fields after the command name (in parentheses, which may hold
	// spaces): utime and stime are the 14th and 15th of the line.
	s := string(stat)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return u, fmt.Errorf("/proc/%d/stat: too few fields", pid)
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err := errors.Join(err1, err2); err != nil {
		return u, fmt.Errorf("/proc/%d/stat: %w", pid, err)
	}
	u.ticks = ut + st
	io, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(io), "\n") {
		k, v, _ := strings.Cut(line, ": ")
		n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		switch k {
		case "syscr":
			u.syscr = n
		case "syscw":
			u.sysw = n
		}
	}
	return u, nil
}

// startProc starts cmd (its output discarded) and waits until addr
// accepts connections.
func startProc(addr string, cmd *exec.Cmd) (*exec.Cmd, error) {
	cmd.Stdout, cmd.Stderr = io.Discard, io.Discard
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return cmd, nil
		}
		if time.Now().After(deadline) {
			stopProc(cmd)
			return nil, fmt.Errorf("%s: nothing listens on %s after 10 s", strings.Join(cmd.Args, " "), addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func stopProc(cmd *exec.Cmd) {
	if cmd != nil && cmd.Process != nil {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	}
}

// freeAddr returns a loopback address with a port free now.
func freeAddr() (string, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer ln.Close()
	return ln.Addr().String(), nil
}

// measure loads url with clients closed-loop clients until warm+n answers,
// and returns the use of each pid over the n answers after the first warm,
// per request, and the requests/s of that part.
func measure(url string, clients, warm, n int, pids []int) (perReq [][3]float64, reqPerS float64, err error) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}, Timeout: 10 * time.Second}
	defer client.CloseIdleConnections()
	var done atomic.Int64
	var mu sync.Mutex
	var firstErr error
	var t0, t1 time.Time
	before := make([]procUse, len(pids))
	after := make([]procUse, len(pids))
	snap := func(into []procUse) {
		for i, pid := range pids {
			u, err := readUse(pid)
			if err != nil {
				mu.Lock()
				firstErr = err
				mu.Unlock()
			}
			into[i] = u
		}
	}
	stop := make(chan struct{})
	var once sync.Once
	var wg sync.WaitGroup
	for g := 0; g < clients; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				resp, err := client.Get(url)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if err == nil && resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("%s: status %d", url, resp.StatusCode)
					}
				}
				if err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					once.Do(func() { close(stop) })
					return
				}
				// The answer that completes the warm-up, or the measured
				// part, takes the snapshot; the others go on meanwhile.
				switch done.Add(1) {
				case int64(warm):
					snap(before)
					t0 = time.Now()
				case int64(warm + n):
					t1 = time.Now()
					snap(after)
					once.Do(func() { close(stop) })
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr != nil {
		return nil, 0, firstErr
	}
	for i := range pids {
		d := float64(n)
		perReq = append(perReq, [3]float64{
			float64(after[i].ticks-before[i].ticks) * 1e6 / clockTicks / d,
			float64(after[i].syscr-before[i].syscr) / d,
			float64(after[i].sysw-before[i].sysw) / d,
		})
	}
	return perReq, float64(n) / t1.Sub(t0).Seconds(), nil
}

// routerSpec is a router to compare: a label and the command that runs a
// build of bench/service (its "router -listen ADDR -replica ADDR" is
// appended).
type routerSpec struct {
	label string
	argv  []string
}

func parseRouters(args []string) ([]routerSpec, error) {
	self, err := os.Executable()
	if err != nil {
		return nil, err
	}
	if len(args) == 0 {
		args = []string{"fast=" + self, "general=" + self + " -general", "serve=" + self + " -serve"}
	}
	var out []routerSpec
	for _, a := range args {
		label, cmd, ok := strings.Cut(a, "=")
		if !ok || label == "" || strings.TrimSpace(cmd) == "" {
			return nil, fmt.Errorf("router %q: want LABEL=COMMAND (a build of bench/service, e.g. fast=./service or general='./service -general')", a)
		}
		argv := strings.Fields(cmd)
		if p, err := filepath.Abs(argv[0]); err == nil && strings.ContainsRune(argv[0], '/') {
			argv[0] = p
		}
		out = append(out, routerSpec{label: label, argv: argv})
	}
	return out, nil
}

// cpuConfig is the cpu mode's flags.
type cpuConfig struct {
	requests int    // measured requests per run (after requests/10 of warm-up)
	clients  int    // closed-loop keep-alive clients
	rounds   int    // rounds with the Go replica
	serverPy string // examples/service/server.py: also measured as the replica ("" skips)
	pyRounds int    // rounds with serverPy
	// pin puts the replica on core 0, the router on core 1 and this
	// process (the load) on the others, as sidebyside.sh does (taskset;
	// at least 3 cores).
	pin     bool
	routers []string
}

// threadSiblings returns the logical CPUs that share core's physical core
// (core itself included), from sysfs; just core where sysfs does not say.
func threadSiblings(core int) []int {
	b, err := os.ReadFile(fmt.Sprintf("/sys/devices/system/cpu/cpu%d/topology/thread_siblings_list", core))
	if err != nil {
		return []int{core}
	}
	cpus, err := parseCPUList(string(b))
	if err != nil || len(cpus) == 0 {
		return []int{core}
	}
	return cpus
}

// parseCPUList parses the kernel's CPU list format ("0,8" or "0-1,8-9").
func parseCPUList(s string) ([]int, error) {
	var out []int
	for _, part := range strings.Split(strings.TrimSpace(s), ",") {
		lo, hi, found := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return nil, fmt.Errorf("cpu list %q: %w", s, err)
		}
		z := a
		if found {
			if z, err = strconv.Atoi(hi); err != nil {
				return nil, fmt.Errorf("cpu list %q: %w", s, err)
			}
		}
		for c := a; c <= z; c++ {
			out = append(out, c)
		}
	}
	return out, nil
}

// pinned returns cmd run on core (taskset), or cmd when not pinning.
func pinned(cfg cpuConfig, core int, cmd *exec.Cmd) *exec.Cmd {
	if !cfg.pin {
		return cmd
	}
	out := exec.Command("taskset", append([]string{"-c", strconv.Itoa(core)}, cmd.Args...)...)
	out.Env = cmd.Env
	return out
}

func runCPU(cfg cpuConfig) error {
	if cfg.requests < 100 || cfg.clients < 1 || cfg.rounds < 0 || cfg.pyRounds < 0 {
		return fmt.Errorf("cpu: want -n ≥ 100, -c ≥ 1 and rounds ≥ 0")
	}
	if cfg.pin {
		if runtime.NumCPU() < 3 {
			return fmt.Errorf("cpu -pin: needs at least 3 cores (has %d)", runtime.NumCPU())
		}
		// Not on cores 0 and 1 nor on their hyperthread siblings: a busy
		// sibling slows the replica or the router.
		taken := map[int]bool{}
		for _, c := range []int{0, 1} {
			for _, s := range threadSiblings(c) {
				taken[s] = true
			}
		}
		var set unix.CPUSet
		for c := 2; c < runtime.NumCPU(); c++ {
			if !taken[c] {
				set.Set(c)
			}
		}
		if set.Count() == 0 {
			for c := 2; c < runtime.NumCPU(); c++ {
				set.Set(c)
			}
		}
		if err := unix.SchedSetaffinity(0, &set); err != nil {
			return fmt.Errorf("cpu -pin: %w", err)
		}
	}
	routers, err := parseRouters(cfg.routers)
	if err != nil {
		return err
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	var runs []cpuRun
	one := func(kind string, rounds int, replicaCmd func(addr string) *exec.Cmd, path string) error {
		for r := 1; r <= rounds; r++ {
			raddr, err := freeAddr()
			if err != nil {
				return err
			}
			rep, err := startProc(raddr, pinned(cfg, 0, replicaCmd(raddr)))
			if err != nil {
				return err
			}
			err = func() error {
				defer stopProc(rep)
				use, rps, err := measure("http://"+raddr+path, cfg.clients, cfg.requests/10, cfg.requests, []int{rep.Process.Pid})
				if err != nil {
					return fmt.Errorf("%s direct: %w", kind, err)
				}
				direct := cpuRun{replica: kind, path: "direct", round: r, reqPerS: rps, replicaUS: use[0][0], replicaR: use[0][1], replicaW: use[0][2]}
				direct.directUS = direct.replicaUS
				runs = append(runs, direct)
				for _, rs := range routers {
					faddr, err := freeAddr()
					if err != nil {
						return err
					}
					argv := append(append([]string{}, rs.argv[0], "router", "-listen", faddr, "-replica", raddr), rs.argv[1:]...)
					rtr, err := startProc(faddr, pinned(cfg, 1, exec.Command(argv[0], argv[1:]...)))
					if err != nil {
						return err
					}
					use, rps, err := measure("http://"+faddr+"/svc/bench"+path, cfg.clients, cfg.requests/10, cfg.requests, []int{rep.Process.Pid, rtr.Process.Pid})
					stopProc(rtr)
					if err != nil {
						// One router failing (the floor relay where an answer
						// comes in two reads) leaves the others to measure.
						fmt.Fprintf(os.Stderr, "%s round %d through %s: %v\n", kind, r, rs.label, err)
						continue
					}
					run := cpuRun{replica: kind, path: rs.label, round: r, reqPerS: rps,
						replicaUS: use[0][0], replicaR: use[0][1], replicaW: use[0][2],
						routerUS: use[1][0], routerR: use[1][1], routerW: use[1][2], directUS: direct.replicaUS}
					run.routerReplica = run.routerUS / run.replicaUS
					run.routerDirectUS = run.routerUS / run.directUS
					runs = append(runs, run)
				}
				return nil
			}()
			if err != nil {
				return err
			}
		}
		return nil
	}
	if err := one("go", cfg.rounds, func(addr string) *exec.Cmd { return exec.Command(self, "replica", "-listen", addr) }, "/x"); err != nil {
		return err
	}
	if cfg.serverPy != "" {
		py := func(addr string) *exec.Cmd {
			host, port, _ := net.SplitHostPort(addr)
			cmd := exec.Command("python3", cfg.serverPy)
			cmd.Env = append(os.Environ(), "GPUMESH_HOST="+host, "GPUMESH_PORT_HTTP="+port, "SERVE_NO_TORCH=1")
			return cmd
		}
		if err := one("python", cfg.pyRounds, py, "/x"); err != nil {
			return err
		}
	}
	printCPU(os.Stdout, runs, cfg)
	return nil
}

func printCPU(w io.Writer, runs []cpuRun, cfg cpuConfig) {
	fmt.Fprintf(w, "CPU per request, %d requests per run after %d of warm-up, %d closed-loop clients\n", cfg.requests, cfg.requests/10, cfg.clients)
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, "replica\tround\tpath\treq/s\treplica µs/req\trouter µs/req\trouter/replica\trouter/direct replica\treplica reads, writes/req\trouter reads, writes/req\t")
	for _, r := range runs {
		if r.path == "direct" {
			fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.1f\t-\t-\t-\t%.2f, %.2f\t-\t\n", r.replica, r.round, r.path, r.reqPerS, r.replicaUS, r.replicaR, r.replicaW)
			continue
		}
		fmt.Fprintf(tw, "%s\t%d\t%s\t%.0f\t%.1f\t%.1f\t%.2f\t%.2f\t%.2f, %.2f\t%.2f, %.2f\t\n", r.replica, r.round, r.path, r.reqPerS, r.replicaUS, r.routerUS, r.routerReplica, r.routerDirectUS, r.replicaR, r.replicaW, r.routerR, r.routerW)
	}
	tw.Flush()
	// The median of each ratio over the rounds, by replica and router.
	type key struct{ replica, path string }
	by := map[key][][2]float64{}
	var keys []key
	for _, r := range runs {
		if r.path == "direct" {
			continue
		}
		k := key{r.replica, r.path}
		if by[k] == nil {
			keys = append(keys, k)
		}
		by[k] = append(by[k], [2]float64{r.routerReplica, r.routerDirectUS})
	}
	fmt.Fprintln(w, "\nmedian over rounds (≤ 1.25 is what ≥ 0.8× of direct req/s needs, one core each):")
	for _, k := range keys {
		var a, b []float64
		for _, v := range by[k] {
			a, b = append(a, v[0]), append(b, v[1])
		}
		fmt.Fprintf(w, "  %s replica, %s: router/replica %.2f (rounds %s), router/direct replica %.2f\n", k.replica, k.path, median(a), list(a), median(b))
	}
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func list(v []float64) string {
	var parts []string
	for _, x := range v {
		parts = append(parts, fmt.Sprintf("%.2f", x))
	}
	return strings.Join(parts, " ")
}
