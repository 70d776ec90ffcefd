package mesh

// In-memory gossip network: many Mesh instances in one process talk
// through a MemNetwork instead of UDP and TCP sockets, so that a test or
// a benchmark can run a thousand real memberlist instances on one
// machine. Each link (sender, receiver) may carry a one-way delay and a
// packet loss rate, and groups of nodes may be partitioned from each
// other.
//
// What it models:
//   - Packets (memberlist's UDP traffic: probes, acks, gossip) are copied,
//     lost with the link's Loss probability, and delivered after the
//     link's Delay. A receiver whose queue (MemPacketQueue packets) is full
//     drops the packet, as a full UDP socket buffer does.
//   - Streams (memberlist's TCP traffic: joins, push-pull, the TCP probe
//     fallback) are in-memory pipes with unbounded buffers (memPipe); dialing costs one link Delay and is
//     never lost. Dialing a partitioned node waits for the dial timeout,
//     as a black-holed TCP SYN does; dialing a node that is gone (its
//     transport shut down) fails at once, as a closed port does.
//   - Every transport counts the bytes and packets it sends, so a
//     benchmark can report gossip bytes per node.

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/memberlist"
)

// MemPacketQueue is how many packets a MemTransport holds for memberlist
// before it drops new ones.
const MemPacketQueue = 1024

// memBacklog is how many dialed streams wait for memberlist to accept
// them, as a listen backlog.
const memBacklog = 128

// LinkFault is the behavior of one direction of a link in a MemNetwork.
type LinkFault struct {
	// Delay is the one-way latency of a packet, and the time a stream
	// dial takes. 0 delivers at once.
	Delay time.Duration
	// Loss is the probability (0..1) that a packet is dropped. Streams
	// are never lost.
	Loss float64
}

// MemNetwork connects MemTransports in one process. Its methods are safe
// for concurrent use; fault settings apply to packets sent after the call.
type MemNetwork struct {
	mu        sync.RWMutex
	nodes     map[string]*MemTransport // by address
	next      int                      // last port handed out
	def       LinkFault
	links     map[[2]string]LinkFault // (from, to) address -> fault; overrides def
	group     map[string]int          // address -> partition group; absent: 0
	partition bool                    // groups are cut from each other
}

// NewMemNetwork returns an empty network without faults.
func NewMemNetwork() *MemNetwork {
	return &MemNetwork{
		nodes: make(map[string]*MemTransport),
		links: make(map[[2]string]LinkFault),
		group: make(map[string]int),
	}
}

// NewTransport returns a transport with a fresh address 127.0.0.1:port
// (no socket is opened; the port is only a name). Pass it as
// Config.Transport of one Mesh.
func (n *MemNetwork) NewTransport() *MemTransport {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.next++
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(n.next))
	t := &MemTransport{
		net:      n,
		addr:     addr,
		packetCh: make(chan *memberlist.Packet, MemPacketQueue),
		streamCh: make(chan net.Conn, memBacklog),
		done:     make(chan struct{}),
	}
	n.nodes[addr] = t
	return t
}

// SetDefault sets the fault of every link that has none of its own.
func (n *MemNetwork) SetDefault(f LinkFault) {
	n.mu.Lock()
	n.def = f
	n.mu.Unlock()
}

// SetLink sets the fault of the link from one address to another (one
// direction).
func (n *MemNetwork) SetLink(from, to string, f LinkFault) {
	n.mu.Lock()
	n.links[[2]string{from, to}] = f
	n.mu.Unlock()
}

// Partition cuts the network into the given groups of addresses:
// packets between different groups are dropped and streams between them
// cannot be dialed. Addresses in no group form one more group. Heal
// undoes it.
func (n *MemNetwork) Partition(groups ...[]string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	clear(n.group)
	for i, g := range groups {
		for _, a := range g {
			n.group[a] = i + 1
		}
	}
	n.partition = true
}

// Heal removes the partition (link faults stay).
func (n *MemNetwork) Heal() {
	n.mu.Lock()
	n.partition = false
	clear(n.group)
	n.mu.Unlock()
}

// route returns the destination of a message from one address to
// another, the link's fault, and whether the two are cut off.
func (n *MemNetwork) route(from, to string) (dst *MemTransport, f LinkFault, cut bool) {
	n.mu.RLock()
	defer n.mu.RUnlock()
	dst = n.nodes[to]
	f, ok := n.links[[2]string{from, to}]
	if !ok {
		f = n.def
	}
	cut = n.partition && n.group[from] != n.group[to]
	return dst, f, cut
}

func (n *MemNetwork) remove(t *MemTransport) {
	n.mu.Lock()
	if n.nodes[t.addr] == t {
		delete(n.nodes, t.addr)
	}
	n.mu.Unlock()
}

// MemStats counts what one MemTransport sent.
type MemStats struct {
	// Packets and PacketBytes: packets handed to the network (lost ones
	// included) and their bytes.
	Packets, PacketBytes uint64
	// Streams: streams this transport dialed; StreamBytes: bytes it wrote
	// on any stream, dialed or accepted.
	Streams, StreamBytes uint64
	// Dropped: packets sent to this transport that its full queue
	// (MemPacketQueue) dropped, as a full UDP socket buffer does.
	Dropped uint64
}

// Bytes returns all bytes sent, packets and streams.
func (s MemStats) Bytes() uint64 { return s.PacketBytes + s.StreamBytes }

// MemTransport is one node's memberlist.Transport on a MemNetwork.
type MemTransport struct {
	net      *MemNetwork
	addr     string
	packetCh chan *memberlist.Packet
	streamCh chan net.Conn

	packets, packetBytes, streams, streamBytes, dropped atomic.Uint64

	closeOnce sync.Once
	done      chan struct{}
}

var _ memberlist.Transport = (*MemTransport)(nil)

// memAddr is a net.Addr for MemNetwork addresses.
type memAddr string

func (a memAddr) Network() string { return "mem" }
func (a memAddr) String() string  { return string(a) }

// Addr returns the transport's address, 127.0.0.1:port.
func (t *MemTransport) Addr() string { return t.addr }

// Stats returns what this transport has sent so far, and the packets
// its own full queue dropped.
func (t *MemTransport) Stats() MemStats {
	return MemStats{
		Packets: t.packets.Load(), PacketBytes: t.packetBytes.Load(),
		Streams: t.streams.Load(), StreamBytes: t.streamBytes.Load(),
		Dropped: t.dropped.Load(),
	}
}

// FinalAdvertiseAddr returns the transport's own address; the arguments
// are ignored.
func (t *MemTransport) FinalAdvertiseAddr(string, int) (net.IP, int, error) {
	host, port, err := net.SplitHostPort(t.addr)
	if err != nil {
		return nil, 0, err
	}
	p, err := strconv.Atoi(port)
	if err != nil {
		return nil, 0, err
	}
	return net.ParseIP(host), p, nil
}

// WriteTo sends a copy of b to addr as a packet, subject to the link's
// loss, delay and any partition. Like UDP it reports success for a
// packet that is then lost.
func (t *MemTransport) WriteTo(b []byte, addr string) (time.Time, error) {
	now := time.Now()
	if t.closed() {
		return now, errMemClosed
	}
	t.packets.Add(1)
	t.packetBytes.Add(uint64(len(b)))
	dst, f, cut := t.net.route(t.addr, addr)
	if dst == nil || cut || (f.Loss > 0 && rand.Float64() < f.Loss) {
		return now, nil
	}
	p := &memberlist.Packet{Buf: append([]byte(nil), b...), From: memAddr(t.addr)}
	if f.Delay <= 0 {
		p.Timestamp = now
		dst.deliver(p)
		return now, nil
	}
	time.AfterFunc(f.Delay, func() {
		p.Timestamp = time.Now()
		dst.deliver(p)
	})
	return now, nil
}

// deliver queues p unless the queue is full or the transport is closed.
func (t *MemTransport) deliver(p *memberlist.Packet) {
	if t.closed() {
		return
	}
	select {
	case t.packetCh <- p:
	default: // full receive buffer: dropped, as UDP does
		t.dropped.Add(1)
	}
}

// PacketCh returns the packets sent to this transport.
func (t *MemTransport) PacketCh() <-chan *memberlist.Packet { return t.packetCh }

// StreamCh returns the streams dialed to this transport.
func (t *MemTransport) StreamCh() <-chan net.Conn { return t.streamCh }

var (
	errMemClosed      = errors.New("mesh: memory transport is shut down")
	errMemUnreachable = errors.New("mesh: memory network: connection refused")
	errMemTimeout     = errors.New("mesh: memory network: dial timed out (partitioned)")
	errMemBacklog     = errors.New("mesh: memory network: dial timed out (the peer's accept backlog is full)")
)

// DialTimeout opens a stream to addr: after the link's delay, or an
// error at once if nothing listens there, or after timeout if a
// partition separates the two.
func (t *MemTransport) DialTimeout(addr string, timeout time.Duration) (net.Conn, error) {
	if t.closed() {
		return nil, errMemClosed
	}
	dst, f, cut := t.net.route(t.addr, addr)
	if dst == nil {
		return nil, fmt.Errorf("dial %s: %w", addr, errMemUnreachable)
	}
	wait := f.Delay
	if cut {
		wait = timeout
	}
	if wait > 0 {
		timer := time.NewTimer(wait)
		select {
		case <-timer.C:
		case <-t.done:
			timer.Stop()
			return nil, errMemClosed
		}
	}
	if cut {
		return nil, fmt.Errorf("dial %s: %w", addr, errMemTimeout)
	}
	if dst.closed() {
		return nil, fmt.Errorf("dial %s: %w", addr, errMemUnreachable)
	}
	a, b := memPipe(memAddr(t.addr), memAddr(addr))
	local := &memConn{Conn: a, n: &t.streamBytes}
	remote := &memConn{Conn: b, n: &dst.streamBytes}
	var deadline <-chan time.Time
	if timeout > 0 {
		timer := time.NewTimer(timeout)
		defer timer.Stop()
		deadline = timer.C
	}
	select {
	case dst.streamCh <- remote:
	case <-dst.done:
		a.Close()
		return nil, fmt.Errorf("dial %s: %w", addr, errMemUnreachable)
	case <-t.done:
		a.Close()
		return nil, errMemClosed
	case <-deadline:
		a.Close()
		return nil, fmt.Errorf("dial %s: %w", addr, errMemBacklog)
	}
	t.streams.Add(1)
	return local, nil
}

// Shutdown takes the transport off the network: packets to it are
// dropped and dials to it fail. Safe to call twice.
func (t *MemTransport) Shutdown() error {
	t.closeOnce.Do(func() {
		t.net.remove(t)
		close(t.done)
	})
	return nil
}

func (t *MemTransport) closed() bool {
	select {
	case <-t.done:
		return true
	default:
		return false
	}
}

// memConn is one end of an in-memory stream; it counts the bytes
// written.
type memConn struct {
	net.Conn
	n *atomic.Uint64
}

func (c *memConn) Write(p []byte) (int, error) {
	n, err := c.Conn.Write(p)
	c.n.Add(uint64(n))
	return n, err
}
