package collective

import (
	"cmp"
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
)

// unit is one chunk that a channel sends or receives.
type unit struct {
	off, n int
	dep    int // sends: index of the receive that must be done first, -1 none
	reduce bool
	div    bool // receives: divide by the rank count afterwards (OpAvg)
}

type chanPlan struct {
	sends []unit
	recvs []unit
}

// pipeline runs per-channel plans: for every channel a sender goroutine
// (to peer `to`) and a receiver goroutine (from peer `from`), the sender of a
// chunk waiting only for the receive it depends on.
func (c *Communicator) pipeline(ctx context.Context, buf Buffer, hdr *Header, op Op, to, from int, plans []chanPlan) error {
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	tr := newTracker(ctx, c)
	var wg sync.WaitGroup
	var firstErr atomic.Pointer[error]
	setErr := func(err error) {
		if firstErr.CompareAndSwap(nil, &err) {
			cancel(err)
		}
	}
	// Chunks to a rank of this process go by reference when buf prefers it;
	// otherwise a ChunkPrefetcher starts each chunk's read early (peerpath.go).
	byRef := c.sendsByRef(buf, to)
	var pf ChunkPrefetcher
	if !byRef {
		pf, _ = buf.(ChunkPrefetcher)
	}
	for ch := range plans {
		p := &plans[ch]
		var done atomic.Int64
		kick := make(chan struct{}, 1)
		var fwd []int // fwd[i]: the send that waits for receive i, or -1
		if pf != nil {
			fwd = forwards(p)
		}
		if len(p.recvs) > 0 {
			wg.Add(1)
			go func(ch int) {
				defer wg.Done()
				// Host buffers take lane payloads straight off the socket
				// (see hostSink), staging buffers into their staging
				// memory (stageSink); other buffers and transports get
				// frames.
				sr, _ := c.ep.(StreamReceiver)
				var sink *hostSink
				var ssink *stageSink
				if sr != nil {
					if hb, ok := buf.(*HostBuffer); ok {
						sink = &hostSink{c: c, exp: hdr, buf: hb, from: from, op: op}
					} else if st, ok := buf.(RecvStager); ok {
						ssink = &stageSink{c: c, exp: hdr, st: st, from: from}
					}
				}
				for i, u := range p.recvs {
					var f *InFrame
					var err error
					if sink != nil {
						sink.u = u
						f, _, err = sr.RecvTo(ctx, from, ch, sink)
					} else if ssink != nil {
						ssink.u = u
						f, _, err = sr.RecvTo(ctx, from, ch, ssink)
						err = ssink.finish(err, op)
					} else {
						f, err = c.ep.Recv(ctx, from, ch)
					}
					if err != nil {
						setErr(err)
						return
					}
					if byRef {
						tr.observeReleases()
					}
					if f != nil {
						if err := c.checkFrame(hdr, f, from, u.off, u.n); err != nil {
							f.Release()
							setErr(err)
							return
						}
						err = consume(buf, f, u.off, u.n, u.reduce, op)
						f.Release()
					}
					if err == nil && u.div {
						err = buf.DivChunk(u.off, u.n, c.n)
					}
					if err == nil && fwd != nil && fwd[i] >= 0 {
						s := p.sends[fwd[i]]
						err = pf.PrefetchChunk(s.off, s.n)
					}
					if err != nil {
						setErr(err)
						return
					}
					c.progress.Add(1)
					done.Store(int64(i + 1))
					select {
					case kick <- struct{}{}:
					default:
					}
				}
			}(ch)
		}
		if len(p.sends) > 0 {
			wg.Add(1)
			go func(ch int) {
				defer wg.Done()
				for i, u := range p.sends {
					for done.Load() <= int64(u.dep) {
						select {
						case <-kick:
						case <-ctx.Done():
							return
						}
					}
					if pf != nil && u.dep < 0 {
						if err := readAhead(pf, p.sends, i); err != nil {
							setErr(err)
							return
						}
					}
					if err := c.send(ctx, tr, buf, hdr, to, ch, u.off, u.n, byRef); err != nil {
						setErr(err)
						return
					}
				}
			}(ch)
		}
	}
	wg.Wait()
	if p := firstErr.Load(); p != nil {
		return *p
	}
	if err := ctx.Err(); err != nil {
		return context.Cause(ctx)
	}
	if err := tr.wait(ctx); err != nil {
		return err
	}
	return buf.Sync()
}

// forwards maps each receive of a channel plan to the send that waits for
// it (-1: none), for ChunkPrefetcher.
func forwards(p *chanPlan) []int {
	fwd := make([]int, len(p.recvs))
	for i := range fwd {
		fwd[i] = -1
	}
	for j, u := range p.sends {
		if u.dep >= 0 && u.dep < len(fwd) {
			fwd[u.dep] = j
		}
	}
	return fwd
}

// readAhead starts the reads of send i (unless the previous call already
// did) and of send i+1 when neither waits for a receive, so that a chunk's
// copy overlaps the previous chunk's send.
func readAhead(pf ChunkPrefetcher, sends []unit, i int) error {
	if i == 0 || sends[i-1].dep >= 0 {
		if err := pf.PrefetchChunk(sends[i].off, sends[i].n); err != nil {
			return err
		}
	}
	if i+1 < len(sends) && sends[i+1].dep < 0 {
		return pf.PrefetchChunk(sends[i+1].off, sends[i+1].n)
	}
	return nil
}

func (c *Communicator) chunkElems(dt DType) int {
	e := c.cfg.ChunkBytes / dt.Size()
	if e < 1 {
		e = 1
	}
	return e
}

// ringPlans builds the per-channel plans of ring steps [s0, s1) of a ring
// all-reduce (reduce-scatter is [0, n-1), all-gather [n-1, 2(n-1))).
//
// A channel's units go in wavefront order: sub-chunk k of step s at
// position k+s (ties: the earlier step first), not step after step. The
// send of (s, k) waits for the receive of (s-1, k), one wave earlier, so a
// reduced chunk is forwarded while it is still in the cache instead of
// after the rest of its step (a whole block part per channel: with four
// 256 MiB ranks, 64 MiB per rank that went to memory and came back). Sender
// and receiver of a link compute the same order (the block sent at step s
// is the block the next rank receives at step s), and no send waits for a
// receive at or after its own position, so the order cannot deadlock.
func ringPlans(plan ChunkPlan, rank, s0, s1 int, avg bool) []chanPlan {
	n := plan.Ranks
	type keyed struct {
		u          unit
		wave, s, k int
		pre        int // receives: index before sorting
	}
	order := func(xs []keyed) {
		slices.SortStableFunc(xs, func(a, b keyed) int {
			return cmp.Or(cmp.Compare(a.wave, b.wave), cmp.Compare(a.s, b.s))
		})
	}
	plans := make([]chanPlan, plan.Channels)
	var sends, recvs []keyed
	var pos []int
	base := make([]int, s1-s0) // index of step s's first receive before sorting
	for ch := range plans {
		sends, recvs = sends[:0], recvs[:0]
		for s := s0; s < s1; s++ {
			base[s-s0] = len(recvs)
			st := RingAllReduceStep(n, rank, s)
			for k := 0; k < plan.SubChunks(st.Send, ch); k++ {
				off, cnt := plan.Sub(st.Send, ch, k)
				sends = append(sends, keyed{u: unit{off: off, n: cnt, dep: -1}, wave: k + s - s0, s: s, k: k})
			}
			for k := 0; k < plan.SubChunks(st.Recv, ch); k++ {
				off, cnt := plan.Sub(st.Recv, ch, k)
				recvs = append(recvs, keyed{u: unit{off: off, n: cnt, reduce: st.Reduce, div: avg && s == n-2}, wave: k + s - s0, s: s, k: k, pre: len(recvs)})
			}
		}
		order(sends)
		order(recvs)
		p := &plans[ch]
		p.recvs = make([]unit, len(recvs))
		pos = slices.Grow(pos[:0], len(recvs))[:len(recvs)] // every entry is set below
		for i, r := range recvs {
			p.recvs[i] = r.u
			pos[r.pre] = i
		}
		p.sends = make([]unit, len(sends))
		for i, x := range sends {
			if x.s > s0 {
				// The block sent at step s is the one received at s-1.
				x.u.dep = pos[base[x.s-1-s0]+x.k]
			}
			p.sends[i] = x.u
		}
	}
	return plans
}

// MinChannelBytes is the least an operation gives each channel: of each
// ring block for the ring collectives, of the whole buffer for broadcast
// and send/receive. Smaller operations use fewer channels than
// Config.Channels, because every channel costs a frame per ring step (and
// a device copy and stream sync per frame with device buffers): a 1 MiB
// all-reduce of two ranks runs on 4 channels, not 16. 128 KiB keeps host
// tensors of four 1 MiB ranks on 4 channels, where fewer lost a little,
// while device buffers gain from fewer frames (bench/results/gpu.md and
// dataplane.md).
const MinChannelBytes = 128 << 10

// minChannelBytes is what New gives a Communicator: MinChannelBytes, or
// less in this package's tests (TestMain), whose small buffers must still
// cover every channel.
var minChannelBytes = MinChannelBytes

// planChannels is the number of channels an operation whose channels
// share `bytes` bytes uses. Every rank computes the same from the same
// config and buffer.
func (c *Communicator) planChannels(bytes int) int {
	if c.minChan <= 0 {
		return c.cfg.Channels
	}
	return max(1, min(c.cfg.Channels, bytes/c.minChan))
}

// ringPlan cuts a ring collective over count elements.
func (c *Communicator) ringPlan(count int, dt DType) ChunkPlan {
	return ChunkPlan{Count: count, Ranks: c.n, Channels: c.planChannels(count / c.n * dt.Size()), ChunkElems: c.chunkElems(dt)}
}

// wholePlan cuts a broadcast or send/receive of count elements.
func (c *Communicator) wholePlan(count int, dt DType) ChunkPlan {
	return ChunkPlan{Count: count, Ranks: c.n, Channels: c.planChannels(count * dt.Size()), ChunkElems: c.chunkElems(dt)}
}

func (c *Communicator) useSmall(count int, dt DType) bool {
	return c.n > 1 && count*dt.Size() <= c.cfg.SmallBytes
}

// AllReduce reduces buf across all ranks in place: afterwards every rank
// holds op over all ranks' buffers. Small buffers (<= Config.SmallBytes)
// use recursive doubling, larger ones the ring. Float results are
// bit-identical on every rank and across runs with the same rank count and
// config (the reduction order is fixed).
func (c *Communicator) AllReduce(ctx context.Context, buf Buffer, op Op) error {
	if err := checkBuf("AllReduce", buf); err != nil {
		return err
	}
	if err := checkOp("AllReduce", op); err != nil {
		return err
	}
	return c.collective(ctx, "AllReduce", func(ctx context.Context) error {
		return c.allReduce(ctx, buf, op, CollAllReduce)
	})
}

// collective runs body as this rank's next collective operation: one at a
// time, under a context that ends when the communicator fails, with the
// next sequence number; an error from body fails the communicator (opErr).
func (c *Communicator) collective(ctx context.Context, name string, body func(ctx context.Context) error) error {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	ctx, end, err := c.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	c.seq++
	return c.opErr(name, ctx, body(ctx))
}

func (c *Communicator) allReduce(ctx context.Context, buf Buffer, op Op, coll CollKind) error {
	count, dt := buf.Len(), buf.DType()
	if c.n == 1 {
		c.lastAlgo = AlgoNameLocal
		if op == OpAvg {
			return buf.DivChunk(0, count, 1)
		}
		return buf.Sync()
	}
	if coll == CollAllReduce {
		if hb, ok := c.directBuffer(buf); ok {
			c.lastAlgo = AlgoNameSameProcess
			return c.directAllReduce(ctx, hb, op)
		}
		ring, err := c.sameHostRing(ctx, buf)
		if err != nil {
			return err
		}
		if ring != nil {
			c.lastAlgo = AlgoNameSameHost
			return c.sameHostAllReduce(ctx, ring, op)
		}
	}
	if c.useSmall(count, dt) {
		c.lastAlgo = AlgoNameRecursiveDoubling
		h := c.header(coll, dt, op, count, AlgoRecursiveDoubling, count, -1)
		h.Seq = c.seq
		return c.recursiveDoubling(ctx, buf, &h, op)
	}
	c.lastAlgo = AlgoNameRing
	plan := c.ringPlan(count, dt)
	h := c.header(coll, dt, op, count, AlgoRing, plan.ChunkElems, -1)
	h.Seq = c.seq
	return c.pipeline(ctx, buf, &h, op, (c.rank+1)%c.n, (c.rank+c.n-1)%c.n, ringPlans(plan, c.rank, 0, RingAllReduceSteps(c.n), op == OpAvg))
}

// Names of the AllReduce algorithms (LastAllReduceAlgorithm, the allreduce
// job's report).
const (
	AlgoNameLocal             = "local"
	AlgoNameRing              = "ring"
	AlgoNameRecursiveDoubling = "recursive-doubling"
	// AlgoNameSameHost: the buffer's same-host ring (CUDA IPC), no network.
	AlgoNameSameHost = "same-host-ipc"
)

// LastAllReduceAlgorithm names the algorithm of this rank's last AllReduce
// ("ring", "recursive-doubling", "same-host-ipc", "same-process", "local";
// "" before the first). Call it between collectives.
func (c *Communicator) LastAllReduceAlgorithm() string {
	c.opMu.Lock()
	defer c.opMu.Unlock()
	return c.lastAlgo
}

// AllReduceInto is the out-of-place AllReduce: dst = op over all ranks' src;
// src is not modified. dst and src must have the same dtype and length.
func (c *Communicator) AllReduceInto(ctx context.Context, dst, src Buffer, op Op) error {
	if err := checkBuf("AllReduce", dst); err != nil {
		return err
	}
	if err := checkBuf("AllReduce", src); err != nil {
		return err
	}
	if dst.DType() != src.DType() || dst.Len() != src.Len() {
		return fmt.Errorf("%w: AllReduce: out-of-place buffers differ: dst %v[%d], src %v[%d]", ErrBadArgument, dst.DType(), dst.Len(), src.DType(), src.Len())
	}
	if err := copyBuffer(dst, 0, src, 0, src.Len()); err != nil {
		return err
	}
	return c.AllReduce(ctx, dst, op)
}

// BlockLen is the number of elements rank r holds after a ReduceScatter of
// count elements over n ranks (and contributes to an AllGather of count):
// count/n, plus one for the first count%n ranks.
func BlockLen(count, n, r int) int {
	_, l := Part(count, n, r)
	return l
}

// ReduceScatter reduces src across ranks and leaves block Rank() of the
// result in dst (dst.Len() == BlockLen(src.Len(), Size(), Rank())). With
// dst == nil it works in place: the result is src's block Rank() (elements
// starting at the sum of the BlockLen of lower ranks); the rest of src is
// overwritten with partial results. Out of place, src is left unchanged
// (the reduction runs in a scratch copy, which src must support through
// Allocator unless it is a HostBuffer).
func (c *Communicator) ReduceScatter(ctx context.Context, dst, src Buffer, op Op) error {
	if err := checkBuf("ReduceScatter", src); err != nil {
		return err
	}
	if err := checkOp("ReduceScatter", op); err != nil {
		return err
	}
	count, dt := src.Len(), src.DType()
	boff, bl := Part(count, c.n, c.rank)
	work := src
	if dst != nil {
		if dst.DType() != dt || dst.Len() != bl {
			return fmt.Errorf("%w: ReduceScatter: rank %d output must be %v[%d] for an input of %d elements over %d ranks, got %v[%d]", ErrBadArgument, c.rank, dt, bl, count, c.n, dst.DType(), dst.Len())
		}
		w, err := newLike(src, count)
		if err != nil {
			return err
		}
		if err := copyBuffer(w, 0, src, 0, count); err != nil {
			return err
		}
		work = w
	}
	return c.collective(ctx, "ReduceScatter", func(ctx context.Context) error {
		var err error
		if c.n == 1 {
			if op == OpAvg {
				err = work.DivChunk(0, count, 1)
			}
		} else {
			plan := c.ringPlan(count, dt)
			h := c.header(CollReduceScatter, dt, op, count, AlgoRing, plan.ChunkElems, -1)
			h.Seq = c.seq
			err = c.pipeline(ctx, work, &h, op, (c.rank+1)%c.n, (c.rank+c.n-1)%c.n, ringPlans(plan, c.rank, 0, c.n-1, op == OpAvg))
		}
		if err == nil && dst != nil {
			err = copyBuffer(dst, 0, work, boff, bl)
		}
		return err
	})
}

// Allocator is implemented by buffers that can allocate a scratch buffer of
// their own kind (device buffers allocate device memory).
type Allocator interface {
	NewLike(n int) (Buffer, error)
}

// NewLike implements Allocator.
func (h *HostBuffer) NewLike(n int) (Buffer, error) { return NewHostBuffer(h.dt, n), nil }

func newLike(b Buffer, n int) (Buffer, error) {
	if a, ok := b.(Allocator); ok {
		return a.NewLike(n)
	}
	return nil, fmt.Errorf("%w: out-of-place ReduceScatter needs a scratch buffer: %T does not implement Allocator (use dst == nil for in place)", ErrBadArgument, b)
}

// AllGather gathers every rank's block into dst: rank r's src becomes block
// r of dst (dst.Len() is the total; src.Len() == BlockLen(dst.Len(), Size(),
// r)). With src == nil it works in place: block Rank() of dst already holds
// this rank's data.
func (c *Communicator) AllGather(ctx context.Context, dst, src Buffer) error {
	if err := checkBuf("AllGather", dst); err != nil {
		return err
	}
	count, dt := dst.Len(), dst.DType()
	boff, bl := Part(count, c.n, c.rank)
	if src != nil {
		if src.DType() != dt || src.Len() != bl {
			return fmt.Errorf("%w: AllGather: rank %d input must be %v[%d] for an output of %d elements over %d ranks, got %v[%d]", ErrBadArgument, c.rank, dt, bl, count, c.n, src.DType(), src.Len())
		}
		if err := copyBuffer(dst, boff, src, 0, bl); err != nil {
			return err
		}
	}
	return c.collective(ctx, "AllGather", func(ctx context.Context) error {
		return c.allGatherBody(ctx, dst)
	})
}

// allGatherBody is AllGather in place, under opMu with c.seq set.
func (c *Communicator) allGatherBody(ctx context.Context, dst Buffer) error {
	if c.n == 1 {
		return dst.Sync()
	}
	count, dt := dst.Len(), dst.DType()
	plan := c.ringPlan(count, dt)
	h := c.header(CollAllGather, dt, 0, count, AlgoRing, plan.ChunkElems, -1)
	h.Seq = c.seq
	plans := ringPlans(plan, c.rank, c.n-1, 2*(c.n-1), false)
	return c.pipeline(ctx, dst, &h, 0, (c.rank+1)%c.n, (c.rank+c.n-1)%c.n, plans)
}

// wholePlans splits the whole buffer across channels and chunks: send-only,
// receive-only, or receive-then-forward plans.
func wholePlans(plan ChunkPlan, send, recv bool) []chanPlan {
	plans := make([]chanPlan, plan.Channels)
	for ch := range plans {
		p := &plans[ch]
		for k := 0; k < plan.WholeSubChunks(ch); k++ {
			off, n := plan.WholeSub(ch, k)
			if recv {
				p.recvs = append(p.recvs, unit{off: off, n: n})
			}
			if send {
				dep := -1
				if recv {
					dep = k
				}
				p.sends = append(p.sends, unit{off: off, n: n, dep: dep})
			}
		}
	}
	return plans
}

// Broadcast copies root's buf to every rank's buf (pipelined along the
// ring starting at root).
func (c *Communicator) Broadcast(ctx context.Context, buf Buffer, root int) error {
	if err := checkBuf("Broadcast", buf); err != nil {
		return err
	}
	if root < 0 || root >= c.n {
		return fmt.Errorf("%w: Broadcast: root %d outside 0..%d", ErrBadArgument, root, c.n-1)
	}
	return c.collective(ctx, "Broadcast", func(ctx context.Context) error {
		if c.n == 1 {
			return buf.Sync()
		}
		count, dt := buf.Len(), buf.DType()
		plan := c.wholePlan(count, dt)
		h := c.header(CollBroadcast, dt, 0, count, AlgoPipeline, plan.ChunkElems, root)
		h.Seq = c.seq
		pos := (c.rank - root + c.n) % c.n
		plans := wholePlans(plan, pos < c.n-1, pos > 0)
		return c.pipeline(ctx, buf, &h, 0, (c.rank+1)%c.n, (c.rank+c.n-1)%c.n, plans)
	})
}

// Barrier returns once every rank has called Barrier.
func (c *Communicator) Barrier(ctx context.Context) error {
	return c.collective(ctx, "Barrier", func(ctx context.Context) error {
		if c.n == 1 {
			return nil
		}
		h := c.header(CollBarrier, Uint8, OpMax, 1, AlgoRecursiveDoubling, 1, -1)
		h.Seq = c.seq
		return c.recursiveDoubling(ctx, c.barrier, &h, OpMax)
	})
}

// Send sends buf to peer, which must call Recv(peer=this rank) with a buffer
// of the same dtype and length. It returns once the data has been handed to
// the network, so buf may be reused afterwards. Between ranks of one process
// (and whenever the link's flow-control window is full) that means once the
// receiver has taken it: like MPI_Ssend, a Send may wait for its matching
// Recv, so two ranks that exchange must not both call Send before Recv from
// one goroutine; run sends and receives in separate goroutines (Send and Recv
// with different peers or directions may run concurrently).
//
// Send and Recv must not overlap a collective of the same communicator:
// each rank's goroutines would take the communicator in their own order,
// and a peer's Recv could read the collective's frames (a mismatch) or a
// Send wait for a peer that is inside the collective. Wait for the sends
// and receives issued before a collective before calling it, and start
// those after it once it has returned, on every rank; that is NCCL's
// issue order, which the agent's local API keeps for its clients
// (node/localapi).
func (c *Communicator) Send(ctx context.Context, buf Buffer, peer int) error {
	return c.SendTagged(ctx, buf, peer, 0)
}

// Recv receives into buf what peer sent with Send.
func (c *Communicator) Recv(ctx context.Context, buf Buffer, peer int) error {
	return c.RecvTagged(ctx, buf, peer, 0)
}

// SendTagged is Send with a tag that the matching RecvTagged must name
// (messages are not matched by tag: a different tag is an error).
func (c *Communicator) SendTagged(ctx context.Context, buf Buffer, peer int, tag uint64) error {
	return c.p2p(ctx, buf, peer, tag, true)
}

// RecvTagged is Recv that checks the sender's tag.
func (c *Communicator) RecvTagged(ctx context.Context, buf Buffer, peer int, tag uint64) error {
	return c.p2p(ctx, buf, peer, tag, false)
}

func (c *Communicator) p2p(ctx context.Context, buf Buffer, peer int, tag uint64, send bool) error {
	name := "Recv"
	if send {
		name = "Send"
	}
	if err := checkBuf(name, buf); err != nil {
		return err
	}
	if peer < 0 || peer >= c.n || peer == c.rank {
		return fmt.Errorf("%w: %s: peer %d must be another rank in 0..%d (this is rank %d)", ErrBadArgument, name, peer, c.n-1, c.rank)
	}
	c.opMu.RLock()
	defer c.opMu.RUnlock()
	idx := 2 * peer
	if !send {
		idx++
	}
	c.p2pMu[idx].Lock()
	defer c.p2pMu[idx].Unlock()
	ctx, end, err := c.begin(ctx)
	if err != nil {
		return err
	}
	defer end()
	c.p2pSeq[idx]++
	count, dt := buf.Len(), buf.DType()
	plan := c.wholePlan(count, dt)
	dest := peer
	if !send {
		dest = c.rank
	}
	h := c.header(CollSendRecv, dt, 0, count, AlgoPipeline, plan.ChunkElems, dest)
	h.Seq = c.p2pSeq[idx]
	h.Tag = tag
	plans := wholePlans(plan, send, !send)
	if count == 0 { // still exchange one (empty) frame so the peers meet
		plans[0] = chanPlan{}
		if send {
			plans[0].sends = []unit{{dep: -1}}
		} else {
			plans[0].recvs = []unit{{}}
		}
	}
	return c.opErr(name, ctx, c.pipeline(ctx, buf, &h, 0, peer, peer, plans))
}

// recursiveDoubling all-reduces a small buffer in whole-buffer messages on
// channel 0.
func (c *Communicator) recursiveDoubling(ctx context.Context, buf Buffer, h *Header, op Op) error {
	count := buf.Len()
	nb := count * buf.DType().Size()
	if cap(c.scratch) < nb {
		c.scratch = make([]byte, nb)
	}
	scratch := c.scratch[:nb]
	tr := newTracker(ctx, c)
	divided := false
	div := func() error {
		if op == OpAvg && !divided {
			divided = true
			return buf.DivChunk(0, count, c.n)
		}
		return nil
	}
	recv := func(peer int) (*InFrame, error) {
		f, err := c.ep.Recv(ctx, peer, 0)
		if err != nil {
			return nil, err
		}
		if err := c.checkFrame(h, f, peer, 0, count); err != nil {
			f.Release()
			return nil, err
		}
		c.progress.Add(1)
		return f, nil
	}
	steps := RecursiveDoubling(c.n, c.rank)
	extra := len(steps) > 0 && steps[0].Kind == RDSendFold
	for _, st := range steps {
		switch st.Kind {
		case RDSendFold, RDSendResult:
			if st.Kind == RDSendResult {
				if err := div(); err != nil {
					return err
				}
			}
			if err := c.send(ctx, tr, buf, h, st.Peer, 0, 0, count, false); err != nil {
				return err
			}
			if err := tr.wait(ctx); err != nil {
				return err
			}
		case RDRecvFold, RDRecvResult:
			// A fold reduces the peer's data in; a result replaces ours.
			f, err := recv(st.Peer)
			if err != nil {
				return err
			}
			err = consume(buf, f, 0, count, st.Kind == RDRecvFold, op)
			f.Release()
			if err != nil {
				return err
			}
		case RDExchange:
			if err := c.send(ctx, tr, buf, h, st.Peer, 0, 0, count, false); err != nil {
				return err
			}
			f, err := recv(st.Peer)
			if err != nil {
				return err
			}
			f.Payload.CopyTo(scratch)
			f.Release()
			if err := tr.wait(ctx); err != nil {
				return err
			}
			if err := buf.ReduceChunk(0, Segments{scratch}, op); err != nil {
				return err
			}
		}
	}
	if !extra {
		if err := div(); err != nil {
			return err
		}
	}
	if err := tr.wait(ctx); err != nil {
		return err
	}
	return buf.Sync()
}

// hostSink receives a chunk of a host buffer from a byte-stream link: a
// plain receive reads straight into the buffer, a reducing one reduces
// cache-sized pieces as they arrive.
type hostSink struct {
	c    *Communicator
	exp  *Header
	buf  *HostBuffer
	from int
	op   Op
	u    unit
	dst  []byte
}

var _ FrameSink = (*hostSink)(nil)

// Begin implements FrameSink.
func (s *hostSink) Begin(h *Header) ([]byte, error) {
	if err := s.c.checkHeader(s.exp, h, s.from, s.u.off, s.u.n); err != nil {
		return nil, err
	}
	d, err := s.buf.rng(s.u.off, s.u.n)
	if err != nil {
		return nil, err
	}
	if !s.u.reduce {
		return d, nil
	}
	s.dst = d
	return nil, nil
}

// Piece implements FrameSink.
func (s *hostSink) Piece(off int, p []byte) error {
	reduceBytes(s.buf.dt, s.op, s.dst[off:off+len(p)], p)
	return nil
}
