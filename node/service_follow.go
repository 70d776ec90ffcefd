package node

import (
	"context"
	"encoding/json"
	"net/http"
	"time"

	"github.com/hashicorp/go-hclog"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// followServices keeps the router's table in step with the cluster state:
// from the local replica on servers that hold one, else from a server's
// watch stream of the services' allocations.
func (a *Agent) followServices() {
	a.followState(a.ctx, a.logger, "service", a.followLocal, a.followRemote)
}

// followState runs one follower of the cluster state until ctx ends: local
// (this node's own Raft replica) while the node holds one, else remote (a
// server's watch stream); after either ends it retries, waiting 100 ms
// doubling to 2 s. The runner and the service router both follow this way.
func (a *Agent) followState(ctx context.Context, log hclog.Logger, what string, local, remote func() error) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		var err error
		if a.raft != nil && a.raft.HasState() {
			err = local()
		} else {
			err = remote()
		}
		if ctx.Err() != nil {
			return
		}
		if err != nil {
			log.Debug(what+" watch ended; retrying", "error", err, "backoff", backoff)
		}
		select {
		case <-ctx.Done():
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
		ev := servicesEvent(st)
		a.router.update(ev.Jobs, ev.Allocations, ev.Nodes...)
		ctx, cancel := context.WithTimeout(a.ctx, 2*time.Second)
		_, err := st.WaitServices(ctx, idx)
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
	stream, err := c.Watch(ctx, &pb.WatchRequest{Services: true})
	if err != nil {
		return err
	}
	for {
		ev, err := stream.Recv()
		if err != nil {
			return err
		}
		a.router.update(ev.Jobs, ev.Allocations, ev.Nodes...)
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
