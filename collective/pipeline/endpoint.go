package pipeline

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrTimeout is returned when a peer sends nothing for longer than the
// configured receive timeout.
var ErrTimeout = errors.New("pipeline peer timed out")

// endpoint puts asynchronous, bounded send and receive queues over a Link:
// a sender goroutine drains the send queue into the link, a receiver
// goroutine reads ahead from the link into the receive queue. At most
// inFlight messages wait in each queue; beyond that Post blocks
// (back-pressure) and the receiver stops reading, so the link's own flow
// control holds the peer back.
type endpoint struct {
	name    string
	link    Link
	sendQ   chan sendItem
	recvQ   chan *Message
	timeout time.Duration
	// expect filters what the receiver accepts: job and generation.
	jobID      string
	generation uint64

	// The two directions fail separately: a peer that finished and closed
	// its end ends our receive side, but must not fail a flush of what we
	// already sent.
	sendFail, recvFail failure
	// stage is shared by the stage's endpoints: a failed send on one link
	// stops waits on the other too (the schedule cannot go on).
	stage   *failure
	done    chan struct{} // closed by close()
	wg      sync.WaitGroup
	closeMu sync.Once

	// sentBytes counts payload bytes handed to the link (for reports).
	mu        sync.Mutex
	sentBytes int64
	recvBytes int64
}

type failure struct {
	once sync.Once
	ch   chan struct{}
	err  error
}

func (f *failure) set(err error) {
	f.once.Do(func() {
		f.err = err
		close(f.ch)
	})
}

type sendItem struct {
	m     *Message
	flush chan struct{}
}

func newEndpoint(name string, link Link, inFlight int, timeout time.Duration, jobID string, gen uint64) *endpoint {
	return newStageEndpoint(name, link, inFlight, timeout, jobID, gen, newFailure())
}

func newFailure() *failure { return &failure{ch: make(chan struct{})} }

func newStageEndpoint(name string, link Link, inFlight int, timeout time.Duration, jobID string, gen uint64, stage *failure) *endpoint {
	e := &endpoint{
		stage:      stage,
		name:       name,
		link:       link,
		sendQ:      make(chan sendItem, inFlight),
		recvQ:      make(chan *Message, inFlight),
		timeout:    timeout,
		jobID:      jobID,
		generation: gen,
		sendFail:   failure{ch: make(chan struct{})},
		recvFail:   failure{ch: make(chan struct{})},
		done:       make(chan struct{}),
	}
	e.wg.Add(2)
	go e.sender()
	go e.receiver()
	return e
}

func (e *endpoint) sender() {
	defer e.wg.Done()
	for {
		select {
		case it := <-e.sendQ:
			if it.flush != nil {
				close(it.flush)
				continue
			}
			// a device-staged message: wait here, off the stage's goroutine
			sentDue, err := it.m.detach(e.link)
			if err == nil {
				err = e.link.Send(it.m)
			}
			if sentDue {
				it.m.finishSend()
			}
			if err != nil {
				err = fmt.Errorf("send %v to %s: %w", it.m.Tag, e.name, err)
				e.sendFail.set(err)
				e.stage.set(err)
				return
			}
			e.mu.Lock()
			e.sentBytes += int64(len(it.m.Data) * 4)
			e.mu.Unlock()
		case <-e.done:
			return
		}
	}
}

func (e *endpoint) receiver() {
	defer e.wg.Done()
	for {
		m, err := e.link.Recv()
		if err != nil {
			e.recvFail.set(fmt.Errorf("receive from %s: %w", e.name, err))
			return
		}
		if m.Tag.JobID != e.jobID || m.Tag.Generation != e.generation {
			e.recvFail.set(fmt.Errorf("%w: %s sent %v, this stage runs job %q generation %d", ErrProtocol, e.name, m.Tag, e.jobID, e.generation))
			return
		}
		if err := m.Validate(); err != nil {
			e.recvFail.set(err)
			return
		}
		e.mu.Lock()
		e.recvBytes += int64(len(m.Data) * 4)
		e.mu.Unlock()
		select {
		case e.recvQ <- m:
		case <-e.done:
			return
		}
	}
}

// Post queues m for sending; it blocks while inFlight messages wait.
// The caller must not change m.Data afterwards.
func (e *endpoint) Post(ctx context.Context, m *Message) error {
	select {
	case <-e.sendFail.ch:
		return e.sendFail.err
	default:
	}
	select {
	case e.sendQ <- sendItem{m: m}:
		return nil
	case <-e.sendFail.ch:
		return e.sendFail.err
	case <-e.stage.ch:
		return e.stage.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Flush waits until every posted message was handed to the link.
func (e *endpoint) Flush(ctx context.Context) error {
	ch := make(chan struct{})
	select {
	case e.sendQ <- sendItem{flush: ch}:
	case <-e.sendFail.ch:
		return e.sendFail.err
	case <-ctx.Done():
		return ctx.Err()
	}
	select {
	case <-ch:
		return nil
	case <-e.sendFail.ch:
		return e.sendFail.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Expect returns the next received message, which must carry tag.
func (e *endpoint) Expect(ctx context.Context, tag Tag) (*Message, error) {
	var m *Message
	select {
	case m = <-e.recvQ:
	default:
		var timeout <-chan time.Time
		if e.timeout > 0 {
			t := time.NewTimer(e.timeout)
			defer t.Stop()
			timeout = t.C
		}
		select {
		case m = <-e.recvQ:
		case <-e.recvFail.ch:
			// Messages that arrived before the failure still count.
			select {
			case m = <-e.recvQ:
			default:
				return nil, e.recvFail.err
			}
		case <-e.stage.ch:
			return nil, e.stage.err
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-timeout:
			return nil, fmt.Errorf("%w: waited %v for %v from %s", ErrTimeout, e.timeout, tag, e.name)
		}
	}
	if m.Tag != tag {
		err := fmt.Errorf("%w: expected %v from %s, got %v", ErrProtocol, tag, e.name, m.Tag)
		e.recvFail.set(err)
		return nil, err
	}
	return m, nil
}

// sendFinish sends the finish message after everything posted before. With
// awaitFinish it keeps either side from closing the link while the other
// still reads from it: the peer's finish comes after all its transfers, so
// once it is here (or the peer closed its end after receiving ours) all
// data is through.
func (e *endpoint) sendFinish(ctx context.Context) error {
	if err := e.Post(ctx, &Message{Tag: Tag{JobID: e.jobID, Generation: e.generation, Dir: DirFinish}}); err != nil {
		return err
	}
	return e.Flush(ctx)
}

// awaitFinish waits up to timeout for the peer's finish and reports
// whether it came. Not getting it is harmless for the data: the peer sends
// its finish only after receiving all of ours, and a link may lose the
// last frame a closing peer sent (so this wait is bounded).
func (e *endpoint) awaitFinish(ctx context.Context, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := e.Expect(ctx, Tag{JobID: e.jobID, Generation: e.generation, Dir: DirFinish})
	return err == nil
}

// close closes the link and waits for the goroutines. Safe to call twice.
func (e *endpoint) close() {
	e.closeMu.Do(func() {
		close(e.done)
		e.link.Close()
	})
	e.wg.Wait()
}

func (e *endpoint) bytes() (sent, recv int64) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sentBytes, e.recvBytes
}
