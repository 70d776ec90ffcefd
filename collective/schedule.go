package collective

// The step schedules of the algorithms. Everything in this file is a pure
// function of its arguments: no I/O, no clock, no randomness. Every rank
// computes the same plan from the same (count, ranks, channels, chunk size),
// which is what lets a receiver know, without any negotiation, which chunk
// arrives next on which channel.

// Part splits count elements into parts pieces as evenly as possible (the
// first count%parts pieces get one element more) and returns piece i.
func Part(count, parts, i int) (off, n int) {
	base, rem := count/parts, count%parts
	if i < rem {
		return i * (base + 1), base + 1
	}
	return rem*(base+1) + (i-rem)*base, base
}

// RingStep is one step of rank r in a ring: send block Send to rank r+1,
// receive block Recv from rank r-1, and reduce it (reduce-scatter phase) or
// store it (all-gather phase).
type RingStep struct {
	Send, Recv int
	Reduce     bool
}

func mod(a, n int) int { return ((a % n) + n) % n }

// RingAllReduceSteps is the number of steps of a ring all-reduce: n-1 of
// reduce-scatter then n-1 of all-gather.
func RingAllReduceSteps(n int) int { return 2 * (n - 1) }

// RingAllReduceStep returns step s (0 <= s < 2(n-1)) of rank r. After the
// reduce-scatter half, rank r holds the fully reduced block r; the all-gather
// half circulates the reduced blocks. The block sent at step s+1 is always the
// block received at step s, so a chunk can be forwarded as soon as it arrived.
func RingAllReduceStep(n, r, s int) RingStep {
	if s < n-1 {
		return RingStep{Send: mod(r-s-1, n), Recv: mod(r-s-2, n), Reduce: true}
	}
	s -= n - 1
	return RingStep{Send: mod(r-s, n), Recv: mod(r-s-1, n)}
}

// ChunkPlan is how an operation's elements are cut: into Ranks blocks
// (block b belongs to rank b in reduce-scatter and all-gather), each block
// into Channels parts (channel c moves part c of every block, on its own
// connection), each part into sub-chunks of at most ChunkElems elements that
// are pipelined.
type ChunkPlan struct {
	Count      int
	Ranks      int
	Channels   int
	ChunkElems int
}

// Block returns the element range of block b.
func (p ChunkPlan) Block(b int) (off, n int) { return Part(p.Count, p.Ranks, b) }

// Piece returns the element range of channel c's part of block b.
func (p ChunkPlan) Piece(b, c int) (off, n int) {
	bo, bn := p.Block(b)
	po, pn := Part(bn, p.Channels, c)
	return bo + po, pn
}

// SubChunks is the number of sub-chunks of channel c's part of block b.
func (p ChunkPlan) SubChunks(b, c int) int {
	_, n := p.Piece(b, c)
	return (n + p.ChunkElems - 1) / p.ChunkElems
}

// Sub returns the element range of sub-chunk k of channel c's part of block b.
func (p ChunkPlan) Sub(b, c, k int) (off, n int) {
	po, pn := p.Piece(b, c)
	off = k * p.ChunkElems
	n = pn - off
	if n > p.ChunkElems {
		n = p.ChunkElems
	}
	return po + off, n
}

// WholeRange returns the element range channel c moves when the whole
// buffer (not one block of it) is split across channels (broadcast and
// send/receive).
func (p ChunkPlan) WholeRange(c int) (off, n int) { return Part(p.Count, p.Channels, c) }

// WholeSubChunks and WholeSub are SubChunks and Sub for WholeRange.
func (p ChunkPlan) WholeSubChunks(c int) int {
	_, n := p.WholeRange(c)
	return (n + p.ChunkElems - 1) / p.ChunkElems
}

// WholeSub returns sub-chunk k of channel c's whole-buffer range.
func (p ChunkPlan) WholeSub(c, k int) (off, n int) {
	wo, wn := p.WholeRange(c)
	off = k * p.ChunkElems
	n = wn - off
	if n > p.ChunkElems {
		n = p.ChunkElems
	}
	return wo + off, n
}

// RDKind is what a rank does in one step of recursive doubling.
type RDKind uint8

// Recursive-doubling step kinds.
const (
	// RDSendFold: an extra rank (non-power-of-two n) hands its data to its
	// partner and waits for the result.
	RDSendFold RDKind = iota + 1
	// RDRecvFold: the partner of an extra rank reduces the extra rank's data
	// into its own.
	RDRecvFold
	// RDExchange: swap the whole buffer with Peer and reduce.
	RDExchange
	// RDSendResult: return the final result to the extra rank.
	RDSendResult
	// RDRecvResult: the extra rank receives the final result.
	RDRecvResult
)

// RDStep is one step of recursive doubling. Lower reports whether this rank
// is the left operand: the result is always (lower-rank data) op (higher-rank
// data), so that every rank computes bit-identical values.
type RDStep struct {
	Kind  RDKind
	Peer  int
	Lower bool
}

// RecursiveDoubling returns rank r's steps of a latency-optimal all-reduce
// over n ranks: log2(p) exchange rounds among p = 2^floor(log2 n) ranks,
// with the n-p extra ranks folded in before and served after.
func RecursiveDoubling(n, r int) []RDStep {
	if n <= 1 {
		return nil
	}
	p := 1
	for p*2 <= n {
		p *= 2
	}
	rem := n - p
	var steps []RDStep
	var v int // virtual rank among the p participants, -1 for extra ranks
	if r < 2*rem {
		if r%2 == 0 {
			return []RDStep{{Kind: RDSendFold, Peer: r + 1, Lower: true}, {Kind: RDRecvResult, Peer: r + 1}}
		}
		steps = append(steps, RDStep{Kind: RDRecvFold, Peer: r - 1, Lower: false})
		v = r / 2
	} else {
		v = r - rem
	}
	real := func(v int) int {
		if v < rem {
			return 2*v + 1
		}
		return v + rem
	}
	for mask := 1; mask < p; mask <<= 1 {
		pv := v ^ mask
		steps = append(steps, RDStep{Kind: RDExchange, Peer: real(pv), Lower: v < pv})
	}
	if r < 2*rem {
		steps = append(steps, RDStep{Kind: RDSendResult, Peer: r - 1})
	}
	return steps
}
