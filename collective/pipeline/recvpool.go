package pipeline

import (
	"errors"
	"sync"
	"unsafe"
)

// recvPool is a device's host memory for received messages (pinnedRecv):
// a stage's links read each message into a buffer from get, the stage's
// Upload of it may return before the device has read it (markUploaded),
// and put (Message.Release) gives it back. A buffer is handed out again
// only once the device is done reading it, so a link never overwrites
// memory an upload still reads. Safe for concurrent use: the links'
// receivers get, the stage's goroutine marks and puts.
type recvPool struct {
	// alloc makes host memory of n > 0 values (pinned, for a GPU).
	alloc func(n int) ([]float32, error)
	free  freeList[int, *recvBuf]

	mu   sync.Mutex
	bufs map[uintptr]*recvBuf // every buffer made, by its first value's address
}

// recvBuf is one buffer of a recvPool; pending, when set, waits for the
// uploads that read it (guarded by the pool's mu).
type recvBuf struct {
	data    []float32
	pending func() error
}

var _ recvBuffers = (*recvPool)(nil)

func newRecvPool(alloc func(n int) ([]float32, error)) *recvPool {
	return &recvPool{alloc: alloc, bufs: map[uintptr]*recvBuf{}}
}

func addrOf(b []float32) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// get implements recvBuffers: a buffer of n values whose uploads are done.
// When none can be had (allocation or the wait failed) it returns ordinary
// memory, which uploads read synchronously.
func (p *recvPool) get(n int) []float32 {
	if n <= 0 {
		return []float32{}
	}
	rb, ok := p.free.pop(n)
	if ok {
		p.mu.Lock()
		wait := rb.pending
		rb.pending = nil
		p.mu.Unlock()
		if wait != nil {
			if err := wait(); err != nil {
				// the device failed: leave the buffer out (freed at
				// close); the stage fails on its own device calls
				return make([]float32, n)
			}
		}
		return rb.data
	}
	data, err := p.alloc(n)
	if err != nil || len(data) != n {
		return make([]float32, n)
	}
	p.mu.Lock()
	p.bufs[addrOf(data)] = &recvBuf{data: data}
	p.mu.Unlock()
	return data
}

// put implements recvBuffers: b goes back to the pool if it is one of its
// buffers (whole), else it is dropped.
func (p *recvPool) put(b []float32) {
	if len(b) == 0 {
		return
	}
	p.mu.Lock()
	rb := p.bufs[addrOf(b)]
	p.mu.Unlock()
	if rb != nil && len(rb.data) == len(b) {
		p.free.put(len(b), rb)
	}
}

// owns reports whether src is the whole of one of the pool's buffers.
func (p *recvPool) owns(src []float32) bool {
	if len(src) == 0 {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	rb := p.bufs[addrOf(src)]
	return rb != nil && len(rb.data) == len(src)
}

// markUploaded records that an upload reading src (one of the pool's
// buffers, see owns) was queued; wait blocks until it is done and is called
// once, before the buffer is handed out again (or at close).
func (p *recvPool) markUploaded(src []float32, wait func() error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	rb := p.bufs[addrOf(src)]
	if rb == nil {
		return
	}
	if prev := rb.pending; prev != nil {
		rb.pending = func() error { return errors.Join(prev(), wait()) }
		return
	}
	rb.pending = wait
}

// close waits for every pending upload and returns every buffer made, for
// the caller to free; the pool is empty afterwards. No link may hold a
// buffer any more.
func (p *recvPool) close() ([][]float32, error) {
	p.free.drain()
	p.mu.Lock()
	defer p.mu.Unlock()
	var out [][]float32
	var errs []error
	for k, rb := range p.bufs {
		if rb.pending != nil {
			errs = append(errs, rb.pending())
			rb.pending = nil
		}
		out = append(out, rb.data)
		delete(p.bufs, k)
	}
	return out, errors.Join(errs...)
}
