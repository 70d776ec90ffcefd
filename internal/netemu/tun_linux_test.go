package netemu

import (
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func ipCmd(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// inNetns runs fn on an OS thread inside the namespace at path; the
// thread is dropped afterwards (never reused outside the namespace).
func inNetns(path string, fn func() error) error {
	ch := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		f, err := os.Open(path)
		if err != nil {
			ch <- err
			return
		}
		defer f.Close()
		if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
			ch <- err
			return
		}
		ch <- fn()
	}()
	return <-ch
}

// Two namespaces joined only through TUN devices and the emulator, with
// 20 ms each way: a TCP handshake takes at least one round trip (40 ms)
// and data crosses intact.
func TestTUNBetweenNamespaces(t *testing.T) {
	if testing.Short() {
		t.Skip("netemu: creates network namespaces; skipped with -short")
	}
	if os.Geteuid() != 0 {
		t.Skip("netemu: TUN devices in namespaces need root")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("netemu: needs iproute2's ip")
	}
	if _, err := os.Stat("/dev/net/tun"); err != nil {
		t.Skip("netemu: no /dev/net/tun")
	}
	const delay = 20 * time.Millisecond
	// Fixed names: a run that was killed leaves them, and the next removes them.
	names := []string{"gmne-a", "gmne-b"}
	addrs := []string{"10.98.0.1", "10.98.0.2"}
	cfg := DefaultConfig()
	cfg.Link.Delay = delay
	emu, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range names {
		_ = exec.Command("ip", "netns", "del", ns).Run()
	}
	t.Cleanup(func() {
		emu.Close() // closes the TUN files: the devices go
		for _, ns := range names {
			_ = exec.Command("ip", "netns", "del", ns).Run()
		}
	})
	for i, ns := range names {
		ipCmd(t, "netns", "add", ns)
		tun, err := OpenTUN("/run/netns/"+ns, "tun0")
		if err != nil {
			t.Fatal(err)
		}
		if err := emu.Attach(ns, netip.MustParseAddr(addrs[i]), tun); err != nil {
			tun.Close()
			t.Fatal(err)
		}
		ipCmd(t, "-n", ns, "link", "set", "lo", "up")
		ipCmd(t, "-n", ns, "link", "set", "tun0", "mtu", "9000", "up")
		ipCmd(t, "-n", ns, "addr", "add", addrs[i]+"/24", "dev", "tun0")
	}
	var ln net.Listener
	if err := inNetns("/run/netns/"+names[1], func() (err error) {
		ln, err = net.Listen("tcp", addrs[1]+":7000")
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		_, _ = io.Copy(c, c)
	}()
	var conn net.Conn
	var rtt time.Duration
	if err := inNetns("/run/netns/"+names[0], func() (err error) {
		start := time.Now()
		conn, err = net.DialTimeout("tcp", addrs[1]+":7000", 10*time.Second)
		rtt = time.Since(start)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if rtt < 2*delay {
		t.Fatalf("TCP handshake took %s through links of %s each way; want >= %s", rtt, delay, 2*delay)
	}
	msg := make([]byte, 256<<10)
	for i := range msg {
		msg[i] = byte(i * 7)
	}
	go func() { _, _ = conn.Write(msg) }()
	got := make([]byte, len(msg))
	_ = conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	if _, err := io.ReadFull(conn, got); err != nil {
		t.Fatalf("echo through the emulator: %v", err)
	}
	for i := range got {
		if got[i] != msg[i] {
			t.Fatalf("byte %d differs after the round trip", i)
		}
	}
	st := emu.Stats()
	if st.Total().Delivered == 0 || st.Total().DelayMax < delay {
		t.Fatalf("stats %+v: want packets delivered with >= %s delay", st.Total(), delay)
	}
	t.Logf("handshake %s; %d packets delivered", rtt, st.Total().Delivered)
}
