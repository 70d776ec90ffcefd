//go:build cuda

package cudabuf

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// Available reports whether a CUDA device can be used.
func Available() bool { return cuda.Available() }

var (
	_ collective.Buffer       = (*Buffer)(nil)
	_ collective.BufferCopier = (*Buffer)(nil)
	_ collective.PeerReducer  = (*Buffer)(nil)
	_ collective.Allocator    = (*Buffer)(nil)
)

// DType maps a collective dtype to the kernels' dtype.
func DType(dt collective.DType) (cuda.DType, error) {
	switch dt {
	case collective.Float32:
		return cuda.Float32, nil
	case collective.Float64:
		return cuda.Float64, nil
	case collective.Float16:
		return cuda.Float16, nil
	case collective.BFloat16:
		return cuda.BFloat16, nil
	case collective.Int32:
		return cuda.Int32, nil
	case collective.Int64:
		return cuda.Int64, nil
	case collective.Uint8:
		return cuda.Uint8, nil
	}
	return 0, fmt.Errorf("%w: %v has no CUDA kernel", collective.ErrBadDType, dt)
}

// Op maps a collective op to the kernels' op.
func Op(op collective.Op) (cuda.Op, error) {
	switch op {
	case collective.OpSum:
		return cuda.Sum, nil
	case collective.OpAvg:
		return cuda.Avg, nil
	case collective.OpMax:
		return cuda.Max, nil
	case collective.OpMin:
		return cuda.Min, nil
	case collective.OpProd:
		return cuda.Prod, nil
	}
	return 0, fmt.Errorf("%w: %v", collective.ErrBadOp, op)
}

// devState is per-device staging: device scratch twins of the pinned slots
// and one event per slot.
type devState struct {
	idx     int
	dev     *cuda.Device
	scratch *cuda.Mem
	events  []*cuda.Event
	// iss, with WithIssuingThread, runs the device's enqueues (see issue)
	iss *cuda.Issuer
}

// issue runs fn, a sequence of driver calls that only enqueue (copies,
// kernels, event records, stream waits) for one staging step, on the
// device's issuing thread (WithIssuingThread), or else on the calling
// goroutine. It returns once fn has run, with fn's error, so callers keep
// their order and bookkeeping either way.
func (ds *devState) issue(fn func() error) error {
	if ds.iss == nil {
		return fn()
	}
	return ds.iss.Do(fn)
}

// Backend owns the CUDA runtime (devices, pinned pool) and the per-device
// staging areas. Safe for concurrent use.
type Backend struct {
	rt   *cuda.Runtime
	devs []*devState
	slot int

	// Staging slots: the runtime's pinned pool, grown on demand up to
	// maxSlots so that no mix of outstanding reads and writes can deadlock.
	opts     options
	free     chan *stageSlot
	pmu      sync.Mutex
	slots    []*stageSlot // every slot, for Close
	nsmall   int          // pool-sized slots in slots
	maxSlots int
	// pending is the FIFO of staged slots whose device work may still run,
	// across all buffers: whoever needs a slot reclaims the oldest.
	pending []pending
	// Sized slots: staging for chunks larger than a pool slot, by size
	// class (a power of two), kept once made; see sizedSlot.
	bmu       sync.Mutex
	bcond     *sync.Cond
	bfree     map[int][]*stageSlot
	bbytes    int64
	bmaxBytes int64
	// canPeer[a][p]: kernels on device a may read device p's memory.
	canPeer [][]bool
	poller  *poller // WithSharedPoller

	closeOnce sync.Once
	closeErr  error
}

// Option tunes a Backend.
type Option func(*options)

type options struct {
	spin       bool
	rangeDeps  bool
	noPrefetch bool
	eagerPeer  bool
	poll       bool
	shared     bool
	locked     bool
	zeroCopy   int
	noSameHost bool
	// same-host rings run as rings even where every rank is on one GPU
	ringOnOneDevice bool
	// issuing thread per device (WithIssuingThread)
	issuer    bool
	issuerCfg cuda.IssuerConfig
}

// defaultOptions apply before Open's own options (measurement builds set
// them to try another default without changing callers).
var defaultOptions []Option

// WithZeroCopyReduce makes staged reduces of chunks up to maxBytes read the
// pinned slot directly from the kernel (mapped host memory) instead of
// copying it to device scratch first: one driver call and one copy less per
// received chunk. Default DefaultZeroCopyBytes; 0 turns it off. Measured on
// 2x H200 (two processes over loopback, 2026-11-26, one run in the same
// call): 1 / 4 / 16 / 64 / 256 MiB busbw 2.52 / 3.51 / 8.54 / 13.86 / 13.94
// GB/s against 2.21 / 3.16 / 8.07 / 13.46 / 13.62 without it.
func WithZeroCopyReduce(maxBytes int) Option { return func(o *options) { o.zeroCopy = maxBytes } }

// DefaultZeroCopyBytes is the largest chunk whose staged reduce reads
// pinned memory directly by default (WithZeroCopyReduce). Larger chunks
// (the 4 MiB chunks of 64 MiB and larger operations) keep the copy engines'
// upload, which streams faster than kernel reads over the bus.
const DefaultZeroCopyBytes = 1 << 20

// WithRangeDeps makes a ReadChunk wait only for earlier writes to ranges that
// overlap it (tracked with one event per write) instead of for everything
// queued on the buffer's write stream. Off by default: on 2×H100 over
// loopback TCP (16 channels) it measured 9.6 / 11.2 GB/s busbw at 64 / 256
// MiB against 10.9 / 11.5 without it (2026-11-25), the extra event per write
// costing more than the false waits it saves.
func WithRangeDeps(on bool) Option { return func(o *options) { o.rangeDeps = on } }

// WithSpinWait chooses how host waits on staging copies wait: spinning on a
// core (true, the default: lowest latency; measured 6.2 against 4.9 GB/s
// busbw with 4 channels over loopback TCP on 2×H100) or sleeping (false:
// frees the cores when very many channels wait at once).
func WithSpinWait(spin bool) Option { return func(o *options) { o.spin = spin } }

// WithoutSameHost makes the backend's buffers refuse same-host rings
// (collective.SameHostReducer), so a Communicator whose ranks are processes
// of one host keeps their all-reduces on the network.
func WithoutSameHost() Option { return func(o *options) { o.noSameHost = true } }

// WithSameHostRingOnOneDevice makes a same-host ring whose ranks all use
// one GPU run as a ring of IPC hops (2(n-1) steps across the processes'
// contexts) instead of in rank 0's context (the default; see
// samehost_cuda.go). For measurements.
func WithSameHostRingOnOneDevice(on bool) Option {
	return func(o *options) { o.ringOnOneDevice = on }
}

// WithIssuingThread makes each device's staging enqueues (the copies,
// kernels, event records and stream waits of every read, prefetch and
// received chunk, and of peer moves) run on one issuing thread per device
// (cuda.Issuer, tuned by cfg) instead of on the channels' goroutines, which
// otherwise call into the driver at once: with 16 channels each driver
// call cost 3-5x what it costs with 4 (h100x1, 2026-12-07). Waits for
// copies stay on the callers. Off by default until measured (`gpumesh
// bench allreduce --cuda-issuer`).
func WithIssuingThread(on bool, cfg cuda.IssuerConfig) Option {
	return func(o *options) { o.issuer, o.issuerCfg = on, cfg }
}

// Open opens the CUDA runtime with cfg, allocates a device scratch twin of
// the pinned pool on every device and enables peer access between every pair
// of devices that supports it.
func Open(cfg cuda.Config, opts ...Option) (*Backend, error) {
	o := options{spin: true, zeroCopy: DefaultZeroCopyBytes}
	for _, f := range append(defaultOptions[:len(defaultOptions):len(defaultOptions)], opts...) {
		f(&o)
	}
	rt, err := cuda.Open(cfg)
	if err != nil {
		return nil, err
	}
	return newBackend(rt, o)
}

func newBackend(rt *cuda.Runtime, o options) (*Backend, error) {
	pool := rt.Pool()
	slots := pool.Slots()
	b := &Backend{rt: rt, slot: pool.SlotBytes(), maxSlots: 4 * slots, opts: o, bfree: map[int][]*stageSlot{}}
	b.bcond = sync.NewCond(&b.bmu)
	b.bmaxBytes = max(int64(b.maxSlots)*int64(b.slot), 1<<30)
	if o.shared {
		b.poller = newPoller()
	}
	b.free = make(chan *stageSlot, b.maxSlots)
	for i, d := range rt.Devices() {
		ds := &devState{idx: i, dev: d}
		b.devs = append(b.devs, ds)
		var err error
		if o.issuer {
			if ds.iss, err = d.NewIssuer(o.issuerCfg); err != nil {
				b.Close()
				return nil, err
			}
		}
		if ds.scratch, err = d.Alloc(int64(slots) * int64(b.slot)); err != nil {
			b.Close()
			return nil, err
		}
		for j := 0; j < slots; j++ {
			ev, err := b.newSlotEvent(d)
			if err != nil {
				b.Close()
				return nil, err
			}
			ds.events = append(ds.events, ev)
		}
	}
	for i := 0; i < slots; i++ {
		pb, ok := pool.TryGet()
		if !ok {
			b.Close()
			return nil, fmt.Errorf("cudabuf: pinned pool has %d free slots, want %d", pool.Free(), slots)
		}
		st := &stageSlot{host: pb.Bytes(), pooled: pb}
		for _, ds := range b.devs {
			st.scratch = append(st.scratch, ds.scratch.Ptr().Add(int64(pb.Index())*int64(b.slot)))
			st.events = append(st.events, ds.events[pb.Index()])
		}
		b.slots = append(b.slots, st)
		b.nsmall++
		b.free <- st
	}
	for i, a := range rt.Devices() {
		b.canPeer = append(b.canPeer, make([]bool, len(rt.Devices())))
		for j, p := range rt.Devices() {
			if a == p {
				b.canPeer[i][j] = true
				continue
			}
			if ok, err := a.CanAccessPeer(p); err == nil && ok {
				if err := a.EnablePeerAccess(p); err != nil {
					b.Close()
					return nil, err
				}
				b.canPeer[i][j] = true
			}
		}
	}
	return b, nil
}

func (b *Backend) newSlotEvent(d *cuda.Device) (*cuda.Event, error) {
	if b.opts.spin {
		return d.NewEvent(false)
	}
	return d.NewBlockingEvent()
}

// stageSlot is one pinned host buffer with, per device, a device scratch
// twin and an event marking the end of the slot's last use.
type stageSlot struct {
	host    []byte
	scratch []cuda.DevPtr // by device index
	events  []*cuda.Event // by device index
	pooled  *cuda.PinnedBuffer
	mems    []*cuda.Mem // grown slots own their scratch
}

// grow adds a pool-sized slot (pinned host memory, scratch and an event per
// device). Called with pmu held.
func (b *Backend) grow() (*stageSlot, error) {
	st, err := b.newSlot(b.slot)
	if err == nil {
		b.slots = append(b.slots, st)
		b.nsmall++
	}
	return st, err
}

// newSlot allocates a slot of size bytes that owns its memory and events.
func (b *Backend) newSlot(size int) (*stageSlot, error) {
	host, err := b.devs[0].dev.PinnedAlloc(size)
	if err != nil {
		return nil, err
	}
	st := &stageSlot{host: host}
	for _, ds := range b.devs {
		m, err := ds.dev.Alloc(int64(size))
		if err != nil {
			b.freeSlot(st)
			return nil, err
		}
		st.mems = append(st.mems, m)
		st.scratch = append(st.scratch, m.Ptr())
		ev, err := b.newSlotEvent(ds.dev)
		if err != nil {
			b.freeSlot(st)
			return nil, err
		}
		st.events = append(st.events, ev)
	}
	return st, nil
}

func (b *Backend) freeSlot(st *stageSlot) error {
	if st.pooled != nil {
		return nil // the runtime pool and devState own its memory and events
	}
	var errs []error
	for _, ev := range st.events {
		errs = append(errs, ev.Close())
	}
	for _, m := range st.mems {
		errs = append(errs, m.Free())
	}
	errs = append(errs, b.devs[0].dev.PinnedFree(st.host))
	return errors.Join(errs...)
}

// getSlot takes a free slot; else waits for the oldest staged slot of any
// buffer to finish; else grows the set; else (at maxSlots) waits for a free
// one.
func (b *Backend) getSlot() (*stageSlot, error) {
	select {
	case st := <-b.free:
		return st, nil
	default:
	}
	b.pmu.Lock()
	if len(b.pending) > 0 {
		p := b.pending[0]
		b.pending = b.pending[1:]
		b.pmu.Unlock()
		if err := b.waitEvent(p.ev); err != nil {
			b.free <- p.slot
			return nil, err
		}
		return p.slot, nil
	}
	if b.nsmall < b.maxSlots {
		st, err := b.grow()
		b.pmu.Unlock()
		return st, err
	}
	b.pmu.Unlock()
	return <-b.free, nil
}

// putSlot returns a slot to its free list (pool-sized or sized).
func (b *Backend) putSlot(st *stageSlot) {
	if len(st.host) > b.slot {
		b.bmu.Lock()
		b.bfree[len(st.host)] = append(b.bfree[len(st.host)], st)
		b.bmu.Unlock()
		b.bcond.Broadcast()
		return
	}
	b.free <- st
}

// slotFor takes a slot of at least bytes: a pool slot when one is large
// enough, else a sized one (sizedSlot). Any slot larger than asked serves.
func (b *Backend) slotFor(bytes int) (*stageSlot, error) {
	if bytes <= b.slot {
		return b.getSlot()
	}
	return b.sizedSlot(bytes)
}

// sizeClass is the sized-slot size for a chunk of bytes: the next power of
// two, so that chunks of one configuration share slots.
func sizeClass(bytes int) int {
	c := 1
	for c < bytes {
		c <<= 1
	}
	return c
}

// sizedSlot takes a free slot of bytes' size class; else reclaims staged
// slots whose work is done; else allocates one (pinned memory is allocated
// once per slot and kept, so chunks larger than a pool slot do not pay an
// allocation per chunk) while the sized slots stay under bmaxBytes; else
// waits for one to be given back.
func (b *Backend) sizedSlot(bytes int) (*stageSlot, error) {
	size := sizeClass(bytes)
	pop := func() *stageSlot {
		if l := b.bfree[size]; len(l) > 0 {
			st := l[len(l)-1]
			b.bfree[size] = l[:len(l)-1]
			return st
		}
		return nil
	}
	for reclaimed := false; ; reclaimed = true {
		b.bmu.Lock()
		if st := pop(); st != nil {
			b.bmu.Unlock()
			return st, nil
		}
		if !reclaimed {
			b.bmu.Unlock()
			b.addPending(pending{}) // finished work gives its slots back
			continue
		}
		if b.bbytes+int64(size) <= b.bmaxBytes || b.bbytes == 0 {
			b.bbytes += int64(size)
			b.bmu.Unlock()
			st, err := b.newSlot(size)
			if err != nil {
				b.bmu.Lock()
				b.bbytes -= int64(size)
				b.bmu.Unlock()
				return nil, err
			}
			b.pmu.Lock()
			b.slots = append(b.slots, st)
			b.pmu.Unlock()
			return st, nil
		}
		b.bmu.Unlock()
		// at the bound: wait for the oldest staged slot, then look again
		b.pmu.Lock()
		if len(b.pending) > 0 {
			p := b.pending[0]
			b.pending = b.pending[1:]
			b.pmu.Unlock()
			err := b.waitEvent(p.ev)
			b.putSlot(p.slot)
			if err != nil {
				return nil, err
			}
			continue
		}
		b.pmu.Unlock()
		if b.evict(size) {
			continue
		}
		b.bmu.Lock()
		for len(b.bfree[size]) == 0 {
			b.bcond.Wait()
		}
		st := pop()
		b.bmu.Unlock()
		return st, nil
	}
}

// evict frees one free sized slot of another size class than size (making
// room under bmaxBytes) and reports whether there was one.
func (b *Backend) evict(size int) bool {
	b.bmu.Lock()
	var st *stageSlot
	for c, l := range b.bfree {
		if c != size && len(l) > 0 {
			st = l[len(l)-1]
			b.bfree[c] = l[:len(l)-1]
			b.bbytes -= int64(c)
			break
		}
	}
	b.bmu.Unlock()
	if st == nil {
		return false
	}
	b.pmu.Lock()
	for i, s := range b.slots {
		if s == st {
			b.slots = append(b.slots[:i], b.slots[i+1:]...)
			break
		}
	}
	b.pmu.Unlock()
	_ = b.freeSlot(st) // its work is done: it was free
	return true
}

// StagingSlots reports how many pinned staging slots are free and how many
// exist: pool-sized ones (they grow under pressure up to four times the
// pool) and sized ones (for chunks larger than a pool slot).
func (b *Backend) StagingSlots() (free, total int) {
	b.pmu.Lock()
	free, total = len(b.free), len(b.slots)
	b.pmu.Unlock()
	b.bmu.Lock()
	for _, l := range b.bfree {
		free += len(l)
	}
	b.bmu.Unlock()
	return free, total
}

// Runtime is the underlying CUDA runtime.
func (b *Backend) Runtime() *cuda.Runtime { return b.rt }

// NumDevices is the number of opened devices.
func (b *Backend) NumDevices() int { return len(b.devs) }

// Close frees the staging areas and the runtime; idempotent. Buffers must be
// freed first.
func (b *Backend) Close() error {
	b.closeOnce.Do(func() {
		if b.poller != nil {
			b.poller.close()
		}
		var errs []error
		for _, ds := range b.devs {
			if ds.iss != nil {
				ds.iss.Close()
			}
		}
		for _, st := range b.slots {
			errs = append(errs, b.freeSlot(st))
		}
		for _, ds := range b.devs {
			for _, ev := range ds.events {
				errs = append(errs, ev.Close())
			}
			if ds.scratch != nil {
				errs = append(errs, ds.scratch.Free())
			}
		}
		errs = append(errs, b.rt.Close())
		b.closeErr = errors.Join(errs...)
	})
	return b.closeErr
}

type pending struct {
	slot *stageSlot
	ev   *cuda.Event
}

// writeRec is a write to elements [off, off+n) enqueued on the write stream;
// ev is recorded right after it.
type writeRec struct {
	off, n int
	ev     *cuda.Event
}

// noteWriteLocked records that [off, off+n) was just written on wr (range
// dependency tracking). Called with mu held.
func (buf *Buffer) noteWriteLocked(off, n int) error {
	if !buf.be.opts.rangeDeps {
		return nil
	}
	buf.pruneWritesLocked()
	var ev *cuda.Event
	if k := len(buf.evFree); k > 0 {
		ev, buf.evFree = buf.evFree[k-1], buf.evFree[:k-1]
	} else {
		var err error
		if ev, err = buf.ds.dev.NewEvent(false); err != nil {
			return err
		}
	}
	if err := buf.wr.Record(ev); err != nil {
		buf.evFree = append(buf.evFree, ev)
		return err
	}
	buf.writes = append(buf.writes, writeRec{off: off, n: n, ev: ev})
	return nil
}

// pruneWritesLocked drops writes that completed (the write stream runs in
// order, so they complete front first). Called with mu held.
func (buf *Buffer) pruneWritesLocked() {
	for len(buf.writes) > 0 {
		done, err := buf.writes[0].ev.Done()
		if err != nil {
			buf.fail(err)
		}
		if !done && err == nil {
			return
		}
		buf.evFree = append(buf.evFree, buf.writes[0].ev)
		buf.writes = buf.writes[1:]
	}
}

// unlocked reports whether reads and staged writes enqueue their device
// work without holding mu: always, except with WithRangeDeps (whose write
// events are bookkeeping under mu). The streams take work from many
// goroutines; what mu still orders is the buffer's bookkeeping (prefetched
// copies, in-flight ranges), see enqueueStaged and PrefetchChunk.
func (buf *Buffer) unlocked() bool { return !buf.be.opts.rangeDeps && !buf.be.opts.locked }

// WithLockedEnqueue makes reads, prefetches and staged writes hold the
// buffer's lock while they enqueue device work, as before 2026-11-26
// (measurement only: it serializes every channel's driver calls).
func WithLockedEnqueue(on bool) Option { return func(o *options) { o.locked = on } }

// span is a range of elements whose device work is being enqueued without
// mu; stale marks a prefetch that a write to its range overtook.
type span struct {
	off, n int
	stale  bool
}

func (s *span) overlaps(off, n int) bool { return s.off < off+n && off < s.off+s.n }

func removeSpan(l []*span, x *span) []*span {
	for i, s := range l {
		if s == x {
			l[i] = l[len(l)-1]
			l[len(l)-1] = nil
			return l[:len(l)-1]
		}
	}
	return l
}

// waitWritesLocked makes the read stream wait for the writes that overlap
// [off, off+n), or for the whole write stream without range tracking.
//
// Without range tracking it needs no lock, and it enqueues nothing when the
// read stream already waits for every write counted so far (wrSeq, bumped
// after each write's enqueue, against rdSeen, the count the last wait
// covered): the reads of a step's first chunks need no event at all.
func (buf *Buffer) waitWritesLocked(off, n int) error {
	if !buf.be.opts.rangeDeps {
		seq := buf.wrSeq.Load()
		if seq == buf.rdSeen.Load() {
			return nil
		}
		if err := buf.wr.Record(buf.wrMark); err != nil {
			return err
		}
		if err := buf.rd.Wait(buf.wrMark); err != nil {
			return err
		}
		for {
			cur := buf.rdSeen.Load()
			if cur >= seq || buf.rdSeen.CompareAndSwap(cur, seq) {
				return nil
			}
		}
	}
	buf.pruneWritesLocked()
	for _, w := range buf.writes {
		if w.off < off+n && off < w.off+w.n {
			if err := buf.rd.Wait(w.ev); err != nil {
				return err
			}
		}
	}
	return nil
}

// Buffer is a collective.Buffer in device memory of one device.
type Buffer struct {
	be  *Backend
	ds  *devState
	dt  collective.DType
	cdt cuda.DType
	n   int
	mem *cuda.Mem

	rd, wr   *cuda.Stream
	wrMark   *cuda.Event // recorded on wr, waited on by rd or peers
	peerMark *cuda.Event // recorded on wr after a peer op, waited on by the peer's wr
	mu       sync.Mutex  // orders enqueues; guards reads, big, err
	reads    readSet[*stageSlot]
	writes   []writeRec               // WithRangeDeps: writes whose event may be pending, in stream order
	evFree   []*cuda.Event            // WithRangeDeps: spare events for writes
	pre      map[readKey][]*stageSlot // PrefetchChunk copies not yet read
	npre     int                      // slots held in pre
	readers  []peerRead               // peer reads of this buffer not yet waited for
	inflight []*span                  // staged writes being enqueued without mu
	wrSeq    atomic.Uint64            // writes enqueued on wr (bumped after each)
	rdSeen   atomic.Uint64            // wrSeq that rd last waited for
	fetching []*span                  // prefetches being enqueued without mu
	readerEv map[*devState][]*cuda.Event
	err      error
	freed    bool
	rings    []*sameHostRing // open same-host rings (samehost_cuda.go)

	stats bufStats
}

// NewBuffer allocates n elements of dt on device index dev (an index into
// Runtime().Devices()). The memory is not initialised.
func (b *Backend) NewBuffer(dev int, dt collective.DType, n int) (*Buffer, error) {
	if dev < 0 || dev >= len(b.devs) {
		return nil, fmt.Errorf("%w: device index %d, %d device(s) open", collective.ErrBadArgument, dev, len(b.devs))
	}
	cdt, err := DType(dt)
	if err != nil {
		return nil, err
	}
	if n < 0 {
		return nil, fmt.Errorf("%w: %d elements", collective.ErrBadArgument, n)
	}
	ds := b.devs[dev]
	bytes := int64(n) * int64(dt.Size())
	if bytes == 0 {
		bytes = 16
	}
	mem, err := ds.dev.Alloc(bytes)
	if err != nil {
		return nil, err
	}
	return b.newBuffer(ds, dt, cdt, n, mem)
}

// newBuffer makes a Buffer over mem (which its Free frees, unless mem is a
// view): its streams and events.
func (b *Backend) newBuffer(ds *devState, dt collective.DType, cdt cuda.DType, n int, mem *cuda.Mem) (*Buffer, error) {
	buf := &Buffer{be: b, ds: ds, dt: dt, cdt: cdt, n: n, mem: mem, pre: map[readKey][]*stageSlot{}, readerEv: map[*devState][]*cuda.Event{}}
	buf.wrSeq.Store(1) // work enqueued on wr directly (tests) before any read
	var err error
	if buf.rd, err = ds.dev.NewStream(); err != nil {
		buf.Free()
		return nil, err
	}
	if buf.wr, err = ds.dev.NewStream(); err != nil {
		buf.Free()
		return nil, err
	}
	if buf.wrMark, err = ds.dev.NewEvent(false); err != nil {
		buf.Free()
		return nil, err
	}
	if buf.peerMark, err = ds.dev.NewEvent(false); err != nil {
		buf.Free()
		return nil, err
	}
	return buf, nil
}

// NewLike implements collective.Allocator: a buffer of n elements of the
// same dtype on the same device (scratch for out-of-place operations). The
// caller frees it with Free when it is a *Buffer.
func (buf *Buffer) NewLike(n int) (collective.Buffer, error) {
	for i, ds := range buf.be.devs {
		if ds == buf.ds {
			return buf.be.NewBuffer(i, buf.dt, n)
		}
	}
	return nil, fmt.Errorf("%w: buffer's device is not in its backend", collective.ErrBadArgument)
}

// Free waits for outstanding work and releases the device memory, streams
// and events; idempotent.
func (buf *Buffer) Free() error {
	buf.mu.Lock()
	if buf.freed {
		buf.mu.Unlock()
		return nil
	}
	buf.freed = true
	buf.mu.Unlock()
	var errs []error
	errs = append(errs, buf.closeRings(), buf.Sync())
	for _, s := range []*cuda.Stream{buf.rd, buf.wr} {
		if s != nil {
			errs = append(errs, s.Close())
		}
	}
	for _, e := range buf.evFree {
		errs = append(errs, e.Close())
	}
	buf.evFree = nil
	for _, l := range buf.readerEv {
		for _, e := range l {
			errs = append(errs, e.Close())
		}
	}
	buf.readerEv = nil
	for _, e := range []*cuda.Event{buf.wrMark, buf.peerMark} {
		if e != nil {
			errs = append(errs, e.Close())
		}
	}
	if buf.mem != nil {
		errs = append(errs, buf.mem.Free())
	}
	return errors.Join(errs...)
}

// Device is the CUDA device holding the buffer.
func (buf *Buffer) Device() *cuda.Device { return buf.ds.dev }

// Ptr is the device address of element 0.
func (buf *Buffer) Ptr() cuda.DevPtr { return buf.mem.Ptr() }

// DType implements collective.Buffer.
func (buf *Buffer) DType() collective.DType { return buf.dt }

// Len implements collective.Buffer.
func (buf *Buffer) Len() int { return buf.n }

func (buf *Buffer) at(off int) cuda.DevPtr {
	return buf.mem.Ptr().Add(int64(off) * int64(buf.dt.Size()))
}

func (buf *Buffer) check(off, n int) error {
	if off < 0 || n < 0 || off+n > buf.n {
		return fmt.Errorf("%w: range [%d,%d) outside buffer of %d elements", collective.ErrBadArgument, off, off+n, buf.n)
	}
	return nil
}

// fail remembers the first asynchronous error; Sync returns it.
func (buf *Buffer) fail(err error) error {
	if err != nil && buf.err == nil {
		buf.err = err
	}
	return err
}

// addPending queues a staged slot and returns finished ones to the pool
// without blocking.
func (be *Backend) addPending(p pending) {
	be.pmu.Lock()
	defer be.pmu.Unlock()
	if p.slot != nil {
		be.pending = append(be.pending, p)
	}
	for len(be.pending) > 0 {
		done, err := be.pending[0].ev.Done()
		if !done && err == nil {
			return
		}
		be.putSlot(be.pending[0].slot)
		be.pending = be.pending[1:]
	}
}

// ReadChunk implements collective.Buffer: it stages elements [off, off+n)
// into pinned host memory on the read stream (after every earlier write) and
// returns once the copy is done. The bytes stay valid until ReleaseChunk.
func (buf *Buffer) ReadChunk(off, n int) ([]byte, error) {
	if err := buf.check(off, n); err != nil {
		return nil, err
	}
	buf.stats.reads.Add(1)
	tr := time.Now()
	defer buf.stats.readNs.add(tr)
	if host, ok, err := buf.readPrefetched(off, n); ok {
		trace("readpre", off, n, tr)
		return host, err
	}
	bytes := n * buf.dt.Size()
	t0 := time.Now()
	slot, err := buf.be.slotFor(bytes)
	buf.stats.slotNs.add(t0)
	if err != nil {
		return nil, err
	}
	host := slot.host[:bytes]
	done := slot.events[buf.ds.idx]
	// Without range tracking the enqueues need no lock (see unlocked): the
	// collective issues a read after the writes it must see returned.
	unlocked := buf.unlocked()
	if !unlocked {
		buf.mu.Lock()
	}
	err = buf.enqueueRead(host, off, n, done)
	if !unlocked {
		buf.mu.Unlock()
	}
	if err == nil {
		tw := time.Now()
		err = buf.be.waitEvent(done)
		buf.stats.waitNs.add(tw)
	}
	trace("read", off, n, tr)
	if err != nil {
		buf.rd.Synchronize() // the copy may have been enqueued
		buf.be.putSlot(slot)
		return nil, err
	}
	buf.mu.Lock()
	buf.reads.add(off, n, host, slot)
	buf.mu.Unlock()
	return host, nil
}

// enqueueRead enqueues the read stream's wait for earlier writes, the copy
// of elements [off, off+n) into host (pinned) and the record of done after
// it: one issue (see devState.issue).
func (buf *Buffer) enqueueRead(host []byte, off, n int, done *cuda.Event) error {
	return buf.ds.issue(func() error {
		if err := buf.waitWritesLocked(off, n); err != nil {
			return err
		}
		if err := delayStream(buf.rd); err != nil {
			return err
		}
		if err := buf.rd.CopyDtoH(host, buf.at(off)); err != nil {
			return err
		}
		return buf.rd.Record(done)
	})
}

// ReleaseChunk implements collective.Buffer: it gives back the staging slot
// of the read that returned data (several reads of one range may be
// outstanding; see readSet).
func (buf *Buffer) ReleaseChunk(off, n int, data []byte) {
	buf.mu.Lock()
	defer buf.mu.Unlock()
	if slot, ok := buf.reads.take(off, n, data); ok {
		buf.be.putSlot(slot)
	}
}

// maxStagePiece bounds the piece that stage copies into one sized slot.
const maxStagePiece = 64 << 20

// stage runs f for consecutive pieces of src (whole elements), each copied
// into a pinned slot first: one slot for the whole of src up to
// maxStagePiece (a sized slot when src is larger than a pool slot). f
// enqueues device work reading the slot (and its device scratch twin) on the
// write stream; the slot is released when that work completes.
func (buf *Buffer) stage(off int, src collective.Segments, f func(slot *stageSlot, scratch cuda.DevPtr, elemOff, elems int) error) error {
	es := buf.dt.Size()
	total := src.Len()
	if total%es != 0 {
		return fmt.Errorf("%w: %d bytes is not a whole number of %v elements", collective.ErrBadArgument, total, buf.dt)
	}
	if err := buf.check(off, total/es); err != nil {
		return err
	}
	buf.stats.staged.Add(1)
	defer buf.stats.stageNs.add(time.Now())
	piece := max(buf.be.slot, min(total, maxStagePiece)) / es * es
	segs := src
	var segOff int
	for done := 0; done < total; {
		nb := min(piece, total-done)
		t0 := time.Now()
		slot, err := buf.be.slotFor(nb)
		buf.stats.slotNs.add(t0)
		if err != nil {
			return err
		}
		// copy nb bytes from the segments into the pinned slot
		dst := slot.host[:nb]
		for c := 0; c < nb; {
			k := copy(dst[c:], segs[0][segOff:])
			c += k
			segOff += k
			if segOff == len(segs[0]) {
				segs, segOff = segs[1:], 0
			}
		}
		buf.stats.hostCopies.Add(1)
		if err := buf.enqueueStaged(slot, off+done/es, nb/es, f); err != nil {
			return err
		}
		done += nb
	}
	return nil
}

// enqueueStaged enqueues f, device work that reads the filled slot into
// elements [eo, eo+n), on the write stream after the peer reads of that
// range, records the slot's event after it and queues the slot to come back
// when the work is done. On error the slot is given back.
func (buf *Buffer) enqueueStaged(slot *stageSlot, eo, n int, f func(slot *stageSlot, scratch cuda.DevPtr, elemOff, elems int) error) error {
	scratch := slot.scratch[buf.ds.idx]
	ev := slot.events[buf.ds.idx]
	buf.mu.Lock()
	buf.dropPrefetchLocked(eo, n)
	if len(buf.readers) == 0 && buf.unlocked() {
		// Nothing to wait for and no write bookkeeping: enqueue without
		// the lock, so that channels do not queue behind each other's
		// driver calls. The range stays in flight meanwhile (a prefetch
		// of it is skipped) and its prefetches were dropped above.
		w := &span{off: eo, n: n}
		buf.inflight = append(buf.inflight, w)
		buf.mu.Unlock()
		err := buf.ds.issue(func() error {
			err := delayStream(buf.wr)
			if err == nil {
				err = f(slot, scratch, eo, n)
			}
			buf.wrSeq.Add(1)
			if err != nil {
				return err
			}
			return buf.wr.Record(ev)
		})
		buf.mu.Lock()
		buf.inflight = removeSpan(buf.inflight, w)
		return buf.endStagedLocked(slot, ev, err)
	}
	err := buf.ds.issue(func() error {
		if err := buf.waitReadersLocked(eo, n); err != nil {
			return err
		}
		if err := delayStream(buf.wr); err != nil {
			return err
		}
		err := f(slot, scratch, eo, n)
		buf.wrSeq.Add(1)
		if err != nil {
			return err
		}
		if err := buf.wr.Record(ev); err != nil {
			return err
		}
		return buf.noteWriteLocked(eo, n)
	})
	return buf.endStagedLocked(slot, ev, err)
}

// endStagedLocked finishes enqueueStaged with mu held and releases it: on
// err the buffer fails and the slot goes back once the write stream is
// idle; otherwise the slot is queued to come back when its work is done.
func (buf *Buffer) endStagedLocked(slot *stageSlot, ev *cuda.Event, err error) error {
	if err != nil {
		buf.fail(err)
		buf.mu.Unlock()
		buf.wr.Synchronize()
		buf.be.putSlot(slot)
		return err
	}
	buf.mu.Unlock()
	buf.be.addPending(pending{slot: slot, ev: ev})
	return nil
}

// WriteChunk implements collective.Buffer: src is copied into pinned slots
// (so it is free when this returns) and on to the device asynchronously.
func (buf *Buffer) WriteChunk(off int, src collective.Segments) error {
	return buf.stage(off, src, buf.writeStaged)
}

// ReduceChunk implements collective.Buffer: src goes through a pinned slot
// and its device scratch twin, then a reduce kernel, all on the write stream.
func (buf *Buffer) ReduceChunk(off int, src collective.Segments, op collective.Op) error {
	f, err := buf.reduceStaged(op)
	if err != nil {
		return err
	}
	return buf.stage(off, src, f)
}

// writeStaged copies a filled slot to elements [eo, eo+n) (write stream).
func (buf *Buffer) writeStaged(slot *stageSlot, _ cuda.DevPtr, eo, n int) error {
	return buf.wr.CopyHtoD(buf.at(eo), slot.host[:n*buf.dt.Size()])
}

// reduceStaged returns the device work that reduces a filled slot into
// elements [eo, eo+n): a copy to the slot's device scratch and a kernel.
func (buf *Buffer) reduceStaged(op collective.Op) (func(*stageSlot, cuda.DevPtr, int, int) error, error) {
	cop, err := Op(op)
	if err != nil {
		return nil, err
	}
	zc := buf.be.opts.zeroCopy
	return func(slot *stageSlot, scratch cuda.DevPtr, eo, n int) error {
		if bytes := n * buf.dt.Size(); bytes <= zc && bytes > 0 {
			// the kernel reads the pinned slot over the bus: one driver
			// call and no copy for the chunk
			return buf.wr.Reduce(cop, buf.cdt, buf.at(eo), cuda.MappedHost(slot.host[:bytes]), int64(n))
		}
		if err := buf.wr.CopyHtoD(scratch, slot.host[:n*buf.dt.Size()]); err != nil {
			return err
		}
		return buf.wr.Reduce(cop, buf.cdt, buf.at(eo), scratch, int64(n))
	}, nil
}

// DivChunk implements collective.Buffer.
func (buf *Buffer) DivChunk(off, n, divisor int) error {
	if err := buf.check(off, n); err != nil {
		return err
	}
	if divisor == 1 || n == 0 {
		return nil
	}
	if divisor <= 0 {
		return fmt.Errorf("%w: divisor %d", collective.ErrBadArgument, divisor)
	}
	buf.mu.Lock()
	defer buf.mu.Unlock()
	buf.dropPrefetchLocked(off, n)
	err := buf.ds.issue(func() error {
		if err := buf.waitReadersLocked(off, n); err != nil {
			return err
		}
		if err := delayStream(buf.wr); err != nil {
			return err
		}
		err := buf.wr.Div(buf.cdt, buf.at(off), int64(n), float64(divisor))
		buf.wrSeq.Add(1)
		if err != nil {
			return err
		}
		return buf.noteWriteLocked(off, n)
	})
	return buf.fail(err)
}

// Sync implements collective.Buffer: it waits for both streams, returns
// every staged slot to the pool and reports the first asynchronous error.
func (buf *Buffer) Sync() error {
	defer trace("sync", 0, buf.n, time.Now())
	buf.mu.Lock()
	defer buf.mu.Unlock()
	if buf.wr != nil {
		buf.fail(buf.wr.Synchronize())
	}
	if buf.rd != nil {
		buf.fail(buf.rd.Synchronize())
	}
	buf.dropPrefetchLocked(0, buf.n)
	buf.fail(buf.syncReadersLocked())
	buf.be.addPending(pending{})
	if buf.wr != nil {
		for _, w := range buf.writes {
			buf.evFree = append(buf.evFree, w.ev)
		}
		buf.writes = buf.writes[:0]
	}
	err := buf.err
	buf.err = nil
	return err
}

// lockPair locks two buffers in a fixed order.
func lockPair(a, b *Buffer) func() {
	if a == b {
		a.mu.Lock()
		return a.mu.Unlock
	}
	if uintptr(unsafe.Pointer(a)) > uintptr(unsafe.Pointer(b)) {
		a, b = b, a
	}
	a.mu.Lock()
	b.mu.Lock()
	return func() { b.mu.Unlock(); a.mu.Unlock() }
}

// peerOp enqueues f, which writes buf[dstOff, +n) reading src[srcOff, +n),
// on buf's write stream after src's earlier writes, and makes src's later
// writes to that range (and src's Sync) wait for it, so that src is not
// overwritten while this reads it. The second dependency is recorded, not
// enqueued (see peerRead), unless WithEagerPeerDeps.
func (buf *Buffer) peerOp(src *Buffer, dstOff, srcOff, n int, f func() error) error {
	unlock := lockPair(buf, src)
	defer unlock()
	buf.stats.peer.Add(1)
	buf.dropPrefetchLocked(dstOff, n)
	err := buf.ds.issue(func() error {
		err := buf.waitReadersLocked(dstOff, n)
		if err == nil {
			err = src.wr.Record(src.wrMark)
		}
		if err == nil {
			err = buf.wr.Wait(src.wrMark)
		}
		if err == nil {
			err = delayStream(buf.wr)
		}
		if err == nil {
			err = f()
			buf.wrSeq.Add(1)
		}
		if err == nil {
			err = buf.noteWriteLocked(dstOff, n)
		}
		if err == nil && src != buf {
			// an event is recorded on a stream of its own device; waiting
			// on it from another device's stream is allowed
			if buf.be.opts.eagerPeer {
				if err = buf.wr.Record(buf.peerMark); err == nil {
					err = src.wr.Wait(buf.peerMark)
				}
			} else {
				err = src.addReaderLocked(buf, srcOff, n)
			}
		}
		return err
	})
	return buf.fail(err)
}

func (buf *Buffer) peerCheck(dstOff int, src collective.Buffer, srcOff, n int) (*Buffer, bool, error) {
	s, ok := src.(*Buffer)
	if !ok || s.be != buf.be {
		return nil, false, nil
	}
	if s.dt != buf.dt {
		return nil, true, fmt.Errorf("%w: peer buffer is %v, this one %v", collective.ErrMismatch, s.dt, buf.dt)
	}
	if err := buf.check(dstOff, n); err != nil {
		return nil, true, err
	}
	if err := s.check(srcOff, n); err != nil {
		return nil, true, err
	}
	return s, true, nil
}

// CopyFrom implements collective.BufferCopier for device sources of the same
// backend (same device or peer).
func (buf *Buffer) CopyFrom(dstOff int, src collective.Buffer, srcOff, n int) (bool, error) {
	return buf.PeerWrite(dstOff, src, srcOff, n)
}

// PeerWrite implements collective.PeerReducer: a device-to-device copy
// (cuMemcpyPeerAsync between devices) on the write stream.
func (buf *Buffer) PeerWrite(dstOff int, src collective.Buffer, srcOff, n int) (bool, error) {
	s, ok, err := buf.peerCheck(dstOff, src, srcOff, n)
	if !ok || err != nil || n == 0 {
		return ok, err
	}
	bytes := int64(n) * int64(buf.dt.Size())
	return true, buf.peerOp(s, dstOff, srcOff, n, func() error {
		if s.ds == buf.ds {
			return buf.wr.CopyDtoD(buf.at(dstOff), s.at(srcOff), bytes)
		}
		return buf.wr.CopyPeer(buf.at(dstOff), buf.ds.dev, s.at(srcOff), s.ds.dev, bytes)
	})
}

// PeerReduce implements collective.PeerReducer: the reduce kernel reads the
// peer's memory directly (NVLink/PCIe peer access), one pass, no staging.
func (buf *Buffer) PeerReduce(dstOff int, src collective.Buffer, srcOff, n int, op collective.Op) (bool, error) {
	s, ok, err := buf.peerCheck(dstOff, src, srcOff, n)
	if !ok || err != nil || n == 0 {
		return ok, err
	}
	if !buf.be.canPeer[buf.ds.idx][s.ds.idx] {
		return false, nil // the kernel cannot read the peer's memory: staged fallback
	}
	cop, err := Op(op)
	if err != nil {
		return true, err
	}
	return true, buf.peerOp(s, dstOff, srcOff, n, func() error {
		return buf.wr.Reduce(cop, buf.cdt, buf.at(dstOff), s.at(srcOff), int64(n))
	})
}

// Upload copies host bytes (exactly Len()*DType().Size()) into the buffer
// synchronously (setup, not the hot path).
func (buf *Buffer) Upload(b []byte) error {
	if len(b) != buf.n*buf.dt.Size() {
		return fmt.Errorf("%w: upload of %d bytes into %d", collective.ErrBadArgument, len(b), buf.n*buf.dt.Size())
	}
	if err := buf.Sync(); err != nil {
		return err
	}
	return buf.ds.dev.CopyHtoD(buf.mem.Ptr(), b)
}

// Download copies the buffer into host bytes synchronously after Sync.
func (buf *Buffer) Download(b []byte) error {
	if len(b) != buf.n*buf.dt.Size() {
		return fmt.Errorf("%w: download of %d bytes from %d", collective.ErrBadArgument, buf.n*buf.dt.Size(), len(b))
	}
	if err := buf.Sync(); err != nil {
		return err
	}
	return buf.ds.dev.CopyDtoH(b, buf.mem.Ptr())
}
