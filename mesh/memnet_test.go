package mesh_test

import (
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/mesh"
	"github.com/gpumesh/gpumesh/mesh/meshtest"
	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/memberlist"
)

// drain returns the packets queued for t right now (zero-delay packets
// are queued before WriteTo returns).
func drain(t *mesh.MemTransport) []*memberlist.Packet {
	var out []*memberlist.Packet
	for {
		select {
		case p := <-t.PacketCh():
			out = append(out, p)
		default:
			return out
		}
	}
}

func TestMemNetworkDelay(t *testing.T) {
	n := mesh.NewMemNetwork()
	a, b := n.NewTransport(), n.NewTransport()
	defer a.Shutdown()
	defer b.Shutdown()
	const d = 30 * time.Millisecond
	n.SetLink(a.Addr(), b.Addr(), mesh.LinkFault{Delay: d})

	sent, err := a.WriteTo([]byte("ping"), b.Addr())
	if err != nil {
		t.Fatal(err)
	}
	select {
	case p := <-b.PacketCh():
		if got := p.Timestamp.Sub(sent); got < d {
			t.Errorf("packet arrived %v after it was sent, link delay is %v", got, d)
		}
		if string(p.Buf) != "ping" || p.From.String() != a.Addr() {
			t.Errorf("got %q from %s, want \"ping\" from %s", p.Buf, p.From, a.Addr())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("delayed packet never arrived")
	}

	// The reverse direction has no delay: the packet is queued at once.
	if _, err := b.WriteTo([]byte("ack"), a.Addr()); err != nil {
		t.Fatal(err)
	}
	if got := drain(a); len(got) != 1 || string(got[0].Buf) != "ack" {
		t.Fatalf("undelayed reverse packet: got %d packets, want the ack at once", len(got))
	}

	// A stream dial waits for the link delay too.
	go func() {
		c := <-b.StreamCh()
		_, _ = c.Write([]byte("hello"))
		c.Close()
	}()
	start := time.Now()
	c, err := a.DialTimeout(b.Addr(), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if got := time.Since(start); got < d {
		t.Errorf("dial took %v, link delay is %v", got, d)
	}
	buf, err := io.ReadAll(c)
	if err != nil || string(buf) != "hello" {
		t.Fatalf("stream read %q, %v", buf, err)
	}
	c.Close()
	if st := b.Stats(); st.StreamBytes != 5 || st.Packets != 1 || st.PacketBytes != 3 {
		t.Errorf("b's stats %+v, want 1 packet of 3 bytes and 5 stream bytes", st)
	}
}

func TestMemNetworkLoss(t *testing.T) {
	n := mesh.NewMemNetwork()
	a, b := n.NewTransport(), n.NewTransport()
	defer a.Shutdown()
	defer b.Shutdown()

	n.SetLink(a.Addr(), b.Addr(), mesh.LinkFault{Loss: 1})
	for i := 0; i < 100; i++ {
		if _, err := a.WriteTo([]byte{1}, b.Addr()); err != nil {
			t.Fatal(err) // a lost packet is not an error, as with UDP
		}
	}
	if got := drain(b); len(got) != 0 {
		t.Fatalf("%d packets arrived over a link with loss 1", len(got))
	}
	if st := a.Stats(); st.Packets != 100 {
		t.Errorf("sender counted %d packets, want 100 (lost ones count as sent)", st.Packets)
	}

	n.SetLink(a.Addr(), b.Addr(), mesh.LinkFault{Loss: 0.5})
	const sends = 2000
	got := 0
	for i := 0; i < sends; i++ {
		_, _ = a.WriteTo([]byte{1}, b.Addr())
		got += len(drain(b))
	}
	// Binomial(2000, 0.5): 800..1200 is over 20 standard deviations wide.
	if got < 800 || got > 1200 {
		t.Errorf("%d of %d packets arrived at loss 0.5", got, sends)
	}

	// The default fault applies to links without their own.
	n.SetDefault(mesh.LinkFault{Loss: 1})
	_, _ = b.WriteTo([]byte{1}, a.Addr())
	if got := drain(a); len(got) != 0 {
		t.Fatalf("default loss 1 let %d packets through", len(got))
	}
}

func TestMemNetworkPartitionAndShutdown(t *testing.T) {
	n := mesh.NewMemNetwork()
	a, b, c := n.NewTransport(), n.NewTransport(), n.NewTransport()
	defer a.Shutdown()
	defer b.Shutdown()

	n.Partition([]string{a.Addr()}, []string{b.Addr(), c.Addr()})
	_, _ = a.WriteTo([]byte{1}, b.Addr())
	_, _ = c.WriteTo([]byte{2}, b.Addr())
	if got := drain(b); len(got) != 1 || got[0].Buf[0] != 2 {
		t.Fatalf("b received %d packets, want only c's (a is partitioned away)", len(got))
	}
	if _, err := a.DialTimeout(b.Addr(), 20*time.Millisecond); err == nil {
		t.Fatal("dial across the partition succeeded")
	}

	n.Heal()
	_, _ = a.WriteTo([]byte{3}, b.Addr())
	if got := drain(b); len(got) != 1 || got[0].Buf[0] != 3 {
		t.Fatalf("after Heal b received %d packets, want a's", len(got))
	}
	go func() { (<-b.StreamCh()).Close() }()
	conn, err := a.DialTimeout(b.Addr(), 5*time.Second)
	if err != nil {
		t.Fatalf("dial after Heal: %v", err)
	}
	conn.Close()

	// A node that is gone refuses dials at once and receives nothing.
	c.Shutdown()
	if err := c.Shutdown(); err != nil {
		t.Fatalf("second Shutdown: %v", err)
	}
	if _, err := a.DialTimeout(c.Addr(), time.Hour); err == nil {
		t.Fatal("dial to a shut-down transport succeeded")
	}
	if _, err := c.WriteTo([]byte{1}, a.Addr()); err == nil {
		t.Fatal("a shut-down transport still sends")
	}
}

// A partitioned mesh on the memory network: each side declares the
// other dead; after healing, the reconnect loop merges them again.
func TestMemMeshPartitionHeals(t *testing.T) {
	n := mesh.NewMemNetwork()
	ms := meshtest.StartMemCluster(t, n, "p", 4, hclog.Info, nil)
	left, right := []string{ms[0].Addr(), ms[1].Addr()}, []string{ms[2].Addr(), ms[3].Addr()}
	n.Partition(left, right)
	for _, m := range ms[:2] {
		for _, o := range ms[2:] {
			meshtest.WaitMember(t, m, o.Name(), func(mem mesh.Member) bool { return mem.State == mesh.StateDead }, "dead across the partition")
		}
	}
	n.Heal()
	meshtest.WaitConverged(t, ms, 4)
}

// A mass join of 100 nodes (32 under -race) on the memory network
// converges, with the settings for that size, and a killed node is then
// seen dead by all.
// The timings are memberlist's LAN ones (1 s probes, 10 s TCP timeout),
// slower than the local preset: 100 nodes under -race on a shared
// 2-core machine would otherwise starve each other's probes.
func TestMemMeshMassJoin(t *testing.T) {
	if testing.Short() {
		t.Skip("a mass join of 100 nodes")
	}
	const size = massJoinSize
	n := mesh.NewMemNetwork()
	n.SetDefault(mesh.LinkFault{Delay: 200 * time.Microsecond})
	trs := make([]*mesh.MemTransport, size)
	ms := meshtest.StartMemCluster(t, n, "m", size, hclog.Warn, func(i int, c *mesh.Config) {
		c.ProbeInterval, c.ProbeTimeout, c.GossipInterval = time.Second, 500*time.Millisecond, 200*time.Millisecond
		c.TCPTimeout, c.JoinSyncDelay = 10*time.Second, 500*time.Millisecond
		*c = c.ForSize(size)
		trs[i] = c.Transport.(*mesh.MemTransport)
	})
	victim := ms[size-1]
	if err := victim.Shutdown(); err != nil {
		t.Fatal(err)
	}
	poll.Until(t, 120*time.Second, func() (bool, string) {
		for _, m := range ms[:size-1] {
			mem, ok := m.Member(victim.Name())
			if !ok || mem.State != mesh.StateDead {
				return false, fmt.Sprintf("%s does not yet see %s dead", m.Name(), victim.Name())
			}
		}
		return true, ""
	})
	for _, m := range ms[:size-1] {
		if got := m.NumAlive(); got != size-1 {
			t.Errorf("%s sees %d alive, want %d", m.Name(), got, size-1)
		}
	}
	for i, tr := range trs {
		if st := tr.Stats(); st.Packets == 0 || st.Streams == 0 && i > 0 {
			t.Errorf("node %d's transport counted %+v: want packets and (for joiners) streams", i, st)
		}
	}
}

// A full receive queue drops packets, and the receiver counts them.
func TestMemNetworkQueueFullDrops(t *testing.T) {
	n := mesh.NewMemNetwork()
	a, b := n.NewTransport(), n.NewTransport()
	defer a.Shutdown()
	defer b.Shutdown()
	const extra = 10
	for i := 0; i < mesh.MemPacketQueue+extra; i++ {
		if _, err := a.WriteTo([]byte{1}, b.Addr()); err != nil {
			t.Fatal(err)
		}
	}
	if got := len(drain(b)); got != mesh.MemPacketQueue {
		t.Fatalf("%d packets queued, want the queue's %d", got, mesh.MemPacketQueue)
	}
	if st := b.Stats(); st.Dropped != extra {
		t.Fatalf("receiver counted %d dropped packets, want %d", st.Dropped, extra)
	}
	if st := a.Stats(); st.Dropped != 0 || st.Packets != mesh.MemPacketQueue+extra {
		t.Fatalf("sender stats %+v", st)
	}
}
