package collective

import (
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// unixLanes counts the lanes of s's endpoints that run over Unix sockets.
func unixLanes(s *Server) (unix, all int) {
	s.svc.mu.Lock()
	defer s.svc.mu.Unlock()
	for _, ep := range s.svc.eps {
		ep.qmu.Lock()
		for _, l := range ep.lanes {
			all++
			if _, ok := l.raw.(*net.UnixConn); ok {
				unix++
			}
		}
		ep.qmu.Unlock()
	}
	return unix, all
}

// Two Services of one host (both on 127.0.0.1) carry their lanes over the
// same-host Unix socket, with exact results; with UnixLanes off they use
// TCP.
func TestUnixLanesBetweenServicesOfOneHost(t *testing.T) {
	for _, on := range []bool{true, false} {
		gcfg := DefaultNetConfig()
		gcfg.UnixLanes = on
		g, err := NewLoopbackGroup("job", 1, 2, testConfig(), gcfg)
		if err != nil {
			t.Fatal(err)
		}
		allReduceChecked(t, g.Comms, Float32, OpSum, 300001, "unix lanes")
		for i, s := range g.Servers {
			unix, all := unixLanes(s)
			acc, uacc := s.Service().LanesAccepted(), s.Service().UnixLanesAccepted()
			if all != 4 || acc != 2 {
				t.Errorf("unix lanes %v: server %d has %d lanes (%d accepted), want 4 (2)", on, i, all, acc)
			}
			want := 0
			if on {
				want = all
			}
			if unix != want || int(uacc) != want/2 {
				t.Errorf("unix lanes %v: server %d has %d Unix lanes (%d accepted), want %d (%d)", on, i, unix, uacc, want, want/2)
			}
		}
		g.Close()
	}
}

// A sender that cannot reach the offered Unix socket (closed here; another
// network namespace in practice) connects its lane over TCP.
func TestUnixLaneFallsBackToTCP(t *testing.T) {
	g, err := NewLoopbackGroup("job", 1, 2, testConfig(), DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	m := g.Servers[1].lis.(*muxListener)
	if m.unix == nil {
		t.Fatal("no same-host lane socket")
	}
	_ = m.unix.Close()
	allReduceChecked(t, g.Comms, Float64, OpAvg, 100003, "fallback")
	if n := g.Servers[1].Service().UnixLanesAccepted(); n != 0 {
		t.Fatalf("server 1 accepted %d Unix lanes after closing its socket", n)
	}
	if n := g.Servers[1].Service().LanesAccepted(); n != 2 {
		t.Fatalf("server 1 accepted %d lanes, want 2 over TCP", n)
	}
	if n := g.Servers[0].Service().UnixLanesAccepted(); n != 2 {
		t.Fatalf("server 0 accepted %d Unix lanes, want 2", n)
	}
}

func TestUnixLaneTarget(t *testing.T) {
	name := unixLanePrefix + strings.Repeat("ab", 16)
	for _, c := range []struct {
		on              bool
		own, peer, name string
		want            string
	}{
		{true, "127.0.0.1:7947", "127.0.0.2:7947", name, name},
		{true, "10.0.0.5:7947", "10.0.0.5:8947", name, name},
		{false, "127.0.0.1:7947", "127.0.0.2:7947", name, ""},
		{true, "10.0.0.5:7947", "10.0.0.6:7947", name, ""},
		{true, "127.0.0.1:7947", "10.0.0.6:7947", name, ""},
		{true, "127.0.0.1:7947", "127.0.0.2:7947", "", ""},
		{true, "127.0.0.1:7947", "127.0.0.2:7947", "/tmp/sock", ""},
		{true, "127.0.0.1:7947", "127.0.0.2:7947", unixLanePrefix + "x", ""},
	} {
		if got := unixLaneTarget(c.on, c.own, c.peer, c.name); got != c.want {
			t.Errorf("unixLaneTarget(%v, %s, %s, %q) = %q, want %q", c.on, c.own, c.peer, c.name, got, c.want)
		}
	}
}

// The same-host socket serves lanes only: anything else is closed, and a
// lane with an unknown token is refused as on the TCP port.
func TestUnixLaneSocketServesLanesOnly(t *testing.T) {
	s, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	name := s.Service().unixLaneName()
	if name == "" {
		t.Fatal("no same-host lane socket")
	}
	c, err := net.Dial("unix", name)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, _ = c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"))
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if b, err := io.ReadAll(c); len(b) != 0 || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a gRPC preface on the lane socket: read %q, %v; want it closed", b, err)
	}
	c2, err := net.Dial("unix", name)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	var tok laneToken
	_, _ = c2.Write(append([]byte(laneMagic), tok[:]...))
	_ = c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	b, _ := io.ReadAll(c2)
	if len(b) < 3 || b[0] != laneStatusRefused || !strings.Contains(string(b), "unknown or already used lane token") {
		t.Fatalf("unknown token on the lane socket: %q", b)
	}
	// Closing the server closes the socket.
	s.Close()
	if c3, err := net.Dial("unix", name); err == nil {
		c3.Close()
		t.Fatal("the lane socket outlives its server")
	}
}
