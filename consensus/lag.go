package consensus

import (
	"sync"

	"github.com/hashicorp/raft"
)

// replTracker is the leader's view of which Raft followers are behind: a
// follower whose replication appends failed, or that was just added, is
// behind until it accepts a replication append again (heartbeats alone do
// not count either way: a CPU-starved follower may miss some and still
// be replicated). Raft backs off
// replication to a failed follower exponentially (10 ms doubling up to
// 10.24 s, hashicorp/raft's failureWait and maxFailureScale, which are not
// settings), so a server that rejoins after a few seconds away may get no
// log entries for up to 10 s although its heartbeats already succeed; the
// scheduler places nothing on it meanwhile, since its runner reads its own
// replica and would start its ranks that much later.
type replTracker struct {
	mu      sync.Mutex
	behind  map[raft.ServerID]bool
	version uint64
	// caughtUp is called, without the lock, when a follower stops being
	// behind (capacity for the scheduler).
	caughtUp func()
}

func newReplTracker(caughtUp func()) *replTracker {
	return &replTracker{behind: map[raft.ServerID]bool{}, caughtUp: caughtUp}
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
// are not replication and are not counted as catching up.
type trackedTransport struct {
	*raft.NetworkTransport
	t *replTracker
}

func isHeartbeat(req *raft.AppendEntriesRequest) bool {
	return req.PrevLogEntry == 0 && len(req.Entries) == 0 && req.LeaderCommitIndex == 0
}

func (tt *trackedTransport) AppendEntries(id raft.ServerID, target raft.ServerAddress, req *raft.AppendEntriesRequest, resp *raft.AppendEntriesResponse) error {
	err := tt.NetworkTransport.AppendEntries(id, target, req, resp)
	switch {
	case isHeartbeat(req):
	case err != nil:
		tt.t.fall(id)
	case resp.Success:
		tt.t.ok(id)
	}
	return err
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
