//go:build cuda

package cudabuf

import (
	"runtime"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/cuda"
)

// poller waits for events on behalf of many goroutines: one goroutine per
// Backend queries every pending event in turn and wakes its waiter through a
// channel, so that sixteen channels waiting on staging copies make one stream
// of cuEventQuery calls instead of sixteen threads spinning in (or polling)
// the driver while the transport needs the cores and the driver's locks.
type poller struct {
	mu      sync.Mutex
	pending []*pollReq
	kick    chan struct{}
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
}

// pollReq is one wait; fresh for every wait, so that its identity in
// pending is unique. fin is the poller's own mark.
type pollReq struct {
	ev  *cuda.Event
	res chan error
	fin bool
}

func newPoller() *poller {
	p := &poller{kick: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	go p.run()
	return p
}

// wait blocks until ev's work is done and returns the query's error.
func (p *poller) wait(ev *cuda.Event) error {
	if done, err := ev.Done(); done || err != nil {
		return err
	}
	r := &pollReq{ev: ev, res: make(chan error, 1)}
	p.mu.Lock()
	p.pending = append(p.pending, r)
	p.mu.Unlock()
	select {
	case p.kick <- struct{}{}:
	default:
	}
	select {
	case err := <-r.res:
		return err
	case <-p.done:
		return cuda.ErrClosed
	}
}

func (p *poller) run() {
	defer close(p.done)
	var idleSince time.Time
	var batch []*pollReq
	for {
		p.mu.Lock()
		batch = append(batch[:0], p.pending...)
		p.mu.Unlock()
		if len(batch) == 0 {
			idleSince = time.Time{}
			select {
			case <-p.kick:
				continue
			case <-p.stop:
				return
			}
		}
		finished := false
		for _, r := range batch {
			done, err := r.ev.Done()
			if !done && err == nil {
				continue
			}
			finished, r.fin = true, true
			r.res <- err
		}
		if finished {
			p.mu.Lock()
			keep := p.pending[:0]
			for _, r := range p.pending {
				if !r.fin {
					keep = append(keep, r)
				}
			}
			clear(p.pending[len(keep):])
			p.pending = keep
			p.mu.Unlock()
			idleSince = time.Time{}
			continue
		}
		// nothing finished: yield, and after 2 ms without progress sleep
		// between passes (a stalled stream must not burn a core forever)
		if idleSince.IsZero() {
			idleSince = time.Now()
		} else if time.Since(idleSince) > 2*time.Millisecond {
			select {
			case <-time.After(20 * time.Microsecond):
			case <-p.stop:
				return
			}
			continue
		}
		select {
		case <-p.stop:
			return
		default:
		}
		runtime.Gosched()
	}
}

// close stops the poller; waiters still blocked get cuda.ErrClosed.
func (p *poller) close() {
	p.once.Do(func() { close(p.stop) })
	<-p.done
}
