package collective

import (
	"context"
	"encoding/binary"
	"fmt"
	"net"
)

// All-reduce among ranks that are processes of one host, without the
// network.
//
// When every rank of a group is a separate process on this host (distinct
// data-plane addresses, one host) and the buffer implements SameHostReducer
// (device memory: cudabuf maps its neighbours' memory through CUDA IPC),
// AllReduce runs the buffer's own same-host ring instead of the TCP ring.
// Whether it can is agreed once per buffer, by every rank, over the existing
// transport:
//
//  1. each rank asks its buffer for a SameHostRing and its Offer (an opaque
//     blob of at most MaxSameHostOffer bytes: for cudabuf the path and token
//     of a shared file that carries its IPC handles), or an empty offer when
//     it cannot;
//  2. the offers are all-gathered over the transport (a host buffer);
//  3. each rank Joins its neighbours' offers (opening the shared files and
//     the IPC handles: this fails on another host, in a container without
//     the host's IPC namespace, or across GPUs that cannot reach each other);
//  4. the join results are all-reduced (minimum): only if every rank joined
//     does the group use the same-host rings; otherwise every rank closes
//     its ring and the buffer stays on the TCP ring.
//
// The outcome (ring or not) is kept per buffer until the communicator
// closes, so a buffer that is all-reduced again (DDP's gradient buckets)
// pays the agreement once. Ranks must therefore pass corresponding buffers
// to each AllReduce (the same contract as the order of the calls). Config
// NoSameHost turns the path off.

// MaxSameHostOffer is the largest offer a SameHostRing may make.
const MaxSameHostOffer = 504

// SameHostReducer is implemented by buffers that can all-reduce among ranks
// that are processes of one host without the network (see above).
type SameHostReducer interface {
	// SameHostRing prepares this rank's side of a same-host ring of size
	// ranks for the buffer. An error means this rank cannot take part (the
	// group then uses the network); it is not an error of the operation.
	SameHostRing(rank, size int) (SameHostRing, error)
}

// SameHostRing is one rank's side of a same-host all-reduce ring over one
// buffer. The communicator calls its methods from one goroutine at a time.
type SameHostRing interface {
	// Offer is what the other ranks need to join this rank (at most
	// MaxSameHostOffer bytes, not empty).
	Offer() []byte
	// Join connects to the ring from every rank's offer (offers[r] is rank
	// r's). An error means this rank cannot use the ring.
	Join(offers [][]byte) error
	// AllReduce reduces the buffer in place across the ring with op.
	AllReduce(ctx context.Context, op Op) error
	// Close releases the ring. It is called on every rank when any rank
	// failed to join, and when the communicator closes.
	Close() error
}

// sameHostEntry is the agreed outcome for one buffer: ring is nil where the
// group uses the network for it.
type sameHostEntry struct {
	ring SameHostRing
}

// sameHostEligible reports whether every rank of the group is a separate
// process of one host: no two ranks share a data-plane address (ranks that
// do are in one process and exchange chunks by reference) and every address
// names the same host (any loopback addresses count as one host).
func (c *Communicator) sameHostEligible() bool {
	if c.cfg.NoSameHost || c.n < 2 {
		return false
	}
	return SameHostAddrs(c.group.Addrs)
}

// SameHostAddrs reports whether addrs ("host:port") are distinct and all on
// one host (the same host string, or loopback addresses).
func SameHostAddrs(addrs []string) bool {
	seen := make(map[string]bool, len(addrs))
	host0 := ""
	for i, a := range addrs {
		if seen[a] {
			return false
		}
		seen[a] = true
		h, _, err := net.SplitHostPort(a)
		if err != nil {
			return false
		}
		if ip := net.ParseIP(h); ip != nil && ip.IsLoopback() || h == "localhost" {
			h = "loopback"
		}
		if i == 0 {
			host0 = h
		} else if h != host0 {
			return false
		}
	}
	return true
}

// sameHostRing returns the agreed same-host ring for buf, running the
// agreement (a collective: every rank reaches it for the same operation)
// the first time buf is seen. nil means the TCP ring. Called under opMu.
func (c *Communicator) sameHostRing(ctx context.Context, buf Buffer) (SameHostRing, error) {
	sh, ok := buf.(SameHostReducer)
	if !ok || !c.sameHostEligible() {
		return nil, nil
	}
	c.sameHostMu.Lock()
	e, ok := c.sameHost[buf]
	c.sameHostMu.Unlock()
	if ok {
		return e.ring, nil
	}
	ring, err := c.agreeSameHost(ctx, sh)
	if err != nil {
		return nil, err
	}
	c.sameHostMu.Lock()
	if c.sameHost == nil {
		c.sameHost = make(map[Buffer]*sameHostEntry)
	}
	// drop the entries of rings their buffers closed (freed buffers)
	for b, e := range c.sameHost {
		if cl, ok := e.ring.(interface{ Closed() bool }); ok && cl.Closed() {
			delete(c.sameHost, b)
		}
	}
	c.sameHost[buf] = &sameHostEntry{ring: ring}
	closed := c.closed.Load()
	c.sameHostMu.Unlock()
	if closed && ring != nil { // Close ran while we agreed
		_ = ring.Close()
		return nil, ErrClosed
	}
	return ring, nil
}

// agreeSameHost runs steps 1-4 above. Errors are those of the transport
// (the group failed); a rank that cannot join is not an error.
func (c *Communicator) agreeSameHost(ctx context.Context, sh SameHostReducer) (SameHostRing, error) {
	const slot = MaxSameHostOffer + 8 // length (8 bytes) + offer
	ring, err := sh.SameHostRing(c.rank, c.n)
	var offer []byte
	if err != nil {
		c.log.Debug("same-host ring unavailable, using the network", "error", err)
		ring = nil
	} else if offer = ring.Offer(); len(offer) == 0 || len(offer) > MaxSameHostOffer {
		c.log.Warn("same-host ring made an unusable offer, using the network", "bytes", len(offer))
		_ = ring.Close()
		ring, offer = nil, nil
	}
	offers := NewHostBuffer(Uint8, slot*c.n)
	mine := offers.Bytes()[c.rank*slot : (c.rank+1)*slot]
	binary.LittleEndian.PutUint64(mine, uint64(len(offer)))
	copy(mine[8:], offer)
	c.seq++
	if err := c.allGatherBody(ctx, offers); err != nil {
		if ring != nil {
			_ = ring.Close()
		}
		return nil, err
	}
	all := make([][]byte, c.n)
	joined := int32(1)
	for r := range all {
		s := offers.Bytes()[r*slot : (r+1)*slot]
		l := binary.LittleEndian.Uint64(s)
		if l == 0 || l > MaxSameHostOffer {
			joined = 0
			continue
		}
		all[r] = s[8 : 8+l]
	}
	if ring == nil {
		joined = 0
	} else if joined == 1 {
		if err := ring.Join(all); err != nil {
			c.log.Info("cannot join the same-host ring, the group uses the network", "error", err)
			joined = 0
		}
	}
	flagv := []int32{joined}
	flag := Int32s(flagv)
	c.seq++
	if err := c.allReduce(ctx, flag, OpMin, CollAllReduce); err != nil {
		if ring != nil {
			_ = ring.Close()
		}
		return nil, err
	}
	if flagv[0] == 1 {
		c.log.Debug("same-host ring agreed", "ranks", c.n)
		return ring, nil
	}
	if ring != nil {
		if err := ring.Close(); err != nil {
			c.log.Warn("closing the unused same-host ring", "error", err)
		}
	}
	return nil, nil
}

// closeSameHost closes every agreed ring (Communicator.Close).
func (c *Communicator) closeSameHost() {
	c.sameHostMu.Lock()
	m := c.sameHost
	c.sameHost = nil
	c.sameHostMu.Unlock()
	for _, e := range m {
		if e.ring != nil {
			if err := e.ring.Close(); err != nil {
				c.log.Warn("closing a same-host ring", "error", err)
			}
		}
	}
}

// ForgetBuffer drops what the communicator keeps for buf (its same-host
// ring, closed here). Call it on every rank, as a collective, before
// freeing a buffer that was all-reduced, unless the buffer's own Close
// releases its rings (a ring with a Closed() bool method that reports true
// is dropped at the next agreement); the next AllReduce of buf agrees
// again. Without either, the communicator keeps a small entry per buffer
// until it closes.
func (c *Communicator) ForgetBuffer(buf Buffer) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	c.sameHostMu.Lock()
	e := c.sameHost[buf]
	delete(c.sameHost, buf)
	c.sameHostMu.Unlock()
	if e != nil && e.ring != nil {
		return e.ring.Close()
	}
	return nil
}

// sameHostAllReduce runs op on ring and names the path in errors.
func (c *Communicator) sameHostAllReduce(ctx context.Context, ring SameHostRing, op Op) error {
	if err := ring.AllReduce(ctx, op); err != nil {
		return fmt.Errorf("same-host ring: %w", err)
	}
	c.progress.Add(1)
	return nil
}
