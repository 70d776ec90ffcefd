//go:build cuda

package cudabuf

import (
	"fmt"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// Received chunks straight into pinned memory (collective.RecvStager): on
// the TCP lanes the receiving rank reads a frame's payload into a staging
// slot this buffer hands out, then the slot goes to the device (a copy, and
// for a reduce a kernel) on the write stream; no host copy. Chunks larger
// than a pool slot get a sized slot (kept for reuse), so any chunk size
// works without allocating per chunk.

var _ collective.RecvStager = (*Buffer)(nil)

// errRecvToken is returned by CommitRecv for a token BeginRecv did not make.
var errRecvToken = fmt.Errorf("%w: receive token is not a staging slot of this backend", collective.ErrBadArgument)

// BeginRecv implements collective.RecvStager: a pinned slot (at least the
// chunk's size) to receive elements [off, off+n) into.
func (buf *Buffer) BeginRecv(off, n int) ([]byte, any, error) {
	if err := buf.check(off, n); err != nil {
		return nil, nil, err
	}
	bytes := n * buf.dt.Size()
	t0 := time.Now()
	slot, err := buf.be.slotFor(bytes)
	buf.stats.slotNs.add(t0)
	trace("begin", off, n, t0)
	if err != nil {
		return nil, nil, err
	}
	return slot.host[:bytes], slot, nil
}

// CommitRecv implements collective.RecvStager: the filled slot goes to
// elements [off, off+n) on the write stream (copied, or copied to scratch
// and reduced) and comes back to the pool when that is done.
func (buf *Buffer) CommitRecv(off, n int, token any, reduce bool, op collective.Op) error {
	slot, ok := token.(*stageSlot)
	if !ok || slot == nil {
		return errRecvToken
	}
	if err := buf.check(off, n); err != nil {
		buf.be.putSlot(slot)
		return err
	}
	if len(slot.host) < n*buf.dt.Size() || len(slot.scratch) != len(buf.be.devs) {
		buf.be.putSlot(slot)
		return errRecvToken
	}
	buf.stats.direct.Add(1)
	t0 := time.Now()
	defer buf.stats.stageNs.add(t0)
	defer trace("commit", off, n, t0)
	f := buf.writeStaged
	if reduce {
		var err error
		if f, err = buf.reduceStaged(op); err != nil {
			buf.be.putSlot(slot)
			return err
		}
	}
	return buf.enqueueStaged(slot, off, n, f)
}

// AbortRecv implements collective.RecvStager.
func (buf *Buffer) AbortRecv(token any) {
	if slot, ok := token.(*stageSlot); ok && slot != nil {
		buf.be.putSlot(slot)
	}
}
