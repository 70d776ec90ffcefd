package mesh_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/mesh"
	"github.com/gpumesh/gpumesh/mesh/meshtest"
)

// TestMain fails the run if any goroutine outlives the tests. memberlist's
// Shutdown does not wait for a probe in flight, which ends by itself within
// ProbeInterval × AwarenessMaxMultiplier, so the check retries for a while.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		deadline := time.Now().Add(10 * time.Second)
		for {
			err := goleak.Find()
			if err == nil {
				break
			}
			if time.Now().After(deadline) {
				fmt.Fprintf(os.Stderr, "goroutines still running 10 s after the tests: %v\n", err)
				code = 1
				break
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	os.Exit(code)
}

func isEvent(typ mesh.EventType, name string) func(mesh.Event) bool {
	return func(ev mesh.Event) bool { return ev.Type == typ && ev.Member.Name == name }
}

func TestJoinLeaveFailEvents(t *testing.T) {
	a := meshtest.New(t, meshtest.Config(t, "a"))
	events, cancel := a.Subscribe()
	defer cancel()
	ms := []*mesh.Mesh{a}
	for _, name := range []string{"b", "c"} {
		ms = append(ms, meshtest.New(t, meshtest.Config(t, name)))
	}
	for _, m := range ms[1:] {
		if _, err := m.Join(context.Background(), []string{a.Addr()}); err != nil {
			t.Fatal(err)
		}
	}
	meshtest.WaitConverged(t, ms, 3)
	joined := map[string]bool{}
	for len(joined) < 2 {
		ev := meshtest.NextEvent(t, events, 10*time.Second, func(ev mesh.Event) bool { return ev.Type == mesh.EventJoin }, "join")
		name := ev.Member.Name
		if ev.Member.State != mesh.StateAlive || ev.Member.Meta.ID != "id-"+name || ev.Member.Meta.Addrs.Gossip != ev.Member.Addr {
			t.Errorf("join event for %s: %+v", name, ev.Member)
		}
		joined[name] = true
	}
	if !joined["b"] || !joined["c"] {
		t.Fatalf("join events for %v, want b and c", joined)
	}

	// b leaves gracefully: a reports a leave, not a failure.
	b, c := ms[1], ms[2]
	if err := b.Leave(5 * time.Second); err != nil {
		t.Fatalf("leave: %v", err)
	}
	ev := meshtest.NextEvent(t, events, 10*time.Second, func(ev mesh.Event) bool { return ev.Member.Name == "b" }, "event about b")
	if ev.Type != mesh.EventLeave || ev.Member.State != mesh.StateLeft {
		t.Fatalf("after Leave, a got %v with state %v, want leave/left", ev.Type, ev.Member.State)
	}
	if err := b.Shutdown(); err != nil {
		t.Fatal(err)
	}
	if mem, ok := c.Member("b"); !ok || mem.State != mesh.StateLeft {
		meshtest.WaitMember(t, c, "b", func(m mesh.Member) bool { return m.State == mesh.StateLeft }, "b left")
	}

	// c stops without leaving: a sees it suspect, then a failure.
	if err := c.Shutdown(); err != nil {
		t.Fatal(err)
	}
	ev = meshtest.NextEvent(t, events, 20*time.Second, func(ev mesh.Event) bool { return ev.Member.Name == "c" }, "event about c")
	if ev.Type != mesh.EventFailed || ev.Member.State != mesh.StateDead {
		t.Fatalf("after c stopped, a got %v with state %v, want failed/dead", ev.Type, ev.Member.State)
	}
	mem := meshtest.WaitMember(t, a, "c", func(m mesh.Member) bool { return m.State == mesh.StateDead }, "c dead")
	if mem.Meta.ID != "id-c" {
		t.Errorf("a dead member keeps its last metadata, got %+v", mem.Meta)
	}
	if got := a.NumAlive(); got != 1 {
		t.Errorf("a counts %d alive, want 1", got)
	}
}

func TestSuspectBeforeDead(t *testing.T) {
	ms := meshtest.StartCluster(t, "s", 3, func(i int, c *mesh.Config) {
		// A long suspicion window, so that polling sees it on a loaded machine.
		c.SuspicionMult = 6
	})
	victim := ms[2]
	if err := victim.Shutdown(); err != nil {
		t.Fatal(err)
	}
	seen := map[mesh.State]bool{}
	poll.Until(t, 60*time.Second, func() (bool, string) {
		mem, ok := ms[0].Member(victim.Name())
		if !ok {
			return false, "victim not listed"
		}
		seen[mem.State] = true
		return mem.State == mesh.StateDead, fmt.Sprintf("victim is %v", mem.State)
	})
	if !seen[mesh.StateSuspect] {
		t.Fatalf("Members never reported the stopped node as suspect before dead; saw %v", seen)
	}
}

func TestMetaUpdatePropagates(t *testing.T) {
	ms := meshtest.StartCluster(t, "u", 3, nil)
	events, cancel := ms[2].Subscribe()
	defer cancel()
	err := ms[0].UpdateMeta(func(m *mesh.Meta) {
		m.Status = mesh.StatusDraining
		m.Role = mesh.RoleVoter
		m.Addrs.RPC = "127.0.0.1:7947"
		m.GPUs = []mesh.GPU{{Model: "Tesla T4", MemoryBytes: 16 << 30}}
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := ms[0].LocalMeta(); got.Status != mesh.StatusDraining {
		t.Fatalf("local meta not updated: %+v", got)
	}
	name := ms[0].Name()
	for _, m := range ms {
		meshtest.WaitMember(t, m, name, func(mem mesh.Member) bool {
			return mem.Meta.Status == mesh.StatusDraining && mem.Meta.Role == mesh.RoleVoter &&
				mem.Meta.GPUCount() == 1 && mem.Meta.Addrs.RPC == "127.0.0.1:7947"
		}, "draining voter with one T4")
	}
	ev := meshtest.NextEvent(t, events, 10*time.Second, isEvent(mesh.EventUpdate, name), "update")
	if ev.Member.Meta.Status != mesh.StatusDraining {
		t.Errorf("update event carries %+v", ev.Member.Meta)
	}

	// Identity cannot change.
	if err := ms[0].UpdateMeta(func(m *mesh.Meta) { m.Name = "other" }); !errors.Is(err, mesh.ErrImmutableMeta) {
		t.Errorf("renaming via UpdateMeta: got %v, want ErrImmutableMeta", err)
	}
}

func TestOversizedMetaRefused(t *testing.T) {
	long := strings.Repeat("h", 200) + ".example"
	cfg := meshtest.Config(t, "big")
	cfg.Meta.Addrs = mesh.Addresses{RPC: long + ":1", Raft: "a" + long + ":2", HTTP: "b" + long + ":3"}
	if _, err := mesh.New(cfg); !errors.Is(err, mesh.ErrMetaTooLarge) {
		t.Fatalf("New with oversized meta: got %v, want ErrMetaTooLarge", err)
	}

	m := meshtest.New(t, meshtest.Config(t, "small"))
	before := m.LocalMeta()
	err := m.UpdateMeta(func(mt *mesh.Meta) {
		mt.Addrs = mesh.Addresses{Gossip: mt.Addrs.Gossip, RPC: long + ":1", Raft: "a" + long + ":2", HTTP: "b" + long + ":3"}
	})
	if !errors.Is(err, mesh.ErrMetaTooLarge) {
		t.Fatalf("UpdateMeta oversized: got %v, want ErrMetaTooLarge", err)
	}
	if after := m.LocalMeta(); !after.Equal(before) {
		t.Fatalf("a refused update changed the metadata: %+v", after)
	}
	if mem, ok := m.Member("small"); !ok || !mem.Meta.Equal(before) {
		t.Fatalf("a refused update reached the member table: %+v", mem)
	}
}

func TestEncryption(t *testing.T) {
	key := bytes.Repeat([]byte{7}, mesh.KeySize)
	other := bytes.Repeat([]byte{9}, mesh.KeySize)
	ms := meshtest.StartCluster(t, "enc", 2, func(_ int, c *mesh.Config) { c.SecretKey = key })

	tryJoin := func(name string, k []byte) error {
		c := meshtest.Config(t, name)
		c.SecretKey = k
		m := meshtest.New(t, c)
		ctx, cancel := context.WithTimeout(context.Background(), 600*time.Millisecond)
		defer cancel()
		_, err := m.Join(ctx, []string{ms[0].Addr()})
		return err
	}
	if err := tryJoin("nokey", nil); err == nil {
		t.Fatal("a node without the key joined an encrypted mesh")
	}
	if err := tryJoin("wrongkey", other); err == nil {
		t.Fatal("a node with a different key joined")
	}
	if err := tryJoin("rightkey", key); err != nil {
		t.Fatalf("a node with the key could not join: %v", err)
	}
	meshtest.WaitConverged(t, ms, 3)
	for _, name := range []string{"nokey", "wrongkey"} {
		if _, ok := ms[1].Member(name); ok {
			t.Errorf("%s is listed by the encrypted mesh", name)
		}
	}
}

func TestDecodeKey(t *testing.T) {
	good := "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
	k, err := mesh.DecodeKey(good)
	if err != nil || len(k) != 32 || k[31] != 31 {
		t.Fatalf("DecodeKey(%q) = %v, %v", good, k, err)
	}
	for _, bad := range []string{"", "not base64!", "AAECAwQFBgcICQoLDA0ODw=="} {
		if _, err := mesh.DecodeKey(bad); !errors.Is(err, mesh.ErrInvalidKey) || !strings.Contains(err.Error(), "openssl rand -base64 32") {
			t.Errorf("DecodeKey(%q): got %v, want ErrInvalidKey naming the fix", bad, err)
		}
	}
	gen, err := mesh.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	if k, err := mesh.DecodeKey(gen); err != nil || len(k) != mesh.KeySize {
		t.Fatalf("GenerateKey gave %q, which DecodeKey reads as %v, %v", gen, k, err)
	}
	c := meshtest.Config(t, "k")
	c.SecretKey = []byte("short")
	if err := c.Validate(); !errors.Is(err, mesh.ErrInvalidKey) {
		t.Errorf("Validate with a 5-byte key: got %v, want ErrInvalidKey", err)
	}
}

// logSink collects log lines so a test can wait for one.
type logSink struct {
	mu    sync.Mutex
	lines []string
}

func (s *logSink) Write(p []byte) (int, error) {
	s.mu.Lock()
	s.lines = append(s.lines, string(p))
	s.mu.Unlock()
	return len(p), nil
}

func (s *logSink) count(substr string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for _, l := range s.lines {
		if strings.Contains(l, substr) {
			n++
		}
	}
	return n
}

// freePort returns a port free for TCP and UDP on 127.0.0.1, chosen below
// the kernel's ephemeral range (32768 and up by default): a test that frees
// a port and binds it again later must not lose it to an outgoing
// connection of a test running in parallel, which takes its local port from
// that range.
func freePort(t *testing.T) int {
	t.Helper()
	for i := 0; i < 1000; i++ {
		port := 20000 + rand.IntN(12000)
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", port))
		if err != nil {
			continue
		}
		u, err := net.ListenPacket("udp", fmt.Sprintf("127.0.0.1:%d", port))
		l.Close()
		if err != nil {
			continue
		}
		u.Close()
		return port
	}
	t.Fatal("no free port in 20000-31999 on 127.0.0.1")
	return 0
}

func TestJoinRetriesUntilPeerStarts(t *testing.T) {
	port := freePort(t)
	sink := &logSink{}
	c := meshtest.Config(t, "early")
	c.Logger = hclog.New(&hclog.LoggerOptions{Output: sink, Level: hclog.Warn})
	early := meshtest.New(t, c)

	type result struct {
		n   int
		err error
	}
	done := make(chan result, 1)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	go func() {
		n, err := early.Join(ctx, []string{fmt.Sprintf("127.0.0.1:%d", port)})
		done <- result{n, err}
	}()
	// Let it fail a few times, with growing waits, before the peer exists.
	poll.Until(t, 20*time.Second, func() (bool, string) {
		n := sink.count("join failed, retrying")
		return n >= 3, fmt.Sprintf("%d failed attempts logged", n)
	})
	select {
	case r := <-done:
		t.Fatalf("Join returned before the peer existed: %d, %v", r.n, r.err)
	default:
	}
	lc := meshtest.Config(t, "late")
	lc.BindPort = port
	late := meshtest.New(t, lc)
	select {
	case r := <-done:
		if r.err != nil || r.n != 1 {
			t.Fatalf("Join = %d, %v; want 1, nil", r.n, r.err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("Join did not succeed after the peer started")
	}
	meshtest.WaitConverged(t, []*mesh.Mesh{early, late}, 2)
	select {
	case <-early.Joined():
	default:
		t.Error("Joined() not closed after a successful join")
	}
}

// A seed that accepts connections but never answers must not hold up a
// join that another seed answers.
func TestJoinNotHeldUpBySilentSeed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var (
		mu    sync.Mutex
		conns []net.Conn
	)
	accepted := make(chan struct{}, 1)
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			select {
			case accepted <- struct{}{}:
			default:
			}
		}
	}()
	defer func() {
		l.Close()
		mu.Lock()
		for _, c := range conns {
			c.Close()
		}
		mu.Unlock()
	}()

	seed := meshtest.New(t, meshtest.Config(t, "live"))
	c := meshtest.Config(t, "joiner")
	c.TCPTimeout = time.Hour // the silent seed would hold a sequential join for this long
	c.JoinMaxPeers = 2
	j := meshtest.New(t, c)
	if _, err := j.Join(context.Background(), []string{l.Addr().String(), seed.Addr()}); err != nil {
		t.Fatal(err)
	}
	<-accepted // the silent seed was contacted too, and is still holding its connection
	meshtest.WaitConverged(t, []*mesh.Mesh{seed, j}, 2)
}

func TestJoinGivesUpWithContext(t *testing.T) {
	m := meshtest.New(t, meshtest.Config(t, "lonely"))
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := m.Join(ctx, []string{fmt.Sprintf("127.0.0.1:%d", freePort(t))})
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Join past its deadline: got %v, want DeadlineExceeded", err)
	}
	if _, err := m.Join(context.Background(), []string{m.Addr()}); !errors.Is(err, mesh.ErrNoPeers) {
		t.Fatalf("Join with only our own address: got %v, want ErrNoPeers", err)
	}
}

func TestAutoJoinWithDiscoverer(t *testing.T) {
	seed := meshtest.New(t, meshtest.Config(t, "seed"))
	var calls atomic.Int32
	d := mesh.DiscovererFunc(func(ctx context.Context) ([]string, error) {
		switch calls.Add(1) {
		case 1:
			return nil, errors.New("tag lookup failed")
		case 2:
			return nil, nil // nothing tagged yet
		}
		return []string{seed.Addr()}, nil
	})
	c := meshtest.Config(t, "auto")
	c.Discoverer = d
	auto := meshtest.New(t, c)
	select {
	case <-auto.Joined():
	case <-time.After(20 * time.Second):
		t.Fatalf("auto-join did not join; discoverer called %d times", calls.Load())
	}
	if calls.Load() < 3 {
		t.Errorf("joined after %d discoveries, want the two failures retried", calls.Load())
	}
	meshtest.WaitConverged(t, []*mesh.Mesh{seed, auto}, 2)
}

func TestAutoJoinRejoinsWhenAlone(t *testing.T) {
	a := meshtest.New(t, meshtest.Config(t, "ra"))
	port := freePort(t)
	bc := meshtest.Config(t, "rb")
	bc.BindPort = port
	b := meshtest.New(t, bc)
	cc := meshtest.Config(t, "rc")
	cc.Discoverer = mesh.StaticDiscoverer{a.Addr(), b.Addr()}
	cc.RejoinAfterAlone = 300 * time.Millisecond
	c := meshtest.New(t, cc)
	meshtest.WaitConverged(t, []*mesh.Mesh{a, b, c}, 3)

	// Both peers go away; c is alone. A new b comes back on the same
	// address and name but knows nobody: c must find it again itself.
	a.Shutdown()
	b.Shutdown()
	poll.Until(t, 30*time.Second, func() (bool, string) {
		return c.NumAlive() == 1, fmt.Sprintf("c sees %d alive", c.NumAlive())
	})
	b2 := meshtest.New(t, bc)
	meshtest.WaitConverged(t, []*mesh.Mesh{b2, c}, 2)
}

func TestRestartedNodeRejoins(t *testing.T) {
	ms := meshtest.StartCluster(t, "r", 3, nil)
	port := freePort(t)
	// A node with a fixed port, killed and restarted with the same name
	// and address (refutes its old death), then once more on another port
	// (takes over its dead name after DeadNodeReclaimTime).
	cfg := meshtest.Config(t, "phoenix")
	cfg.BindPort = port
	start := func(cfg mesh.Config) *mesh.Mesh {
		m := meshtest.New(t, cfg)
		if _, err := m.Join(context.Background(), []string{ms[0].Addr()}); err != nil {
			t.Fatal(err)
		}
		return m
	}
	p := start(cfg)
	meshtest.WaitConverged(t, append(ms, p), 4)
	for round, port := range []int{port, 0} {
		p.Shutdown()
		for _, m := range ms {
			meshtest.WaitMember(t, m, "phoenix", func(mem mesh.Member) bool { return mem.State == mesh.StateDead }, "phoenix dead")
		}
		cfg.BindPort = port
		p = start(cfg)
		for _, m := range ms {
			meshtest.WaitMember(t, m, "phoenix", func(mem mesh.Member) bool {
				return mem.State == mesh.StateAlive && mem.Addr == p.Addr()
			}, fmt.Sprintf("phoenix alive again at %s (round %d)", p.Addr(), round))
		}
	}
}

func TestSlowSubscriberDoesNotStallGossip(t *testing.T) {
	release := make(chan struct{})
	var (
		mu   sync.Mutex
		seen []string
	)
	c := meshtest.Config(t, "slow0")
	c.OnEvent = func(ev mesh.Event) {
		mu.Lock()
		seen = append(seen, ev.Type.String()+" "+ev.Member.Name)
		mu.Unlock()
		<-release
	}
	first := meshtest.New(t, c)
	stuck, cancel := first.Subscribe() // not read until the mesh has converged
	defer cancel()
	ms := []*mesh.Mesh{first}
	for i := 1; i < 4; i++ {
		m := meshtest.New(t, meshtest.Config(t, fmt.Sprintf("slow%d", i)))
		if _, err := m.Join(context.Background(), []string{first.Addr()}); err != nil {
			t.Fatal(err)
		}
		ms = append(ms, m)
	}
	meshtest.WaitConverged(t, ms, 4)
	mu.Lock()
	if len(seen) != 1 || seen[0] != "join slow0" {
		t.Errorf("while blocked, OnEvent saw %q, want just the local join", seen)
	}
	mu.Unlock()
	close(release)
	// Nothing was lost while nobody read: the subscriber gets all 3 joins.
	got := map[string]bool{}
	for len(got) < 3 {
		ev := meshtest.NextEvent(t, stuck, 10*time.Second, func(ev mesh.Event) bool { return ev.Type == mesh.EventJoin }, "join")
		got[ev.Member.Name] = true
	}
	for i := 1; i < 4; i++ {
		if !got[fmt.Sprintf("slow%d", i)] {
			t.Errorf("subscriber missed the join of slow%d: %v", i, got)
		}
	}
	poll.Until(t, 10*time.Second, func() (bool, string) {
		mu.Lock()
		defer mu.Unlock()
		return len(seen) >= 4, fmt.Sprintf("OnEvent saw %q", seen)
	})
}

func TestShutdownIdempotentAndClosesSubscriptions(t *testing.T) {
	ms := meshtest.StartCluster(t, "sd", 2, nil)
	ch, cancel := ms[0].Subscribe()
	defer cancel()
	if err := ms[0].Shutdown(); err != nil {
		t.Fatal(err)
	}
	if err := ms[0].Shutdown(); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	poll.Until(t, 5*time.Second, func() (bool, string) {
		select {
		case _, ok := <-ch:
			return !ok, "subscription channel still open"
		default:
			return false, "subscription channel still open"
		}
	})
	if err := ms[0].UpdateMeta(func(*mesh.Meta) {}); !errors.Is(err, mesh.ErrShutdown) {
		t.Errorf("UpdateMeta after Shutdown: got %v, want ErrShutdown", err)
	}
	if err := ms[0].Leave(time.Second); !errors.Is(err, mesh.ErrShutdown) {
		t.Errorf("Leave after Shutdown: got %v, want ErrShutdown", err)
	}
	if _, err := ms[0].Join(context.Background(), []string{ms[1].Addr()}); !errors.Is(err, mesh.ErrShutdown) {
		t.Errorf("Join after Shutdown: got %v, want ErrShutdown", err)
	}
	late, cancelLate := ms[0].Subscribe()
	defer cancelLate()
	if _, ok := <-late; ok {
		t.Error("Subscribe after Shutdown returned an open channel with an event")
	}
	// goleak in TestMain checks that no goroutine survives.
}

func TestConfigValidate(t *testing.T) {
	cases := map[string]func(*mesh.Config){
		"no name":         func(c *mesh.Config) { c.NodeName = "" },
		"no id":           func(c *mesh.Config) { c.NodeID = "" },
		"bind not ip":     func(c *mesh.Config) { c.BindAddr = "localhost" },
		"port":            func(c *mesh.Config) { c.BindPort = 70000 },
		"probe timeout":   func(c *mesh.Config) { c.ProbeTimeout = c.ProbeInterval },
		"retry order":     func(c *mesh.Config) { c.JoinRetryMax = c.JoinRetryMin / 2 },
		"suspicion":       func(c *mesh.Config) { c.SuspicionMult = 1 },
		"gossip interval": func(c *mesh.Config) { c.GossipInterval = 0 },
		"sync delay":      func(c *mesh.Config) { c.JoinSyncDelay = 0 },
	}
	for name, mod := range cases {
		t.Run(name, func(t *testing.T) {
			c := mesh.DefaultLANConfig()
			c.NodeName, c.NodeID = "n", "i"
			if err := c.Validate(); err != nil {
				t.Fatalf("defaults do not validate: %v", err)
			}
			mod(&c)
			if err := c.Validate(); !errors.Is(err, mesh.ErrInvalidConfig) {
				t.Fatalf("got %v, want ErrInvalidConfig", err)
			}
		})
	}
	l := mesh.DefaultLocalConfig()
	l.NodeName, l.NodeID = "n", "i"
	if err := l.Validate(); err != nil {
		t.Fatalf("local defaults do not validate: %v", err)
	}
}

func TestPortInUse(t *testing.T) {
	port := freePort(t)
	c := meshtest.Config(t, "first")
	c.BindPort = port
	meshtest.New(t, c)
	c2 := meshtest.Config(t, "second")
	c2.BindPort = port
	_, err := mesh.New(c2)
	if err == nil || !strings.Contains(err.Error(), "in use") {
		t.Fatalf("second node on port %d: got %v, want an error saying the port is in use", port, err)
	}
}

// After a node declares a peer dead it makes one push-pull with a random
// live member (so that a refuted false death does not linger).
func TestSyncAfterFailure(t *testing.T) {
	sink := &logSink{}
	ms := meshtest.StartCluster(t, "fs", 3, func(i int, c *mesh.Config) {
		c.PushPullInterval = 0 // only the syncs under test exchange state
		c.JoinSyncRounds = 0
		if i == 0 {
			c.Logger = hclog.New(&hclog.LoggerOptions{Output: sink, Level: hclog.Debug})
		}
	})
	before := sink.count("Initiating push/pull sync")
	ms[2].Shutdown()
	meshtest.WaitMember(t, ms[0], ms[2].Name(), func(m mesh.Member) bool { return m.State == mesh.StateDead }, "dead")
	poll.Until(t, 10*time.Second, func() (bool, string) {
		n := sink.count("Initiating push/pull sync")
		return n > before, fmt.Sprintf("%d push-pulls after the failure, want more than %d", n, before)
	})
}

// SuspicionTimeouts and SuspicionConfirmations follow memberlist's
// formula (suspicionTimeout in its util.go and the k of suspectNode).
func TestSuspicionTimeouts(t *testing.T) {
	c := mesh.Config{ProbeInterval: 300 * time.Millisecond, SuspicionMult: 3, SuspicionMaxTimeoutMult: 6}
	for _, tc := range []struct {
		n        int
		min, max time.Duration
		k        int
	}{
		{n: 1, min: 900 * time.Millisecond, max: 5400 * time.Millisecond, k: 0},
		{n: 2, min: 900 * time.Millisecond, max: 5400 * time.Millisecond, k: 0},
		{n: 3, min: 900 * time.Millisecond, max: 5400 * time.Millisecond, k: 1},
		{n: 10, min: 900 * time.Millisecond, max: 5400 * time.Millisecond, k: 1},
		// log10(50) = 1.69897 -> 1.698 (milli precision) -> 3 × 1.698 × 300 ms
		{n: 50, min: 1528200 * time.Microsecond, max: 6 * 1528200 * time.Microsecond, k: 1},
		{n: 1000, min: 2700 * time.Millisecond, max: 16200 * time.Millisecond, k: 1},
	} {
		min, max := c.SuspicionTimeouts(tc.n)
		if min != tc.min || max != tc.max {
			t.Errorf("n=%d: SuspicionTimeouts = %v, %v; want %v, %v", tc.n, min, max, tc.min, tc.max)
		}
		if k := c.SuspicionConfirmations(tc.n); k != tc.k {
			t.Errorf("n=%d: SuspicionConfirmations = %d, want %d", tc.n, k, tc.k)
		}
	}
}

// The LAN preset's failure-detection budget at 50 nodes (doc.go, "Failure
// detection: where the time goes") stays under issue 2's 3 s target with
// room for the tail of probe waits: 5 probe intervals until the first
// failed probe, the confirmed suspicion, and 3 gossip rounds.
func TestLANPresetDetectionBudget(t *testing.T) {
	c := mesh.DefaultLANConfig()
	min, max := c.SuspicionTimeouts(50)
	budget := 5*c.ProbeInterval + min + 3*c.GossipInterval
	if budget >= 2500*time.Millisecond {
		t.Errorf("DefaultLANConfig detection budget at 50 nodes is %v (5 × %v + %v + 3 × %v), want < 2.5 s",
			budget, c.ProbeInterval, min, c.GossipInterval)
	}
	if k := c.SuspicionConfirmations(50); k < 1 {
		t.Errorf("DefaultLANConfig needs %d suspicion confirmations at 50 nodes, want >= 1 (one slow prober alone must not kill a node in min)", k)
	}
	if max < 3*min {
		t.Errorf("unconfirmed suspicion lasts %v, want >= 3 × min (%v) to give a starved node time to refute", max, min)
	}
	if c.ProbeTimeout*2 > c.ProbeInterval {
		t.Errorf("ProbeTimeout %v leaves less than half of ProbeInterval %v to the indirect and TCP probes", c.ProbeTimeout, c.ProbeInterval)
	}
}
