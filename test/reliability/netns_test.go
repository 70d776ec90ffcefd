//go:build reliability

package reliability

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/internal/netemu"
)

// nsPrefix starts the name of every namespace this suite creates; the
// creating test process's pid follows (netemu.NamespaceName), so that runs
// side by side keep apart and the leftovers of a killed run can be found
// and removed (removeLeftovers).
const nsPrefix = "gmr-"

// nsName is the name of this process's namespace called name.
func nsName(name string) string { return netemu.NamespaceName(nsPrefix, os.Getpid(), name) }

// topology is n network namespaces, each with one veth into a hub
// namespace that holds two bridges: "br0" (the network) and "br1" (the far
// side of a partition). The addresses 10.99.0.0/24 exist only inside these
// namespaces; the host's namespace gets no address and no route.
type topology struct {
	t     testing.TB
	hub   string
	nodes []string // namespace names
	ips   []string
	netem bool // tc netem works here (else loss uses nftables)
	// emu, when set, is the network instead of the bridges: every
	// namespace has a TUN device tun0 whose packets the emulator forwards
	// with delay, jitter and loss (see newEmuTopology).
	emu     *netemu.Emulator
	emuLink netemu.LinkConfig
}

func run(args ...string) error {
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("%s: %v: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
	}
	return nil
}

// requireNetns skips the test unless namespaces can be made here.
func requireNetns(t *testing.T) {
	t.Helper()
	if testing.Short() {
		t.Skip("reliability: network-namespace test; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("reliability: network-namespace tests need root (they create namespaces, veth pairs and bridges)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("reliability: network-namespace tests need iproute2's `ip` (apt-get install iproute2)")
	}
}

// removeLeftovers kills what still runs inside namespaces that an earlier
// run of this suite left behind (its process was killed before its
// cleanups ran) and deletes those namespaces. Namespaces of runs still in
// progress are left alone (netemu.StaleNamespaces).
func removeLeftovers(t testing.TB) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0])
		}
	}
	alive := func(pid int) bool { return !errors.Is(syscall.Kill(pid, 0), syscall.ESRCH) }
	for _, ns := range netemu.StaleNamespaces(names, nsPrefix, alive) {
		killNamespace(ns)
		if err := run("ip", "netns", "del", ns); err != nil {
			t.Logf("removing leftover namespace: %v", err)
		}
	}
}

// killNamespace SIGKILLs every process inside ns (all of them were started
// by this suite: nothing else runs in its namespaces), except this test
// process: a dialer thread that entered ns may be the main thread, which
// Go parks instead of ending, and then ip(8) counts the process as inside.
func killNamespace(ns string) {
	out, _ := exec.Command("ip", "netns", "pids", ns).Output()
	for _, p := range strings.Fields(string(out)) {
		var pid int
		if _, err := fmt.Sscan(p, &pid); err == nil && pid > 1 && pid != os.Getpid() {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
	}
}

// newTopology builds n namespaces on one bridge. Everything is removed when
// the test ends.
func newTopology(t *testing.T, n int) *topology {
	t.Helper()
	requireNetns(t)
	removeLeftovers(t)
	tp := &topology{t: t, hub: nsName("hub")}
	t.Cleanup(func() {
		for _, ns := range append(append([]string(nil), tp.nodes...), tp.hub) {
			killNamespace(ns)
			_ = run("ip", "netns", "del", ns)
		}
	})
	tp.must("ip", "netns", "add", tp.hub)
	tp.must("ip", "-n", tp.hub, "link", "set", "lo", "up")
	for _, br := range []string{"br0", "br1"} {
		tp.must("ip", "-n", tp.hub, "link", "add", br, "type", "bridge")
		tp.must("ip", "-n", tp.hub, "link", "set", br, "up")
	}
	for i := 0; i < n; i++ {
		ns, ip := tp.addNode(i)
		tp.must("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", tp.port(i), "netns", tp.hub)
		tp.must("ip", "-n", ns, "addr", "add", ip+"/24", "dev", "eth0")
		tp.must("ip", "-n", ns, "link", "set", "eth0", "up")
		tp.must("ip", "-n", tp.hub, "link", "set", tp.port(i), "master", "br0")
		tp.must("ip", "-n", tp.hub, "link", "set", tp.port(i), "up")
	}
	// Is tc netem there (a kernel module some hosts lack)?
	tp.netem = run("ip", "netns", "exec", tp.hub, "tc", "qdisc", "add", "dev", "br1", "root", "netem", "delay", "1ms") == nil
	if tp.netem {
		_ = run("ip", "netns", "exec", tp.hub, "tc", "qdisc", "del", "dev", "br1", "root")
	}
	return tp
}

// newEmuTopology builds n namespaces joined by the userspace link
// emulator instead of bridges: each namespace gets a TUN device tun0
// (MTU 9000) with its address, created by the test process and forwarded
// by an emulator that runs in it, with link on every link; the seed makes
// the losses and jitter reproducible (up to packet arrival order).
// Everything is removed when the test ends: the emulator closes the TUN
// files (which removes the devices) before the namespaces go.
func newEmuTopology(t *testing.T, n int, link netemu.LinkConfig, seed uint64) *topology {
	t.Helper()
	requireNetns(t)
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("reliability: the link emulator needs /dev/net/tun (modprobe tun)")
	}
	removeLeftovers(t)
	tp := &topology{t: t, emuLink: link}
	t.Cleanup(func() {
		if tp.emu != nil {
			tp.emu.Close()
		}
		for _, ns := range tp.nodes {
			killNamespace(ns)
			_ = run("ip", "netns", "del", ns)
		}
	})
	cfg := netemu.DefaultConfig()
	cfg.Seed, cfg.Link = seed, link
	emu, err := netemu.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	tp.emu = emu
	for i := 0; i < n; i++ {
		ns, ip := tp.addNode(i)
		tun, err := netemu.OpenTUN("/run/netns/"+ns, "tun0")
		if err != nil {
			t.Fatalf("network setup: %v", err)
		}
		if err := emu.Attach(ns, netip.MustParseAddr(ip), tun); err != nil {
			tun.Close()
			t.Fatalf("network setup: %v", err)
		}
		tp.must("ip", "-n", ns, "link", "set", "tun0", "mtu", "9000", "up")
		tp.must("ip", "-n", ns, "addr", "add", ip+"/24", "dev", "tun0")
	}
	return tp
}

// addNode creates node i's namespace with its loopback up and records
// its name and address.
func (tp *topology) addNode(i int) (ns, ip string) {
	ns = nsName(fmt.Sprintf("n%d", i+1))
	ip = fmt.Sprintf("10.99.0.%d", 11+i)
	tp.must("ip", "netns", "add", ns)
	tp.nodes = append(tp.nodes, ns)
	tp.ips = append(tp.ips, ip)
	tp.must("ip", "-n", ns, "link", "set", "lo", "up")
	return ns, ip
}

// must runs a network-setup command and fails the test if it fails.
func (tp *topology) must(args ...string) {
	tp.t.Helper()
	if err := run(args...); err != nil {
		tp.t.Fatalf("network setup: %v", err)
	}
}

func (tp *topology) port(i int) string { return fmt.Sprintf("v%d", i+1) }

// partition moves the given nodes to the far bridge: they reach each other
// but not the rest.
func (tp *topology) partition(idx ...int) {
	tp.t.Helper()
	if tp.emu != nil {
		var cut, rest []string
		for i, ns := range tp.nodes {
			if slices.Contains(idx, i) {
				cut = append(cut, ns)
			} else {
				rest = append(rest, ns)
			}
		}
		if err := tp.emu.Partition(cut, rest); err != nil {
			tp.t.Fatal(err)
		}
		return
	}
	for _, i := range idx {
		if err := run("ip", "-n", tp.hub, "link", "set", tp.port(i), "master", "br1"); err != nil {
			tp.t.Fatal(err)
		}
	}
}

// heal puts every node back on the one bridge.
func (tp *topology) heal() {
	tp.t.Helper()
	if tp.emu != nil {
		tp.emu.Heal()
		return
	}
	for i := range tp.nodes {
		if err := run("ip", "-n", tp.hub, "link", "set", tp.port(i), "master", "br0"); err != nil {
			tp.t.Fatal(err)
		}
	}
}

// loss drops pct percent of the packets node i sends, with tc netem where
// the kernel has it and with an nftables random-number rule otherwise.
func (tp *topology) loss(i, pct int) (how string) {
	tp.t.Helper()
	ns := tp.nodes[i]
	if tp.emu != nil {
		for k, to := range tp.nodes {
			if k == i {
				continue
			}
			lc := tp.emuLink
			lc.Loss = float64(pct) / 100
			if err := tp.emu.SetLink(ns, to, lc); err != nil {
				tp.t.Fatal(err)
			}
		}
		return "netemu (userspace link emulator)"
	}
	if tp.netem {
		if err := run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "loss", fmt.Sprintf("%d%%", pct)); err != nil {
			tp.t.Fatal(err)
		}
		return "tc netem"
	}
	if _, err := exec.LookPath("nft"); err != nil {
		tp.t.Skip("reliability: packet loss needs tc netem (kernel module sch_netem, missing here) or nftables (apt-get install nftables)")
	}
	rules := fmt.Sprintf("table inet gmrloss {\n chain out { type filter hook output priority 0; policy accept; oifname \"eth0\" numgen random mod 100 < %d drop; }\n}\n", pct)
	cmd := exec.Command("ip", "netns", "exec", ns, "nft", "-f", "-")
	cmd.Stdin = strings.NewReader(rules)
	if out, err := cmd.CombinedOutput(); err != nil {
		tp.t.Fatalf("nft loss rule in %s: %v: %s", ns, err, out)
	}
	return "nftables numgen (tc netem unavailable)"
}

// dialer returns a dial function that opens TCP connections from inside
// namespace ns, so the test process can talk to agents there without any
// route from the host's namespace. The socket is created on an OS thread
// that entered ns; that thread is never reused (it exits with its
// goroutine), and the socket stays in ns for its whole life.
func (tp *topology) dialer(ns string) func(ctx context.Context, addr string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // not unlocked: the thread dies with this goroutine
			f, err := os.Open("/run/netns/" + ns)
			if err != nil {
				ch <- result{nil, err}
				return
			}
			defer f.Close()
			if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
				ch <- result{nil, fmt.Errorf("entering namespace %s: %w", ns, err)}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			ch <- result{c, err}
		}()
		select {
		case r := <-ch:
			return r.c, r.err
		case <-ctx.Done():
			go func() {
				if r := <-ch; r.c != nil {
					r.c.Close()
				}
			}()
			return nil, ctx.Err()
		}
	}
}
