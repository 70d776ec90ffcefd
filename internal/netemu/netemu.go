package netemu

import (
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"math/rand/v2"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"
)

var (
	// ErrInvalidConfig is wrapped by every configuration error.
	ErrInvalidConfig = errors.New("netemu: invalid config")
	// ErrClosed is returned by calls on a closed emulator.
	ErrClosed = errors.New("netemu: emulator closed")
	// ErrUnknownPort names a port that was never attached.
	ErrUnknownPort = errors.New("netemu: unknown port")
	// ErrDuplicate is returned when a port's name or address is taken.
	ErrDuplicate = errors.New("netemu: port name or address already attached")
)

// LinkConfig is what one direction of a link does to packets.
type LinkConfig struct {
	// Delay is the mean one-way delay added to every packet.
	Delay time.Duration
	// Jitter spreads the delay uniformly over [Delay-Jitter, Delay+Jitter];
	// it may not exceed Delay. Packets keep their order on a link.
	Jitter time.Duration
	// Loss is the probability (0 <= Loss < 1) that a packet is dropped.
	Loss float64
	// QueueLen is how many packets may be in flight on the link; more are
	// dropped (tail drop), as a router's queue would.
	QueueLen int
}

// Validate checks a link's settings.
func (c LinkConfig) Validate() error {
	switch {
	case c.Delay < 0 || c.Jitter < 0:
		return fmt.Errorf("%w: link delay and jitter must be >= 0, got %s and %s", ErrInvalidConfig, c.Delay, c.Jitter)
	case c.Jitter > c.Delay:
		return fmt.Errorf("%w: link jitter %s exceeds the delay %s: the delay is drawn from [delay-jitter, delay+jitter]; raise the delay or lower the jitter", ErrInvalidConfig, c.Jitter, c.Delay)
	case c.Loss < 0 || c.Loss >= 1:
		return fmt.Errorf("%w: link loss must be a probability in [0, 1), got %v", ErrInvalidConfig, c.Loss)
	case c.QueueLen < 1:
		return fmt.Errorf("%w: link queue length must be >= 1 packet, got %d", ErrInvalidConfig, c.QueueLen)
	}
	return nil
}

// Config configures an Emulator.
type Config struct {
	// Seed seeds every link's random stream (loss and jitter).
	Seed uint64
	// Link is the setting of every link not set with SetLink.
	Link LinkConfig
	// MaxPacket is the largest packet read from a port, in bytes; set it
	// at least to the ports' MTU.
	MaxPacket int
}

// DefaultConfig is a transparent network: no delay, no loss, 4,096 packets
// of queue per link, packets up to 64 KiB.
func DefaultConfig() Config {
	return Config{Link: LinkConfig{QueueLen: 4096}, MaxPacket: 65535}
}

// Validate checks the config.
func (c Config) Validate() error {
	if c.MaxPacket < 576 {
		return fmt.Errorf("%w: MaxPacket must be >= 576 bytes (the smallest IPv4 MTU a host must accept), got %d", ErrInvalidConfig, c.MaxPacket)
	}
	return c.Link.Validate()
}

// LinkStats counts what happened to the packets sent on one link.
type LinkStats struct {
	From, To  string
	Delivered uint64 // written to the destination port
	Lost      uint64 // dropped by the Loss draw
	Cut       uint64 // dropped by a partition
	Overflow  uint64 // dropped because the queue was full
	// DelaySum is the sum of the scheduled delays of the delivered and
	// queued packets (for the mean); DelayMax the largest.
	DelaySum, DelayMax time.Duration
}

// Stats is a snapshot of the emulator's counters.
type Stats struct {
	Links      []LinkStats // sorted by From, To
	Unroutable uint64      // packets for an address no port owns
	Malformed  uint64      // packets that are neither IPv4 nor IPv6
}

// Total adds up every link's counters.
func (s Stats) Total() LinkStats {
	var t LinkStats
	for _, l := range s.Links {
		t.Delivered += l.Delivered
		t.Lost += l.Lost
		t.Cut += l.Cut
		t.Overflow += l.Overflow
		t.DelaySum += l.DelaySum
		t.DelayMax = max(t.DelayMax, l.DelayMax)
	}
	return t
}

// Emulator forwards packets between attached ports through emulated links.
// Its methods are safe for concurrent use.
type Emulator struct {
	cfg  Config
	done chan struct{}
	wg   sync.WaitGroup

	mu     sync.Mutex
	ports  map[string]*port
	byAddr map[netip.Addr]*port
	links  map[[2]string]*link
	group  map[string]int // partition side per port; nil when whole
	closed bool

	unroutable, malformed atomic.Uint64
	closeOnce             sync.Once
}

type port struct {
	name string
	addr netip.Addr
	rw   io.ReadWriteCloser
	wmu  sync.Mutex
}

type packet struct {
	b   []byte
	due time.Time
}

// link is one direction between two ports. Its schedule (the random draws
// and the due times) is guarded by mu; its queue is drained by one
// goroutine.
type link struct {
	from, to *port
	q        chan packet

	mu  sync.Mutex
	sch schedule
	st  LinkStats
	// inFlight counts the packets admitted and not yet delivered or
	// dropped: those in q and the one deliver holds while it waits for its
	// due time. QueueLen bounds it (len(q) alone would admit one more).
	inFlight int
}

// schedule is a link's deterministic core: the fate of each packet from
// its send time, the config and the link's random stream.
type schedule struct {
	cfg     LinkConfig
	rng     *rand.Rand
	lastDue time.Time
}

// newSchedule seeds a link's stream from the emulator's seed and the
// link's ends, so that it does not depend on the order links appear in.
func newSchedule(cfg LinkConfig, seed uint64, from, to string) schedule {
	h := fnv.New64a()
	_, _ = io.WriteString(h, from+"\x00"+to)
	return schedule{cfg: cfg, rng: rand.New(rand.NewPCG(seed, h.Sum64()))}
}

// next draws a packet's fate: lost, or due when. It keeps the link's
// order (never due before the packet ahead).
func (s *schedule) next(now time.Time) (due time.Time, lost bool) {
	if s.cfg.Loss > 0 && s.rng.Float64() < s.cfg.Loss {
		return time.Time{}, true
	}
	d := s.cfg.Delay
	if s.cfg.Jitter > 0 {
		d += time.Duration((2*s.rng.Float64() - 1) * float64(s.cfg.Jitter))
	}
	due = now.Add(d)
	if due.Before(s.lastDue) {
		due = s.lastDue
	}
	s.lastDue = due
	return due, false
}

// New returns an emulator with no ports.
func New(cfg Config) (*Emulator, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Emulator{
		cfg: cfg, done: make(chan struct{}),
		ports: map[string]*port{}, byAddr: map[netip.Addr]*port{}, links: map[[2]string]*link{},
	}, nil
}

// Attach adds a port: rw carries one IP packet per Read and Write (a TUN
// device without packet information, or a Pipe end). The emulator reads
// from it until Close, which closes it.
func (e *Emulator) Attach(name string, addr netip.Addr, rw io.ReadWriteCloser) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	if _, ok := e.ports[name]; ok {
		return fmt.Errorf("%w: %q", ErrDuplicate, name)
	}
	if _, ok := e.byAddr[addr]; ok {
		return fmt.Errorf("%w: %s", ErrDuplicate, addr)
	}
	p := &port{name: name, addr: addr, rw: rw}
	e.ports[name], e.byAddr[addr] = p, p
	e.wg.Add(1)
	go e.read(p)
	return nil
}

// SetLink sets the link from one port to another (one direction).
func (e *Emulator) SetLink(from, to string, lc LinkConfig) error {
	if err := lc.Validate(); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	l, err := e.linkLocked(from, to)
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.sch.cfg = lc
	l.mu.Unlock()
	return nil
}

// SetAll sets every link, present and future.
func (e *Emulator) SetAll(lc LinkConfig) error {
	if err := lc.Validate(); err != nil {
		return err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.cfg.Link = lc
	for _, l := range e.links {
		l.mu.Lock()
		l.sch.cfg = lc
		l.mu.Unlock()
	}
	return nil
}

// Partition cuts the network into the given groups of port names: packets
// between ports of different groups are dropped, including those already
// in flight. A port named in no group is alone in a group of its own.
func (e *Emulator) Partition(groups ...[]string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	g := map[string]int{}
	for i, names := range groups {
		for _, n := range names {
			if _, ok := e.ports[n]; !ok {
				return fmt.Errorf("%w: %q in partition group %d", ErrUnknownPort, n, i)
			}
			g[n] = i + 1
		}
	}
	next := len(groups) + 1
	for n := range e.ports {
		if g[n] == 0 {
			g[n] = next
			next++
		}
	}
	e.group = g
	return nil
}

// Heal ends a partition.
func (e *Emulator) Heal() {
	e.mu.Lock()
	e.group = nil
	e.mu.Unlock()
}

// Stats returns the counters so far.
func (e *Emulator) Stats() Stats {
	e.mu.Lock()
	links := make([]*link, 0, len(e.links))
	for _, l := range e.links {
		links = append(links, l)
	}
	e.mu.Unlock()
	s := Stats{Unroutable: e.unroutable.Load(), Malformed: e.malformed.Load()}
	for _, l := range links {
		l.mu.Lock()
		s.Links = append(s.Links, l.st)
		l.mu.Unlock()
	}
	sort.Slice(s.Links, func(i, j int) bool {
		if s.Links[i].From != s.Links[j].From {
			return s.Links[i].From < s.Links[j].From
		}
		return s.Links[i].To < s.Links[j].To
	})
	return s
}

// Close stops forwarding, closes every port and waits for the emulator's
// goroutines. It is safe to call more than once.
func (e *Emulator) Close() error {
	e.closeOnce.Do(func() {
		e.mu.Lock()
		e.closed = true
		close(e.done)
		for _, p := range e.ports {
			_ = p.rw.Close()
		}
		e.mu.Unlock()
		e.wg.Wait()
	})
	return nil
}

// linkLocked returns (creating it) the link from → to; e.mu is held.
func (e *Emulator) linkLocked(from, to string) (*link, error) {
	k := [2]string{from, to}
	if l := e.links[k]; l != nil {
		return l, nil
	}
	pf, pt := e.ports[from], e.ports[to]
	if pf == nil || pt == nil {
		return nil, fmt.Errorf("%w: link %q -> %q", ErrUnknownPort, from, to)
	}
	if e.closed {
		return nil, ErrClosed
	}
	l := &link{
		from: pf, to: pt,
		q:   make(chan packet, max(e.cfg.Link.QueueLen, 1)),
		sch: newSchedule(e.cfg.Link, e.cfg.Seed, from, to),
		st:  LinkStats{From: from, To: to},
	}
	// The queue's capacity is fixed at creation; QueueLen set later only
	// lowers the admission bound.
	e.links[k] = l
	e.wg.Add(1)
	go e.deliver(l)
	return l, nil
}

func (e *Emulator) cut(a, b string) bool {
	return e.group != nil && e.group[a] != e.group[b]
}

// read forwards what one port sends.
func (e *Emulator) read(p *port) {
	defer e.wg.Done()
	buf := make([]byte, e.cfg.MaxPacket)
	for {
		n, err := p.rw.Read(buf)
		if err != nil {
			return // closed (by Close) or the device is gone
		}
		dst, ok := Destination(buf[:n])
		if !ok {
			e.malformed.Add(1)
			continue
		}
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			return
		}
		to := e.byAddr[dst]
		if to == nil {
			e.mu.Unlock()
			e.unroutable.Add(1)
			continue
		}
		l, err := e.linkLocked(p.name, to.name)
		cut := e.cut(p.name, to.name)
		e.mu.Unlock()
		if err != nil {
			return
		}
		l.send(append([]byte(nil), buf[:n]...), time.Now(), cut)
	}
}

// send admits one packet sent at now onto the link.
func (l *link) send(b []byte, now time.Time, cut bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if cut {
		l.st.Cut++
		return
	}
	if l.inFlight >= min(l.sch.cfg.QueueLen, cap(l.q)) {
		l.st.Overflow++
		return
	}
	due, lost := l.sch.next(now)
	if lost {
		l.st.Lost++
		return
	}
	d := due.Sub(now)
	l.st.DelaySum += d
	l.st.DelayMax = max(l.st.DelayMax, d)
	l.inFlight++
	l.q <- packet{b: b, due: due} // cannot block: len(q) <= inFlight, checked under mu, and only send adds
}

// deliver writes a link's packets to its destination when they are due.
func (e *Emulator) deliver(l *link) {
	defer e.wg.Done()
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	for {
		var p packet
		select {
		case <-e.done:
			return
		case p = <-l.q:
		}
		if wait := time.Until(p.due); wait > 0 {
			timer.Reset(wait)
			select {
			case <-e.done:
				timer.Stop()
				return
			case <-timer.C:
			}
		}
		e.mu.Lock()
		cut := e.cut(l.from.name, l.to.name)
		e.mu.Unlock()
		if cut {
			l.mu.Lock()
			l.st.Cut++
			l.inFlight--
			l.mu.Unlock()
			continue
		}
		l.to.wmu.Lock()
		_, err := l.to.rw.Write(p.b)
		l.to.wmu.Unlock()
		l.mu.Lock()
		l.inFlight--
		if err == nil {
			l.st.Delivered++
		} else {
			l.st.Overflow++ // the destination refused it (closing, or its queue is full)
		}
		l.mu.Unlock()
	}
}

// Destination returns the destination address of an IPv4 or IPv6 packet.
func Destination(b []byte) (netip.Addr, bool) {
	if len(b) < 1 {
		return netip.Addr{}, false
	}
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom4([4]byte(b[16:20])), true
	case 6:
		if len(b) < 40 {
			return netip.Addr{}, false
		}
		return netip.AddrFrom16([16]byte(b[24:40])), true
	}
	return netip.Addr{}, false
}
