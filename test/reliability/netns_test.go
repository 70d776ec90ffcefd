//go:build reliability

package reliability

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// nsPrefix names every namespace this suite creates, so that leftovers of
// an interrupted run can be found and removed.
const nsPrefix = "gmr-"

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

// removeLeftovers kills what still runs inside namespaces of an earlier,
// interrupted run of this suite and deletes those namespaces.
func removeLeftovers(t testing.TB) {
	out, err := exec.Command("ip", "netns", "list").Output()
	if err != nil {
		return
	}
	for _, line := range strings.Split(string(out), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || !strings.HasPrefix(f[0], nsPrefix) {
			continue
		}
		killNamespace(f[0])
		if err := run("ip", "netns", "del", f[0]); err != nil {
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
	tp := &topology{t: t, hub: nsPrefix + "hub"}
	t.Cleanup(func() {
		for _, ns := range append(append([]string(nil), tp.nodes...), tp.hub) {
			killNamespace(ns)
			_ = run("ip", "netns", "del", ns)
		}
	})
	must := func(args ...string) {
		t.Helper()
		if err := run(args...); err != nil {
			t.Fatalf("network setup: %v", err)
		}
	}
	must("ip", "netns", "add", tp.hub)
	must("ip", "-n", tp.hub, "link", "set", "lo", "up")
	for _, br := range []string{"br0", "br1"} {
		must("ip", "-n", tp.hub, "link", "add", br, "type", "bridge")
		must("ip", "-n", tp.hub, "link", "set", br, "up")
	}
	for i := 0; i < n; i++ {
		ns := fmt.Sprintf("%sn%d", nsPrefix, i+1)
		ip := fmt.Sprintf("10.99.0.%d", 11+i)
		must("ip", "netns", "add", ns)
		tp.nodes = append(tp.nodes, ns)
		tp.ips = append(tp.ips, ip)
		must("ip", "-n", ns, "link", "set", "lo", "up")
		must("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", tp.port(i), "netns", tp.hub)
		must("ip", "-n", ns, "addr", "add", ip+"/24", "dev", "eth0")
		must("ip", "-n", ns, "link", "set", "eth0", "up")
		must("ip", "-n", tp.hub, "link", "set", tp.port(i), "master", "br0")
		must("ip", "-n", tp.hub, "link", "set", tp.port(i), "up")
	}
	// Is tc netem there (a kernel module some hosts lack)?
	tp.netem = run("ip", "netns", "exec", tp.hub, "tc", "qdisc", "add", "dev", "br1", "root", "netem", "delay", "1ms") == nil
	if tp.netem {
		_ = run("ip", "netns", "exec", tp.hub, "tc", "qdisc", "del", "dev", "br1", "root")
	}
	return tp
}

func (tp *topology) port(i int) string { return fmt.Sprintf("v%d", i+1) }

// partition moves the given nodes to the far bridge: they reach each other
// but not the rest.
func (tp *topology) partition(idx ...int) {
	tp.t.Helper()
	for _, i := range idx {
		if err := run("ip", "-n", tp.hub, "link", "set", tp.port(i), "master", "br1"); err != nil {
			tp.t.Fatal(err)
		}
	}
}

// heal puts every node back on the one bridge.
func (tp *topology) heal() {
	tp.t.Helper()
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
