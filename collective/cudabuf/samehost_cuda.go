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

	"github.com/gpumesh/gpumesh/collective"
)

// The same-host ring of the Communicator (collective.SameHostReducer): an
// IPCRing whose rendezvous goes over the collective's own transport instead
// of waiting for files named after the group. This rank publishes its
// shared file (IPC handles of its memory and events, and a random token)
// under a unique name; its Offer is the token and the file's path; Join
// opens the neighbours' files from their offers, at once (no waiting: the
// files are complete before an offer is sent), checks their tokens (so a
// rank on another host or in another /dev/shm fails here), and opens their
// memory and events (which fails across hosts, in containers without the
// host's IPC namespace, or between GPUs that cannot reach each other).

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
	s := &sameHostRing{buf: buf, r: r}
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
	closed bool
}

// Offer is the token (8 bytes) and this rank's file path.
func (s *sameHostRing) Offer() []byte {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.r == nil {
		return nil
	}
	o := binary.LittleEndian.AppendUint64(nil, s.r.token)
	return append(o, s.r.path(s.r.cfg.Rank)...)
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
	for _, p := range []int{mod(r.cfg.Rank-1, r.n), mod(r.cfg.Rank+1, r.n)} {
		o := offers[p]
		if len(o) <= 8 {
			return fmt.Errorf("%w: rank %d's offer is %d bytes", collective.ErrBadArgument, p, len(o))
		}
		r.peerToken[p] = binary.LittleEndian.Uint64(o)
		r.peerPath[p] = string(o[8:])
	}
	return r.connect(context.Background(), false)
}

// AllReduce runs the IPCRing.
func (s *sameHostRing) AllReduce(ctx context.Context, op collective.Op) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrRingClosed
	}
	if err := s.r.AllReduce(ctx, op); err != nil {
		return err
	}
	s.buf.stats.ipcOps.Add(1)
	return nil
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
	err := s.r.Close()
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
