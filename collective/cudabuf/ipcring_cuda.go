//go:build cuda

package cudabuf

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// IPCConfig configures an IPCRing.
type IPCConfig struct {
	// Name identifies the group and session; every rank passes the same
	// value, and no other live group on the host may use it (for example
	// "<job>-<generation>-<nonce>").
	Name string
	// Dir holds the small shared files of the rendezvous. Default /dev/shm.
	Dir string
	// Rank and Size place this process in the ring.
	Rank, Size int
	// ChunkBytes is the pipelining unit. Default 32 MiB.
	ChunkBytes int
	// Timeout bounds every wait for a peer (setup, each step, the final
	// barrier). Default 30 s.
	Timeout time.Duration
}

// Validate checks the config and fills defaults.
func (c *IPCConfig) Validate() error {
	if c.Name == "" || filepath.Base(c.Name) != c.Name {
		return fmt.Errorf("%w: ipc ring: name must be a non-empty file name, got %q", collective.ErrBadArgument, c.Name)
	}
	if c.Size < 1 || c.Rank < 0 || c.Rank >= c.Size {
		return fmt.Errorf("%w: ipc ring: rank %d of %d", collective.ErrBadArgument, c.Rank, c.Size)
	}
	if c.Dir == "" {
		c.Dir = "/dev/shm"
	}
	if c.ChunkBytes <= 0 {
		c.ChunkBytes = 32 << 20
	}
	if c.Timeout <= 0 {
		c.Timeout = 30 * time.Second
	}
	return nil
}

// Shared file of one rank: fixed header, then handles.
const (
	offMagic     = 0  // written last at setup: the file is complete
	offProgress  = 8  // last event sequence number recorded
	offEnqueued  = 16 // operations fully enqueued
	offCompleted = 24 // operations completed on the device
	offBytes     = 32 // buffer length in bytes
	offNChunk    = 40
	offClosed    = 48 // 1 once this rank unmapped its left neighbour's memory
	offToken     = 56 // random; a peer that finds it there shares our /dev/shm
	offMem       = 64
	offEvents    = offMem + cuda.IPCHandleSize
	ipcMagic     = 0x67706d6573686970 // "gpmeship"
)

type shared struct {
	path string
	f    *os.File
	m    []byte
}

func (s *shared) u64(off int) *uint64 { return (*uint64)(unsafe.Pointer(&s.m[off])) }

func (s *shared) close(remove bool) error {
	var errs []error
	if s.m != nil {
		errs = append(errs, syscall.Munmap(s.m))
		s.m = nil
	}
	if s.f != nil {
		errs = append(errs, s.f.Close())
	}
	if remove {
		if err := os.Remove(s.path); err != nil && !os.IsNotExist(err) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func mapShared(path string, size int, create bool) (*shared, error) {
	flags := os.O_RDWR
	if create {
		flags |= os.O_CREATE | os.O_TRUNC
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, err
	}
	if create {
		if err := f.Truncate(int64(size)); err != nil {
			f.Close()
			return nil, err
		}
	} else if st, err := f.Stat(); err != nil || st.Size() < int64(size) {
		f.Close()
		return nil, fmt.Errorf("ipc ring: %s is not complete yet", path)
	}
	m, err := syscall.Mmap(int(f.Fd()), 0, size, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, err
	}
	return &shared{path: path, f: f, m: m}, nil
}

// IPCRing is an all-reduce among ranks in separate processes on one host,
// one device Buffer each, with no network and no host staging: every rank
// maps its left neighbour's device memory (CUDA IPC, over NVLink/PCIe) and
// runs the same pipelined ring as LocalRing. Cross-process ordering uses
// interprocess CUDA events; a small shared file per rank carries the IPC
// handles and progress counters that tell a rank when a neighbour's event has
// been recorded. Every wait is bounded by Timeout.
//
// One AllReduce at a time; every rank calls it in the same order.
type IPCRing struct {
	cfg    IPCConfig
	buf    *Buffer
	n      int
	nchunk int
	steps  int

	self, left, right *shared
	peerPath          map[int]string // where a rank's file is, if not path(rank)
	peerToken         map[int]uint64 // the token a rank's file must hold (connect)
	token             uint64         // written at offToken
	leftMem           *cuda.Mem
	own               []*cuda.Event // [step*nchunk+c], step -1 is "start" at index 0
	leftEv, rightEv   []*cuda.Event
	seq               uint64 // operations started
}

func (r *IPCRing) evIndex(t, c int) int { return 1 + t*r.nchunk + c }

// NewIPCRing sets up this rank's side and waits (up to Timeout) for its two
// neighbours to publish theirs.
func NewIPCRing(ctx context.Context, buf *Buffer, cfg IPCConfig) (*IPCRing, error) {
	r, err := publishIPCRing(buf, cfg, 0)
	if err != nil {
		return nil, err
	}
	if err := r.connect(ctx, true); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

// publishIPCRing creates this rank's events and shared file (with token at
// offToken) and publishes the handles; connect then opens the neighbours'.
func publishIPCRing(buf *Buffer, cfg IPCConfig, token uint64) (*IPCRing, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	n := cfg.Size
	r := &IPCRing{cfg: cfg, buf: buf, n: n, steps: 2 * (n - 1), token: token}
	segBytes := (buf.n + n - 1) / n * buf.dt.Size()
	r.nchunk = max(1, (segBytes+cfg.ChunkBytes-1)/cfg.ChunkBytes)
	if n == 1 {
		return r, nil
	}
	nev := 1 + r.steps*r.nchunk
	size := offEvents + nev*cuda.IPCHandleSize
	dev := buf.ds.dev
	fail := func(err error) (*IPCRing, error) {
		r.Close()
		return nil, err
	}
	for i := 0; i < nev; i++ {
		ev, err := dev.NewIPCEvent()
		if err != nil {
			return fail(err)
		}
		r.own = append(r.own, ev)
	}
	var err error
	r.self, err = mapShared(r.path(cfg.Rank), size, true)
	if err != nil {
		return fail(fmt.Errorf("ipc ring: create %s: %w", r.path(cfg.Rank), err))
	}
	mh, err := buf.mem.IPCHandle()
	if err != nil {
		return fail(err)
	}
	copy(r.self.m[offMem:], mh[:])
	for i, ev := range r.own {
		h, err := ev.IPCHandle()
		if err != nil {
			return fail(err)
		}
		copy(r.self.m[offEvents+i*cuda.IPCHandleSize:], h[:])
	}
	binary.LittleEndian.PutUint64(r.self.m[offBytes:], uint64(buf.n*buf.dt.Size()))
	binary.LittleEndian.PutUint64(r.self.m[offNChunk:], uint64(r.nchunk))
	binary.LittleEndian.PutUint64(r.self.m[offToken:], token)
	atomic.StoreUint64(r.self.u64(offMagic), ipcMagic)
	return r, nil
}

// fileSize is the size of every rank's shared file.
func (r *IPCRing) fileSize() int {
	return offEvents + (1+r.steps*r.nchunk)*cuda.IPCHandleSize
}

// connect opens the neighbours' shared files, memory and events. With wait
// it waits (up to Timeout) for a neighbour that has not published yet;
// without, a missing or incomplete file is an error at once (peerToken,
// when set, must then be in the file: the peer shares our /dev/shm).
func (r *IPCRing) connect(ctx context.Context, wait bool) error {
	if r.n == 1 {
		return nil
	}
	cfg, buf, n := r.cfg, r.buf, r.n
	size := r.fileSize()
	nev := 1 + r.steps*r.nchunk
	dev := buf.ds.dev
	ctx, cancel := context.WithTimeout(ctx, cfg.Timeout)
	defer cancel()
	open := func(rank int) (*shared, error) {
		for {
			s, err := mapShared(r.path(rank), size, false)
			if err == nil {
				if atomic.LoadUint64(s.u64(offMagic)) == ipcMagic {
					if b := binary.LittleEndian.Uint64(s.m[offBytes:]); b != uint64(buf.n*buf.dt.Size()) {
						s.close(false)
						return nil, fmt.Errorf("%w: ipc ring: rank %d has %d bytes, rank %d has %d", collective.ErrMismatch, rank, b, cfg.Rank, buf.n*buf.dt.Size())
					}
					if want, ok := r.peerToken[rank]; ok && binary.LittleEndian.Uint64(s.m[offToken:]) != want {
						s.close(false)
						return nil, fmt.Errorf("ipc ring: %s is not rank %d's file (another host or /dev/shm)", r.path(rank), rank)
					}
					return s, nil
				}
				s.close(false)
				err = errors.New("not complete")
			}
			if !wait {
				return nil, fmt.Errorf("ipc ring: rank %d's file %s: %w", rank, r.path(rank), err)
			}
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("%w: ipc ring: rank %d did not publish %s: %v", collective.ErrTimeout, rank, r.path(rank), err)
			case <-time.After(2 * time.Millisecond):
			}
		}
	}
	var err error
	lr, rr := mod(cfg.Rank-1, n), mod(cfg.Rank+1, n)
	if r.left, err = open(lr); err != nil {
		return err
	}
	if rr == lr {
		r.right = r.left
	} else if r.right, err = open(rr); err != nil {
		return err
	}
	var h cuda.IPCHandle
	copy(h[:], r.left.m[offMem:])
	if r.leftMem, err = dev.OpenIPC(h, int64(buf.n*buf.dt.Size())); err != nil {
		return err
	}
	openEvents := func(s *shared) ([]*cuda.Event, error) {
		var evs []*cuda.Event
		for i := 0; i < nev; i++ {
			copy(h[:], s.m[offEvents+i*cuda.IPCHandleSize:])
			ev, err := dev.OpenIPCEvent(h)
			if err != nil {
				return evs, err
			}
			evs = append(evs, ev)
		}
		return evs, nil
	}
	if r.leftEv, err = openEvents(r.left); err != nil {
		return err
	}
	if rr == lr {
		r.rightEv = r.leftEv
	} else if r.rightEv, err = openEvents(r.right); err != nil {
		return err
	}
	return nil
}

func (r *IPCRing) path(rank int) string {
	if p, ok := r.peerPath[rank]; ok {
		return p
	}
	return filepath.Join(r.cfg.Dir, fmt.Sprintf("gpumesh-ipc-%s.rank%d", r.cfg.Name, rank))
}

// Close releases the mappings, events and this rank's shared file. It waits
// (up to Timeout) for the right neighbour to unmap this rank's memory, since
// the buffer must not be freed while another process maps it.
func (r *IPCRing) Close() error {
	var errs []error
	if r.leftMem != nil {
		errs = append(errs, r.leftMem.Free())
		r.leftMem = nil
	}
	if r.self != nil {
		atomic.StoreUint64(r.self.u64(offClosed), 1)
	}
	if r.right != nil {
		if err := r.await(context.Background(), r.right.u64(offClosed), 1, "the right neighbour to unmap our memory"); err != nil {
			errs = append(errs, err)
		}
	}
	closeEvs := func(evs []*cuda.Event) {
		for _, ev := range evs {
			errs = append(errs, ev.Close())
		}
	}
	closeEvs(r.leftEv)
	if len(r.rightEv) > 0 && (len(r.leftEv) == 0 || &r.rightEv[0] != &r.leftEv[0]) {
		closeEvs(r.rightEv)
	}
	closeEvs(r.own)
	r.leftEv, r.rightEv, r.own = nil, nil, nil
	if r.right != nil && r.right != r.left {
		errs = append(errs, r.right.close(false))
	}
	if r.left != nil {
		errs = append(errs, r.left.close(false))
	}
	if r.self != nil {
		errs = append(errs, r.self.close(true))
	}
	r.left, r.right, r.self = nil, nil, nil
	return errors.Join(errs...)
}

// seqNo is the progress value after recording event idx of operation k.
func (r *IPCRing) seqNo(k uint64, idx int) uint64 {
	return (k-1)*uint64(1+r.steps*r.nchunk) + uint64(idx) + 1
}

// await spins (yielding to other goroutines) until *p >= v; after a couple
// of milliseconds it sleeps between checks. A peer that makes no progress
// within Timeout, or ctx ending, is an error. Neighbours normally publish
// within microseconds (they only enqueue), so sleeping early would add the
// timer's granularity to every chunk.
func (r *IPCRing) await(ctx context.Context, p *uint64, v uint64, what string) error {
	if atomic.LoadUint64(p) >= v {
		return nil
	}
	start := time.Now()
	for i := 0; ; i++ {
		if atomic.LoadUint64(p) >= v {
			return nil
		}
		if i&255 == 0 {
			el := time.Since(start)
			if err := ctx.Err(); err != nil {
				return err
			}
			if el > r.cfg.Timeout {
				return fmt.Errorf("%w: ipc ring rank %d: waited %v for %s", collective.ErrTimeout, r.cfg.Rank, r.cfg.Timeout, what)
			}
			if el > 2*time.Millisecond {
				time.Sleep(50 * time.Microsecond)
				continue
			}
		}
		runtime.Gosched()
	}
}

// AllReduce reduces the buffer in place across the ring with op.
func (r *IPCRing) AllReduce(ctx context.Context, op collective.Op) error {
	cop, err := Op(op)
	if err != nil {
		return err
	}
	buf := r.buf
	if err := buf.Sync(); err != nil {
		return err
	}
	if r.n == 1 {
		return nil
	}
	r.seq++
	k := r.seq
	// neighbours must have enqueued their waits on our previous events
	// before we record them again
	if err := r.await(ctx, r.left.u64(offEnqueued), k-1, "the left neighbour to finish the previous operation"); err != nil {
		return err
	}
	if err := r.await(ctx, r.right.u64(offEnqueued), k-1, "the right neighbour to finish the previous operation"); err != nil {
		return err
	}
	if err := r.enqueue(ctx, k, cop, op == collective.OpAvg); err != nil {
		buf.Sync()
		return err
	}
	atomic.StoreUint64(r.self.u64(offEnqueued), k)
	if err := buf.Sync(); err != nil {
		return err
	}
	atomic.StoreUint64(r.self.u64(offCompleted), k)
	// the right neighbour reads our memory until it completes
	if err := r.await(ctx, r.right.u64(offCompleted), k, "the right neighbour to complete"); err != nil {
		return err
	}
	return r.await(ctx, r.left.u64(offCompleted), k, "the left neighbour to complete")
}

func (r *IPCRing) enqueue(ctx context.Context, k uint64, cop cuda.Op, avg bool) error {
	buf, n, rank := r.buf, r.n, r.cfg.Rank
	defer buf.wrSeq.Add(1) // later staged reads wait for this work
	s := buf.wr
	es := int64(buf.dt.Size())
	record := func(idx int) error {
		if err := s.Record(r.own[idx]); err != nil {
			return err
		}
		atomic.StoreUint64(r.self.u64(offProgress), r.seqNo(k, idx))
		return nil
	}
	waitOn := func(sh *shared, evs []*cuda.Event, idx int, what string) error {
		if err := r.await(ctx, sh.u64(offProgress), r.seqNo(k, idx), what); err != nil {
			return err
		}
		return s.Wait(evs[idx])
	}
	if err := record(0); err != nil { // start: our input is ready
		return err
	}
	leftBase := r.leftMem.Ptr()
	for t := 0; t < r.steps; t++ {
		// reduce-scatter kernels on the write stream, all-gather copies on
		// the read stream (copy engines), overlapping; events order them
		s = buf.wr
		if t >= n-1 {
			s = buf.rd
		}
		for c := 0; c < r.nchunk; c++ {
			if t == 0 {
				if err := waitOn(r.left, r.leftEv, 0, "the left neighbour to start"); err != nil {
					return err
				}
			} else if err := waitOn(r.left, r.leftEv, r.evIndex(t-1, c), "the left neighbour's previous step"); err != nil {
				return err
			}
			seg, reduce := ringStep(rank, t, n)
			if !reduce {
				if err := waitOn(r.right, r.rightEv, r.evIndex(t-(n-1), c), "the right neighbour's read"); err != nil {
					return err
				}
			}
			off, cnt := ringChunk(buf.n, n, r.nchunk, seg, c)
			if cnt > 0 {
				var err error
				src := leftBase.Add(int64(off) * es)
				if reduce {
					err = s.Reduce(cop, buf.cdt, buf.at(off), src, int64(cnt))
					if err == nil && avg && t == n-2 {
						err = s.Div(buf.cdt, buf.at(off), int64(cnt), float64(n))
					}
				} else {
					err = s.CopyDtoD(buf.at(off), src, int64(cnt)*es)
				}
				if err != nil {
					return err
				}
			}
			if err := record(r.evIndex(t, c)); err != nil {
				return err
			}
		}
	}
	return nil
}

// ringChunk returns elements [off, off+cnt) of chunk c of segment seg of a
// buffer of total elements split over n ranks and nchunk chunks a segment.
func ringChunk(total, n, nchunk, seg, c int) (off, cnt int) {
	s0, s1 := seg*total/n, (seg+1)*total/n
	ln := s1 - s0
	a, b := c*ln/nchunk, (c+1)*ln/nchunk
	return s0 + a, b - a
}
