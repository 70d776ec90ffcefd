//go:build cuda

package cudabuf

import (
	"runtime"
	"sync/atomic"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// The collectives' by-reference hops and read-ahead (collective/peerpath.go)
// on device buffers.

var (
	_ collective.RefSender       = (*Buffer)(nil)
	_ collective.ChunkPrefetcher = (*Buffer)(nil)
)

// Stats counts how chunks moved through one buffer since it was made.
type Stats struct {
	// PeerChunks is the number of chunks moved into this buffer straight
	// from another device buffer of the backend (PeerWrite, PeerReduce: a
	// peer copy or a kernel reading the peer's memory).
	PeerChunks int64
	// StagedReads is the number of ReadChunk calls (device to pinned host),
	// including those made by a receiving rank that could not peer-move.
	StagedReads int64
	// StagedWrites is the number of WriteChunk and ReduceChunk calls
	// (host bytes through pinned memory to the device).
	StagedWrites int64
	// Prefetched is the number of ReadChunk calls served by a copy that
	// PrefetchChunk had started.
	Prefetched int64
	// DirectRecvs is the number of chunks received straight into a pinned
	// slot (collective.RecvStager: the TCP lanes) and applied from there.
	DirectRecvs int64
	// HostCopies is the number of host memory copies into pinned slots
	// (WriteChunk and ReduceChunk pieces); 0 when every chunk came through
	// DirectRecvs or peer moves.
	HostCopies int64
	// ReadTime is the time spent in ReadChunk, StageTime in WriteChunk and
	// ReduceChunk, SlotWait the part of both spent waiting for a staging
	// slot; summed over concurrent callers (channels).
	ReadTime, StageTime, SlotWait time.Duration
	// ReadWait is the part of ReadTime spent waiting for the device to
	// host copies to finish (the rest is taking slots and enqueueing).
	ReadWait time.Duration
	// SameHostOps is the number of all-reduces run on the buffer's
	// same-host ring (CUDA IPC between processes, no network).
	SameHostOps int64
}

type bufStats struct {
	peer, reads, staged, prefetched atomic.Int64
	direct, hostCopies              atomic.Int64
	ipcOps                          atomic.Int64
	readNs, stageNs, slotNs, waitNs nanos
}

// nanos accumulates elapsed time.
type nanos struct{ atomic.Int64 }

func (n *nanos) add(since time.Time) { n.Add(int64(time.Since(since))) }

// Stats returns the buffer's counters.
func (buf *Buffer) Stats() Stats {
	return Stats{
		PeerChunks:   buf.stats.peer.Load(),
		StagedReads:  buf.stats.reads.Load(),
		StagedWrites: buf.stats.staged.Load(),
		Prefetched:   buf.stats.prefetched.Load(),
		DirectRecvs:  buf.stats.direct.Load(),
		HostCopies:   buf.stats.hostCopies.Load(),
		ReadTime:     time.Duration(buf.stats.readNs.Load()),
		StageTime:    time.Duration(buf.stats.stageNs.Load()),
		SlotWait:     time.Duration(buf.stats.slotNs.Load()),
		ReadWait:     time.Duration(buf.stats.waitNs.Load()),
		SameHostOps:  buf.stats.ipcOps.Load(),
	}
}

// SendByRef implements collective.RefSender: chunks of device memory go to
// ranks of this process as references, which the receiver moves device to
// device (PeerReduce/PeerWrite) instead of through the host.
func (buf *Buffer) SendByRef() bool { return true }

// WithPrefetch turns PrefetchChunk on (the default) or off (ReadChunk then
// always copies on demand).
func WithPrefetch(on bool) Option { return func(o *options) { o.noPrefetch = !on } }

// maxPrefetch bounds the slots one buffer holds for prefetched reads.
func (buf *Buffer) maxPrefetch() int { return max(4, buf.be.maxSlots/8) }

// PrefetchChunk implements collective.ChunkPrefetcher: it enqueues the copy
// of elements [off, off+n) into a pinned slot on the read stream, after
// every write issued so far, and returns without waiting. A later
// ReadChunk(off, n) returns that copy; a write to the range issued in
// between drops it. Chunks larger than maxStagePiece, and prefetches when no
// slot is free at once, are skipped (it is a hint).
func (buf *Buffer) PrefetchChunk(off, n int) error {
	if err := buf.check(off, n); err != nil {
		return err
	}
	bytes := n * buf.dt.Size()
	if n == 0 || bytes > maxStagePiece || buf.be.opts.noPrefetch {
		return nil
	}
	defer trace("prefetch", off, n, time.Now())
	buf.mu.Lock()
	full := buf.npre+len(buf.fetching) >= buf.maxPrefetch() || buf.freed
	for _, w := range buf.inflight {
		full = full || w.overlaps(off, n) // a write of it is being enqueued
	}
	buf.mu.Unlock()
	if full {
		return nil
	}
	slot := buf.be.tryGetSlotFor(bytes)
	if slot == nil {
		return nil
	}
	ev := slot.events[buf.ds.idx]
	if !buf.unlocked() {
		buf.mu.Lock()
		err := buf.enqueueRead(slot.host[:bytes], off, n, ev)
		if err == nil {
			k := readKey{off, n}
			buf.pre[k] = append(buf.pre[k], slot)
			buf.npre++
		}
		buf.fail(err)
		buf.mu.Unlock()
		if err != nil {
			buf.rd.Synchronize() // the copy may have been enqueued
			buf.be.putSlot(slot)
		}
		return err
	}
	// Enqueue without mu. A write to the range that starts meanwhile
	// (dropPrefetchLocked) marks the copy stale: it may have been enqueued
	// before that write, so it is not kept. One in flight when this
	// started was checked above.
	f := &span{off: off, n: n}
	buf.mu.Lock()
	for _, w := range buf.inflight {
		f.stale = f.stale || w.overlaps(off, n)
	}
	buf.fetching = append(buf.fetching, f)
	buf.mu.Unlock()
	err := buf.enqueueRead(slot.host[:bytes], off, n, ev)
	buf.mu.Lock()
	buf.fetching = removeSpan(buf.fetching, f)
	keep := err == nil && !f.stale && !buf.freed
	if keep {
		k := readKey{off, n}
		buf.pre[k] = append(buf.pre[k], slot)
		buf.npre++
	}
	buf.fail(err)
	buf.mu.Unlock()
	switch {
	case err != nil:
		buf.rd.Synchronize() // the copy may have been enqueued
		buf.be.putSlot(slot)
	case !keep:
		buf.be.addPending(pending{slot: slot, ev: ev})
	}
	return err
}

// readPrefetched serves ReadChunk(off, n) from a prefetched copy if there is
// one (ok), waiting for its copy to finish.
func (buf *Buffer) readPrefetched(off, n int) (host []byte, ok bool, err error) {
	k := readKey{off, n}
	buf.mu.Lock()
	l := buf.pre[k]
	if len(l) == 0 {
		buf.mu.Unlock()
		return nil, false, nil
	}
	slot := l[0]
	if len(l) == 1 {
		delete(buf.pre, k)
	} else {
		buf.pre[k] = l[1:]
	}
	buf.npre--
	buf.mu.Unlock()
	tw := time.Now()
	err = buf.be.waitEvent(slot.events[buf.ds.idx])
	buf.stats.waitNs.add(tw)
	if err != nil {
		buf.be.putSlot(slot)
		return nil, true, err
	}
	buf.stats.prefetched.Add(1)
	host = slot.host[:n*buf.dt.Size()]
	buf.mu.Lock()
	buf.reads.add(off, n, host, slot)
	buf.mu.Unlock()
	return host, true, nil
}

// dropPrefetchLocked forgets prefetched copies of ranges that overlap [off,
// off+n) (a write to them is being issued), or every one when the range is
// the whole buffer. Their slots go back once their copies finish. Called
// with mu held.
func (buf *Buffer) dropPrefetchLocked(off, n int) {
	all := off == 0 && n >= buf.n
	for _, f := range buf.fetching {
		f.stale = f.stale || all || f.overlaps(off, n)
	}
	if buf.npre == 0 {
		return
	}
	for k, l := range buf.pre {
		if !all && !(k.off < off+n && off < k.off+k.n) {
			continue
		}
		for _, slot := range l {
			buf.be.addPending(pending{slot: slot, ev: slot.events[buf.ds.idx]})
			buf.npre--
		}
		delete(buf.pre, k)
	}
}

// tryGetSlotFor is tryGetSlot for a chunk of bytes: for more than a pool
// slot, a free sized slot, or a new one while under the bound; else nil.
func (b *Backend) tryGetSlotFor(bytes int) *stageSlot {
	if bytes <= b.slot {
		return b.tryGetSlot()
	}
	size := sizeClass(bytes)
	b.bmu.Lock()
	if l := b.bfree[size]; len(l) > 0 {
		st := l[len(l)-1]
		b.bfree[size] = l[:len(l)-1]
		b.bmu.Unlock()
		return st
	}
	grow := b.bbytes+int64(size) <= b.bmaxBytes
	if grow {
		b.bbytes += int64(size)
	}
	b.bmu.Unlock()
	if !grow {
		return nil
	}
	st, err := b.newSlot(size)
	if err != nil {
		b.bmu.Lock()
		b.bbytes -= int64(size)
		b.bmu.Unlock()
		return nil
	}
	b.pmu.Lock()
	b.slots = append(b.slots, st)
	b.pmu.Unlock()
	return st
}

// tryGetSlot takes a slot without waiting: a free one, the oldest staged
// slot if its work is done, or a new one while the set may grow; else nil.
func (b *Backend) tryGetSlot() *stageSlot {
	select {
	case st := <-b.free:
		return st
	default:
	}
	b.pmu.Lock()
	defer b.pmu.Unlock()
	if len(b.pending) > 0 {
		if done, err := b.pending[0].ev.Done(); done && err == nil {
			st := b.pending[0].slot
			b.pending = b.pending[1:]
			return st
		}
	}
	if len(b.slots) < b.maxSlots {
		if st, err := b.grow(); err == nil {
			return st
		}
	}
	return nil
}

// WithEagerPeerDeps makes every peer move enqueue, on the source buffer's
// write stream, a wait for the move (the scheme before reader tracking: it
// chains the two buffers' streams chunk by chunk). Off by default; kept to
// measure against.
func WithEagerPeerDeps(on bool) Option { return func(o *options) { o.eagerPeer = on } }

// peerRead is a move out of this buffer's elements [off, off+n) by another
// buffer's write stream (a peer copy or a kernel reading this memory); ev,
// an event of the reader's device from this buffer's pool, is recorded after
// it on that stream. A later write to an overlapping range waits for ev on
// the device, and Sync waits for every one: the reverse dependency costs
// nothing until this buffer writes the range again.
type peerRead struct {
	off, n int
	ev     *cuda.Event
	ds     *devState
}

// maxReaders bounds the list before completed reads are pruned.
const maxReaders = 256

// addReaderLocked records that reader's write stream has just enqueued a
// read of [off, off+n) of buf. Called with both buffers' mu held.
func (buf *Buffer) addReaderLocked(reader *Buffer, off, n int) error {
	if len(buf.readers) >= maxReaders {
		buf.pruneReadersLocked()
	}
	ds := reader.ds
	var ev *cuda.Event
	if l := buf.readerEv[ds]; len(l) > 0 {
		ev, buf.readerEv[ds] = l[len(l)-1], l[:len(l)-1]
	} else {
		var err error
		if ev, err = ds.dev.NewEvent(false); err != nil {
			return err
		}
	}
	if err := reader.wr.Record(ev); err != nil {
		buf.readerEv[ds] = append(buf.readerEv[ds], ev)
		return err
	}
	buf.readers = append(buf.readers, peerRead{off: off, n: n, ev: ev, ds: ds})
	return nil
}

// pruneReadersLocked forgets reads that completed.
func (buf *Buffer) pruneReadersLocked() {
	keep := buf.readers[:0]
	for _, r := range buf.readers {
		if done, err := r.ev.Done(); done && err == nil {
			buf.readerEv[r.ds] = append(buf.readerEv[r.ds], r.ev)
			continue
		}
		keep = append(keep, r)
	}
	clear(buf.readers[len(keep):])
	buf.readers = keep
}

// waitReadersLocked makes buf's write stream wait for the recorded peer
// reads of ranges overlapping [off, off+n), before a write there, and
// forgets them. Called with mu held.
func (buf *Buffer) waitReadersLocked(off, n int) error {
	if len(buf.readers) == 0 {
		return nil
	}
	var err error
	keep := buf.readers[:0]
	for _, r := range buf.readers {
		if !(r.off < off+n && off < r.off+r.n) {
			keep = append(keep, r)
			continue
		}
		// the wait captures the event's current record, so the event may
		// be reused at once
		if e := buf.wr.Wait(r.ev); e != nil && err == nil {
			err = e
		}
		buf.readerEv[r.ds] = append(buf.readerEv[r.ds], r.ev)
	}
	clear(buf.readers[len(keep):])
	buf.readers = keep
	return err
}

// syncReadersLocked waits on the host for every recorded peer read (Sync:
// afterwards the caller may overwrite the buffer by any means).
func (buf *Buffer) syncReadersLocked() error {
	var err error
	for _, r := range buf.readers {
		if e := r.ev.Synchronize(); e != nil && err == nil {
			err = e
		}
		buf.readerEv[r.ds] = append(buf.readerEv[r.ds], r.ev)
	}
	clear(buf.readers)
	buf.readers = buf.readers[:0]
	return err
}

// WithPollWait makes host waits on staging copies poll the event from the
// calling goroutine, yielding to other goroutines between polls (sleeping
// 20 µs between polls after 2 ms), instead of blocking an OS thread in
// cuEventSynchronize (spinning or sleeping, see WithSpinWait). Many channels
// waiting at once then leave the cores to the transport.
func WithPollWait(on bool) Option { return func(o *options) { o.poll = on } }

// WithSharedPoller makes host waits on staging copies go through one
// goroutine per backend that polls every pending event and wakes the
// waiters (see poller); it takes precedence over WithPollWait.
func WithSharedPoller(on bool) Option { return func(o *options) { o.shared = on } }

// waitEvent waits for ev on the host as the options say.
func (b *Backend) waitEvent(ev *cuda.Event) error {
	if b.poller != nil {
		return b.poller.wait(ev)
	}
	if !b.opts.poll {
		return ev.Synchronize()
	}
	var start time.Time
	for i := 0; ; i++ {
		done, err := ev.Done()
		if done || err != nil {
			return err
		}
		if i == 0 {
			start = time.Now()
		} else if i&63 == 0 && time.Since(start) > 2*time.Millisecond {
			time.Sleep(20 * time.Microsecond)
			continue
		}
		runtime.Gosched()
	}
}

// stepDelay, when positive (tests only, see delayStream), is the base
// delay in nanoseconds enqueued before the device work of each staging step.
var (
	stepDelay atomic.Int64
	delaySeq  atomic.Uint64
)

// delayStream enqueues on s, before a staging step's device work, a kernel
// that waits 0, 1/2, 1 or 3/2 of stepDelay (in turn over all steps): work on
// the buffers' read and write streams then runs late and out of step with
// each other, as it does on a GPU time-sliced with other processes, so that
// an ordering missing between them shows in one process (tests set
// stepDelay; production leaves it 0: one atomic load per step).
func delayStream(s *cuda.Stream) error {
	d := stepDelay.Load()
	if d <= 0 {
		return nil
	}
	k := int64(delaySeq.Add(1) % 4)
	return s.Spin(time.Duration(d * k / 2))
}

// tracer, when set (tests and measurements only), is called after each
// staging step of every buffer: its kind ("read", "readpre", "prefetch",
// "begin", "commit", "sync"), its element range and when it started.
var tracer atomic.Pointer[func(kind string, off, n int, start time.Time)]

func trace(kind string, off, n int, start time.Time) {
	if f := tracer.Load(); f != nil {
		(*f)(kind, off, n, start)
	}
}
