package consensus

import (
	"sync"
	"time"

	"github.com/hashicorp/raft"
)

// replTracker is the leader's view of which Raft followers are behind: a
// follower whose replication appends failed, or that was just added, is
// behind until it accepts a replication append again (heartbeats alone do
// not count either way: a CPU-starved follower may miss some and still
// be replicated). Raft backs off
// replication to a failed follower exponentially (10 ms doubling up to
// 10.24 s, hashicorp/raft's failureWait and maxFailureScale, which are not
// settings), so a server that rejoins after a few seconds away could get no
// log entries for up to 10 s although its heartbeats already succeed; the
// scheduler places nothing on it meanwhile, since its runner reads its own
// replica and would start its ranks that much later.
//
// The tracker also keeps that backoff short (see trackedTransport): once a
// replication append to a follower fails, the next one waits until a
// heartbeat reaches the follower again (raft keeps heartbeating a failed
// follower at least every HeartbeatTimeout/2), for at most replicationHold.
// Raft's failure count then grows by one per hold instead of once per
// backoff step, and a follower that comes back is replicated to as soon as
// a heartbeat gets through.
type replTracker struct {
	mu      sync.Mutex
	behind  map[raft.ServerID]bool
	version uint64
	// unreach holds, per follower whose last replication append failed, a
	// channel closed when it is reached again.
	unreach map[raft.ServerID]chan struct{}
	// caughtUp is called, without the lock, when a follower stops being
	// behind (capacity for the scheduler).
	caughtUp func()
}

func newReplTracker(caughtUp func()) *replTracker {
	return &replTracker{behind: map[raft.ServerID]bool{}, unreach: map[raft.ServerID]chan struct{}{}, caughtUp: caughtUp}
}

// replicationHold bounds how long a replication append to an unreachable
// follower waits for a heartbeat to reach it first.
const replicationHold = 10 * time.Second

func (t *replTracker) unreachable(id raft.ServerID) {
	t.mu.Lock()
	if t.unreach[id] == nil {
		t.unreach[id] = make(chan struct{})
	}
	t.mu.Unlock()
}

func (t *replTracker) reachable(id raft.ServerID) {
	t.mu.Lock()
	if ch := t.unreach[id]; ch != nil {
		close(ch)
		delete(t.unreach, id)
	}
	t.mu.Unlock()
}

// waitReachable returns once id is reachable, hold has passed or stop is
// closed.
func (t *replTracker) waitReachable(id raft.ServerID, hold time.Duration, stop <-chan struct{}) {
	t.mu.Lock()
	ch := t.unreach[id]
	t.mu.Unlock()
	if ch == nil {
		return
	}
	tm := time.NewTimer(hold)
	defer tm.Stop()
	select {
	case <-ch:
	case <-tm.C:
	case <-stop:
	}
}

// fall marks a follower behind.
func (t *replTracker) fall(id raft.ServerID) {
	t.mu.Lock()
	if !t.behind[id] {
		t.behind[id] = true
		t.version++
	}
	t.mu.Unlock()
}

// ok records an append the follower accepted.
func (t *replTracker) ok(id raft.ServerID) {
	t.mu.Lock()
	was := t.behind[id]
	if was {
		delete(t.behind, id)
		t.version++
	}
	t.mu.Unlock()
	if was && t.caughtUp != nil {
		t.caughtUp()
	}
}

// forget drops a follower removed from the configuration.
func (t *replTracker) forget(id raft.ServerID) {
	t.reachable(id)
	t.mu.Lock()
	if t.behind[id] {
		delete(t.behind, id)
		t.version++
	}
	t.mu.Unlock()
}

// lagging returns the followers behind now (by node ID) and a version that
// moves whenever the set changes.
func (t *replTracker) lagging() (map[string]bool, uint64) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if len(t.behind) == 0 {
		return nil, t.version
	}
	out := make(map[string]bool, len(t.behind))
	for id := range t.behind {
		out[string(id)] = true
	}
	return out, t.version
}

// trackedTransport is the Raft network transport with the append results
// reported to a replTracker. Heartbeats (appends without a log position)
// are not replication and are not counted as catching up; they only tell
// that a follower is reachable again. A replication append to a follower
// whose last one failed first waits for that (see replTracker).
type trackedTransport struct {
	*raft.NetworkTransport
	t *replTracker
	// hold bounds the wait for an unreachable follower; stop ends it (the
	// server shuts down).
	hold time.Duration
	stop <-chan struct{}
}

func isHeartbeat(req *raft.AppendEntriesRequest) bool {
	return req.PrevLogEntry == 0 && len(req.Entries) == 0 && req.LeaderCommitIndex == 0
}

func (tt *trackedTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, req *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	if isHeartbeat(req) {
		err := tt.NetworkTransport.AppendEntries(id, target, req, resp)
		if err == nil {
			tt.t.reachable(id)
		}
		return err
	}
	tt.t.waitReachable(id, tt.hold, tt.stop)
	err := tt.NetworkTransport.AppendEntries(id, target, req, resp)
	if err != nil {
		tt.t.fall(id)
		tt.t.unreachable(id)
		return err
	}
	tt.t.reachable(id)
	if resp.Success {
		tt.t.ok(id)
	}
	return nil
}

func (tt *trackedTransport) AppendEntriesPipeline(id raft.ServerID, target raft.ServerAddress) (raft.AppendPipeline, error) {
	p, err := tt.NetworkTransport.AppendEntriesPipeline(id, target)
	if err != nil {
		return nil, err
	}
	tp := &trackedPipeline{AppendPipeline: p, id: id, t: tt.t, out: make(chan raft.AppendFuture, 128), done: make(chan struct{})}
	go tp.forward()
	return tp, nil
}

// trackedPipeline reports the responses of a pipeline as they are consumed.
type trackedPipeline struct {
	raft.AppendPipeline
	id        raft.ServerID
	t         *replTracker
	out       chan raft.AppendFuture
	done      chan struct{}
	closeOnce sync.Once
}

func (p *trackedPipeline) forward() {
	in := p.AppendPipeline.Consumer()
	for {
		select {
		case f := <-in:
			if f.Error() == nil && f.Response().Success {
				p.t.ok(p.id)
			}
			select {
			case p.out <- f:
			case <-p.done:
				return
			}
		case <-p.done:
			return
		}
	}
}

func (p *trackedPipeline) Consumer() <-chan raft.AppendFuture { return p.out }

func (p *trackedPipeline) Close() error {
	err := p.AppendPipeline.Close()
	p.closeOnce.Do(func() { close(p.done) })
	return err
}
