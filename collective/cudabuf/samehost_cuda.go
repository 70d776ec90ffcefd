//go:build cuda

package cudabuf

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// The same-host ring of the Communicator (collective.SameHostReducer): an
// IPCRing whose rendezvous goes over the collective's own transport instead
// of waiting for files named after the group. This rank publishes its
// shared file (IPC handles of its memory and events, and a random token)
// under a unique name; its Offer is the token, its GPU's UUID and the
// file's path; Join opens the peers' files from their offers, at once (no
// waiting: the files are complete before an offer is sent), checks their
// tokens (so a rank on another host or in another /dev/shm fails here), and
// opens their memory and events (which fails across hosts, in containers
// without the host's IPC namespace, or between GPUs that cannot reach each
// other).
//
// Where every rank's buffer is on one GPU (processes sharing a device),
// the ring would bounce each of its 2(n-1) steps between the processes'
// CUDA contexts, which the GPU time-slices: measured on one H100 (8
// processes), about 9 ms an operation whatever its size. There the group
// runs in one context instead: rank 0 maps every rank's buffer, waits (on
// the host, through the shared files) until each has synchronised its
// input, reduces them all into its own buffer and copies the result back
// into each, synchronises, and publishes completion; the other ranks only
// wait for it.

var _ collective.SameHostReducer = (*Buffer)(nil)

// ErrRingClosed is returned by a same-host ring used after its Close.
var ErrRingClosed = errors.New("cudabuf: same-host ring closed")

// SameHostRing implements collective.SameHostReducer.
func (buf *Buffer) SameHostRing(rank, size int) (collective.SameHostRing, error) {
	if buf.be.opts.noSameHost {
		return nil, errors.New("cudabuf: same-host rings turned off (WithoutSameHost)")
	}
	var rnd [16]byte
	if _, err := rand.Read(rnd[:]); err != nil {
		return nil, err
	}
	cfg := IPCConfig{Name: fmt.Sprintf("%d-%x", os.Getpid(), rnd[8:]), Rank: rank, Size: size}
	r, err := publishIPCRing(buf, cfg, binary.LittleEndian.Uint64(rnd[:8]))
	if err != nil {
		return nil, err
	}
	s := &sameHostRing{buf: buf, r: r, uuid: buf.ds.dev.Properties().UUID}
	buf.mu.Lock()
	buf.rings = append(buf.rings, s)
	buf.mu.Unlock()
	return s, nil
}

// sameHostRing is one buffer's IPCRing for a Communicator.
type sameHostRing struct {
	buf *Buffer

	mu     sync.Mutex
	r      *IPCRing
	uuid   string
	closed bool

	// one device: rank 0 does the work (see above)
	single  bool
	files   []*shared   // rank 0: every rank's file (nil at 0); others: [rank 0's]
	peerMem []*cuda.Mem // rank 0: every rank's buffer (nil at 0)
}

// Offer is the token (8 bytes), the GPU's UUID (a length byte, then the
// bytes) and this rank's file path.
func (s *sameHostRing) Offer() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.r == nil || len(s.uuid) > 255 {
		return nil
	}
	o := binary.LittleEndian.AppendUint64(nil, s.r.token)
	o = append(o, byte(len(s.uuid)))
	o = append(o, s.uuid...)
	return append(o, s.r.path(s.r.cfg.Rank)...)
}

// sameHostOffer is a parsed Offer.
type sameHostOffer struct {
	token      uint64
	uuid, path string
}

func parseOffer(o []byte) (sameHostOffer, error) {
	if len(o) < 9 || len(o) < 9+int(o[8])+1 {
		return sameHostOffer{}, fmt.Errorf("%w: a same-host offer of %d bytes", collective.ErrBadArgument, len(o))
	}
	l := int(o[8])
	return sameHostOffer{token: binary.LittleEndian.Uint64(o), uuid: string(o[9 : 9+l]), path: string(o[9+l:])}, nil
}

// Join opens the neighbours' files, memory and events.
func (s *sameHostRing) Join(offers [][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrRingClosed
	}
	r := s.r
	if len(offers) != r.n {
		return fmt.Errorf("%w: %d offers for a ring of %d", collective.ErrBadArgument, len(offers), r.n)
	}
	r.peerPath, r.peerToken = map[int]string{}, map[int]uint64{}
	single := s.uuid != ""
	for p, o := range offers {
		po, err := parseOffer(o)
		if err != nil {
			return fmt.Errorf("rank %d: %w", p, err)
		}
		r.peerToken[p], r.peerPath[p] = po.token, po.path
		single = single && po.uuid == s.uuid
	}
	if !single || s.buf.be.opts.ringOnOneDevice {
		return r.connect(context.Background(), false)
	}
	return s.joinSingle()
}

// openPeerFile maps rank p's shared file, checking it is complete, holds
// the token of p's offer and describes a buffer of our size.
func (s *sameHostRing) openPeerFile(p int) (*shared, error) {
	r := s.r
	f, err := mapShared(r.path(p), r.fileSize(), false)
	if err != nil {
		return nil, fmt.Errorf("ipc ring: rank %d's file %s: %w", p, r.path(p), err)
	}
	bytes := uint64(r.buf.n * r.buf.dt.Size())
	switch {
	case atomic.LoadUint64(f.u64(offMagic)) != ipcMagic:
		err = fmt.Errorf("ipc ring: rank %d's file %s is not complete", p, r.path(p))
	case binary.LittleEndian.Uint64(f.m[offToken:]) != r.peerToken[p]:
		err = fmt.Errorf("ipc ring: %s is not rank %d's file (another host or /dev/shm)", r.path(p), p)
	case binary.LittleEndian.Uint64(f.m[offBytes:]) != bytes:
		err = fmt.Errorf("%w: ipc ring: rank %d has %d bytes, rank %d has %d", collective.ErrMismatch, p, binary.LittleEndian.Uint64(f.m[offBytes:]), r.cfg.Rank, bytes)
	}
	if err != nil {
		f.close(false)
		return nil, err
	}
	return f, nil
}

// joinSingle: rank 0 maps every rank's file and buffer, the others rank
// 0's file.
func (s *sameHostRing) joinSingle() error {
	r := s.r
	s.single = true
	if r.cfg.Rank != 0 {
		f, err := s.openPeerFile(0)
		if err != nil {
			return err
		}
		s.files = []*shared{f}
		return nil
	}
	s.files = make([]*shared, r.n)
	s.peerMem = make([]*cuda.Mem, r.n)
	for p := 1; p < r.n; p++ {
		f, err := s.openPeerFile(p)
		if err != nil {
			return err
		}
		s.files[p] = f
		var h cuda.IPCHandle
		copy(h[:], f.m[offMem:])
		if s.peerMem[p], err = r.buf.ds.dev.OpenIPC(h, int64(r.buf.n*r.buf.dt.Size())); err != nil {
			return err
		}
	}
	return nil
}

// allReduceSingle is AllReduce on one device (see above). Rank 0's file
// counts completed operations at offCompleted; every rank's counts inputs
// ready at offEnqueued.
func (s *sameHostRing) allReduceSingle(ctx context.Context, op collective.Op) error {
	r, buf := s.r, s.buf
	cop, err := Op(op)
	if err != nil {
		return err
	}
	if err := buf.Sync(); err != nil {
		return err
	}
	r.seq++
	k := r.seq
	if r.cfg.Rank != 0 {
		atomic.StoreUint64(r.self.u64(offEnqueued), k)
		return r.await(ctx, s.files[0].u64(offCompleted), k, "rank 0 to reduce on the shared GPU")
	}
	for p := 1; p < r.n; p++ {
		if err := r.await(ctx, s.files[p].u64(offEnqueued), k, fmt.Sprintf("rank %d's input", p)); err != nil {
			return err
		}
	}
	err = func() error {
		defer buf.wrSeq.Add(1) // later staged reads wait for this work
		st, cnt, bytes := buf.wr, int64(buf.n), int64(buf.n*buf.dt.Size())
		if cnt == 0 {
			return nil
		}
		for p := 1; p < r.n; p++ {
			if err := st.Reduce(cop, buf.cdt, buf.at(0), s.peerMem[p].Ptr(), cnt); err != nil {
				return err
			}
		}
		if op == collective.OpAvg {
			if err := st.Div(buf.cdt, buf.at(0), cnt, float64(r.n)); err != nil {
				return err
			}
		}
		for p := 1; p < r.n; p++ {
			if err := st.CopyDtoD(s.peerMem[p].Ptr(), buf.at(0), bytes); err != nil {
				return err
			}
		}
		return nil
	}()
	if err == nil {
		err = buf.Sync()
	}
	if err != nil {
		return err
	}
	atomic.StoreUint64(r.self.u64(offCompleted), k)
	return nil
}

// closeSingle: rank 0 unmaps every buffer and says so; the others wait
// (bounded) for that before their buffers may be freed.
func (s *sameHostRing) closeSingle() error {
	r := s.r
	var errs []error
	for _, m := range s.peerMem {
		if m != nil {
			errs = append(errs, m.Free())
		}
	}
	s.peerMem = nil
	if r.self != nil {
		atomic.StoreUint64(r.self.u64(offClosed), 1)
	}
	if r.cfg.Rank != 0 && len(s.files) == 1 {
		errs = append(errs, r.await(context.Background(), s.files[0].u64(offClosed), 1, "rank 0 to unmap our memory"))
	}
	for _, f := range s.files {
		if f != nil {
			errs = append(errs, f.close(false))
		}
	}
	s.files = nil
	return errors.Join(errs...)
}

// AllReduce runs the IPCRing.
func (s *sameHostRing) AllReduce(ctx context.Context, op collective.Op) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrRingClosed
	}
	var err error
	if s.single {
		err = s.allReduceSingle(ctx, op)
	} else {
		err = s.r.AllReduce(ctx, op)
	}
	if err != nil {
		return err
	}
	s.buf.stats.ipcOps.Add(1)
	return nil
}

// Closed reports whether Close ran (the Communicator then forgets the ring).
func (s *sameHostRing) Closed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Close releases the ring (safe to call twice; the buffer's Free calls it
// for rings still open).
func (s *sameHostRing) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	var err error
	if s.single {
		err = s.closeSingle()
	}
	err = errors.Join(err, s.r.Close())
	s.buf.mu.Lock()
	for i, x := range s.buf.rings {
		if x == s {
			s.buf.rings = append(s.buf.rings[:i], s.buf.rings[i+1:]...)
			break
		}
	}
	s.buf.mu.Unlock()
	return err
}

// closeRings closes the buffer's same-host rings (before its memory is
// freed: a neighbour may map it).
func (buf *Buffer) closeRings() error {
	buf.mu.Lock()
	rings := append([]*sameHostRing(nil), buf.rings...)
	buf.mu.Unlock()
	var errs []error
	for _, s := range rings {
		errs = append(errs, s.Close())
	}
	return errors.Join(errs...)
}
