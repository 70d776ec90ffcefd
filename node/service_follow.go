package node

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// followServices keeps the router's table in step with the cluster state:
// from the local replica on servers that hold one, else from a server's
// watch stream of every allocation.
func (a *Agent) followServices() {
	backoff := 100 * time.Millisecond
	for a.ctx.Err() == nil {
		var err error
		if a.raft != nil && a.raft.HasState() {
			err = a.followLocal()
		} else {
			err = a.followRemote()
		}
		if a.ctx.Err() != nil {
			return
		}
		if err != nil {
			a.logger.Debug("service watch ended; retrying", "error", err, "backoff", backoff)
		}
		select {
		case <-a.ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

func (a *Agent) followLocal() error {
	for a.raft.HasState() {
		st := a.raft.State()
		idx := st.Index()
		ev := watchEvent(st, "")
		a.router.update(ev.Jobs, ev.Allocations)
		ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
		_, err := st.WaitIndex(ctx, idx)
		cancel()
		if a.ctx.Err() != nil {
			return a.ctx.Err()
		}
		if err != nil && ctx.Err() == nil {
			return err
		}
	}
	return nil
}

func (a *Agent) followRemote() error {
	addr := a.pickServer()
	if addr == "" {
		return ErrNoLeader
	}
	c, err := a.conns.client(addr)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(a.ctx)
	defer cancel()
	stream, err := c.Watch(ctx, &pb.WatchRequest{})
	if err != nil {
		return err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		a.router.update(ev.Jobs, ev.Allocations)
		if a.raft != nil && a.raft.HasState() {
			return nil // switch to the local replica
		}
	}
}

// handleServices answers this node's routing table: every service, its
// replicas, their health and this router's requests to them.
func (a *Agent) handleServices(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(map[string]any{"node": a.cfg.NodeName, "services": a.router.snapshot()})
}
