package localapi

import (
	"sync"
	"sync/atomic"
)

// Issue order. A connection's operations run on worker goroutines: one queue
// for the collectives, one per peer and direction for sends and receives, so
// that a rank's send to its next peer and receive from its previous one run
// at once (batch_isend_irecv, pipeline-parallel exchanges). The queues alone
// would let a collective and a send or receive of the same group start in
// either order, and each rank's agent would pick its own: a peer's receive
// then reads the collective's frames, or a send waits for a receiver that
// is inside a collective. So every operation also waits, before it runs,
// for those it must follow in the order the client issued them (NCCL's rule
// within a communicator):
//
//   - a collective starts after every operation accepted before it
//     (collective, send or receive) has finished;
//   - a send or receive starts after the collectives accepted before it
//     have finished;
//   - consecutive sends and receives (no collective between them) run at
//     once, in order per peer and direction (their queue).
//
// Finished means answered, successfully or not: an operation after one
// that failed runs, and fails at once when the failure left the group
// unusable (collective.Communicator's rule), so waiting adds no hang; a
// dead peer fails every operation within the collective timeout as before.
// Waits end when the connection does.

// issueOrder is the connection's record of what the next operation must
// wait for. Owned by the read loop (accept order is issue order).
type issueOrder struct {
	// coll is the last collective accepted; nil: none is unfinished.
	coll *doneSignal
	// p2p: per send or receive queue, the last operation accepted since
	// that collective (earlier ones of the queue finish before it).
	p2p map[queueKey]*doneSignal
}

// admit records an operation of queue k, whose signal fires when it has
// finished, and returns what it must wait for before it runs.
func (o *issueOrder) admit(k queueKey, d *doneSignal) []<-chan struct{} {
	var after []<-chan struct{}
	if k.dir == 0 {
		for _, p := range o.p2p {
			if c := p.wait(); c != nil {
				after = append(after, c)
			}
		}
		clear(o.p2p)
		o.coll = d
		return after
	}
	if o.coll != nil {
		if c := o.coll.wait(); c != nil {
			after = append(after, c)
		} else {
			o.coll = nil
		}
	}
	if o.p2p == nil {
		o.p2p = map[queueKey]*doneSignal{}
	}
	o.p2p[k] = d
	return after
}

// doneSignal tells an operation's waiters that it has finished. Its channel
// is made only when something waits: a stream of collectives alone, DDP's,
// allocates nothing for its order.
type doneSignal struct {
	mu       sync.Mutex
	ch       chan struct{}
	finished bool
}

// wait returns a channel that is closed when the operation has finished,
// or nil if it has.
func (d *doneSignal) wait() <-chan struct{} {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.finished {
		return nil
	}
	if d.ch == nil {
		d.ch = make(chan struct{})
	}
	return d.ch
}

// fire marks the operation finished (once).
func (d *doneSignal) fire() {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !d.finished {
		d.finished = true
		if d.ch != nil {
			close(d.ch)
		}
	}
}

// awaitTurn waits until the operations w must follow have finished, or the
// connection ends.
func (cn *conn) awaitTurn(w *work) {
	if len(w.after) > 0 {
		if h := testOrderHooks.Load(); h != nil && h.waiting != nil {
			h.waiting(w)
		}
	}
	for _, d := range w.after {
		select {
		case <-d:
		case <-cn.ctx.Done():
			return
		}
	}
	w.after = nil
	if h := testOrderHooks.Load(); h != nil && h.exec != nil {
		h.exec(w)
	}
}

// finished marks w as finished: the operations waiting for it may start.
func (cn *conn) finished(w *work) {
	w.done.fire()
	if h := testOrderHooks.Load(); h != nil && h.done != nil {
		h.done(w)
	}
}

// orderHooks let tests force an interleaving of a connection's workers.
type orderHooks struct {
	waiting func(w *work) // w is about to wait for earlier operations
	exec    func(w *work) // w's turn came; it runs when the hook returns
	done    func(w *work) // w has finished (answered)
}

// testOrderHooks is nil outside tests.
var testOrderHooks atomic.Pointer[orderHooks]
