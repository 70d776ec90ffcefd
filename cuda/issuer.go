package cuda

import (
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// Issuer runs functions one at a time, in the order they were submitted, on
// one goroutine locked to its OS thread: the issuing thread of a device
// (Device.NewIssuer), so that many goroutines with driver work for one
// device (the collectives' channels) hand it to a single thread instead of
// calling into the driver at once and queueing on its locks. Submitters
// wait for their function to have run, so a submission returns, as a direct
// call would, with the work enqueued and its error; work submitted in
// order by one goroutine runs in that order.
//
// Functions given to an Issuer must only enqueue (copies, kernel launches,
// event records and stream waits): a function that blocks, for example in
// an event or stream synchronisation, holds up every other submitter of the
// device. Safe for concurrent use.
type Issuer struct {
	cfg IssuerConfig

	mu     sync.Mutex
	queue  []*issueReq
	spare  []*issueReq
	closed bool
	queued atomic.Int32  // len(queue), read while spinning
	wake   chan struct{} // cap 1: work was queued
	done   chan struct{} // closed when the thread has ended
	ready  chan error    // the thread's setup result

	issued  atomic.Int64
	batches atomic.Int64
}

// IssuerConfig tunes an Issuer.
type IssuerConfig struct {
	// Spin is how long the issuing thread keeps looking for work after its
	// queue empties before it sleeps (a submission then wakes it, which
	// costs microseconds). Default 50 µs; 0 sleeps at once.
	Spin time.Duration
	// WaitSpin is how long a submitter polls for its function to have run
	// before it sleeps until woken. Default 20 µs; 0 sleeps at once.
	WaitSpin time.Duration
}

// DefaultIssuerConfig returns the defaults.
func DefaultIssuerConfig() IssuerConfig {
	return IssuerConfig{Spin: 50 * time.Microsecond, WaitSpin: 20 * time.Microsecond}
}

// Validate checks the config.
func (c IssuerConfig) Validate() error {
	if c.Spin < 0 || c.WaitSpin < 0 {
		return fmt.Errorf("%w: issuer: spin times must be >= 0, got %v and %v", ErrBadArgument, c.Spin, c.WaitSpin)
	}
	return nil
}

// issueReq is one submission. state: reqPending, then reqDone when the
// issuer ran fn and the submitter had not gone to sleep yet, or
// reqSleeping when the submitter sleeps on done (the issuer then sends).
type issueReq struct {
	fn    func() error
	err   error
	state atomic.Int32
	done  chan struct{} // cap 1
}

const (
	reqPending int32 = iota
	reqDone
	reqSleeping
)

var reqPool = sync.Pool{New: func() any { return &issueReq{done: make(chan struct{}, 1)} }}

// NewIssuer starts an issuing thread: setup (nil for none) runs first on
// the locked thread (for a device: make its context current); its error
// stops the thread and is returned.
func NewIssuer(cfg IssuerConfig, setup func() error) (*Issuer, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	q := &Issuer{cfg: cfg, wake: make(chan struct{}, 1), done: make(chan struct{}), ready: make(chan error, 1)}
	go q.run(setup)
	if err := <-q.ready; err != nil {
		<-q.done
		return nil, err
	}
	return q, nil
}

// Do runs fn on the issuing thread and returns its error once it has run;
// ErrClosed once the Issuer is closed.
func (q *Issuer) Do(fn func() error) error {
	r := reqPool.Get().(*issueReq)
	r.fn = fn
	r.state.Store(reqPending)
	q.mu.Lock()
	if q.closed {
		q.mu.Unlock()
		r.fn = nil
		reqPool.Put(r)
		return ErrClosed
	}
	q.queue = append(q.queue, r)
	q.queued.Store(int32(len(q.queue)))
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	if !q.spinFor(r) && r.state.CompareAndSwap(reqPending, reqSleeping) {
		<-r.done
	}
	err := r.err
	r.fn, r.err = nil, nil
	reqPool.Put(r)
	return err
}

// spinFor polls r for up to WaitSpin and reports whether it is done.
func (q *Issuer) spinFor(r *issueReq) bool {
	if q.cfg.WaitSpin <= 0 {
		return false
	}
	var start time.Time
	for i := 0; ; i++ {
		if r.state.Load() == reqDone {
			return true
		}
		if i&15 == 15 {
			if start.IsZero() {
				start = time.Now()
			} else if time.Since(start) > q.cfg.WaitSpin {
				return false
			}
		}
		runtime.Gosched()
	}
}

func (q *Issuer) run(setup func() error) {
	runtime.LockOSThread() // for good: the thread ends with the goroutine
	defer close(q.done)
	if setup != nil {
		if err := setup(); err != nil {
			q.mu.Lock()
			q.closed = true
			q.mu.Unlock()
			q.ready <- err
			return
		}
	}
	q.ready <- nil
	for {
		q.mu.Lock()
		batch := q.queue
		if len(batch) > 0 { // swap in the other slice (spare never aliases queue)
			q.queue, q.spare = q.spare[:0], nil
			q.queued.Store(0)
		}
		closed := q.closed
		q.mu.Unlock()
		if len(batch) > 0 {
			q.batches.Add(1)
			q.issued.Add(int64(len(batch)))
			for i, r := range batch {
				r.err = r.fn()
				if !r.state.CompareAndSwap(reqPending, reqDone) {
					r.done <- struct{}{} // the submitter sleeps
				}
				batch[i] = nil
			}
			q.mu.Lock()
			q.spare = batch[:0]
			q.mu.Unlock()
			continue
		}
		if closed {
			return
		}
		if q.idle() {
			<-q.wake
		}
	}
}

// idle spins for up to Spin while no work is queued and reports whether
// the thread should sleep (no work came).
func (q *Issuer) idle() bool {
	if q.cfg.Spin > 0 {
		start := time.Now()
		for i := 0; ; i++ {
			if q.queued.Load() > 0 {
				return false
			}
			if i&63 == 63 && time.Since(start) > q.cfg.Spin {
				break
			}
		}
	}
	return q.queued.Load() == 0
}

// IssuerStats counts an Issuer's work.
type IssuerStats struct {
	// Issued is the number of functions run, Batches the number of times
	// the thread took its queue (Issued/Batches submissions per wake-up).
	Issued, Batches int64
}

// Stats returns the counters.
func (q *Issuer) Stats() IssuerStats {
	return IssuerStats{Issued: q.issued.Load(), Batches: q.batches.Load()}
}

// Close runs what is queued, stops the thread and waits for it; later Do
// calls return ErrClosed. Idempotent.
func (q *Issuer) Close() {
	q.mu.Lock()
	q.closed = true
	q.mu.Unlock()
	select {
	case q.wake <- struct{}{}:
	default:
	}
	<-q.done
}
