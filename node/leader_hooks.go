package node

import (
	"context"
	"math"
	"sync"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/deploy"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// leaderHooks runs Agent.onLeader (the fleet autoscaler, ec2.go) while
// this agent leads.
type leaderHooks struct {
	mu     sync.Mutex
	cancel context.CancelFunc
	done   chan struct{}

	idleMu    sync.Mutex
	idleSince map[string]time.Time // node name → when it became idle

	scaleMu   sync.Mutex
	lastScale string
}

// checkLeader starts or stops the leader hooks after a change of role.
func (a *Agent) checkLeader() {
	if a.onLeader == nil {
		return
	}
	h := &a.hooks
	h.mu.Lock()
	defer h.mu.Unlock()
	leading := a.IsLeader()
	switch {
	case leading && h.cancel == nil:
		ctx, cancel := context.WithCancel(a.ctx)
		h.cancel, h.done = cancel, make(chan struct{})
		done := h.done
		go func() {
			defer close(done)
			a.onLeader(ctx)
		}()
	case !leading && h.cancel != nil:
		h.cancel()
		<-h.done
		h.cancel, h.done = nil, nil
	}
}

func (a *Agent) stopLeaderHooks() {
	h := &a.hooks
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.cancel != nil {
		h.cancel()
		<-h.done
		h.cancel, h.done = nil, nil
	}
}

// nodesForRanks is how many nodes like the largest of today (gpusPerNode
// GPUs, ranksPerNode ranks) take ranks ranks of a job with spec: a node
// takes gpusPerNode / gpus_per_rank ranks, times ranks_per_gpu when they
// share GPUs.
func nodesForRanks(spec *pb.JobSpec, ranks, gpusPerNode, ranksPerNode int) int {
	per := ranksPerNode
	if g := int(spec.GetGpusPerRank()); g > 0 && gpusPerNode > 0 {
		per = gpusPerNode / g * max(int(spec.GetRanksPerGpu()), 1)
	}
	if per < 1 {
		per = 1
	}
	return int(math.Ceil(float64(ranks) / float64(per)))
}

// Demand is what the fleet autoscaler needs to know, read from the
// replicated state by the leader: how many gang jobs wait for capacity, how
// many more nodes they need, and since when each live node (by name, which
// is the instance ID on EC2) has been idle (zero time: busy).
func (a *Agent) Demand() deploy.Demand {
	d := deploy.Demand{Members: map[string]time.Time{}}
	if a.raft == nil || !a.raft.HasState() {
		return d
	}
	st := a.raft.State()
	gpusPerNode, ranksPerNode := 0, 0
	busy := map[string]bool{}
	for _, n := range st.Nodes() {
		if len(n.Gpus) > gpusPerNode {
			gpusPerNode = len(n.Gpus)
		}
		if int(n.MaxRanks) > ranksPerNode {
			ranksPerNode = int(n.MaxRanks)
		}
	}
	nodesFor := func(j *pb.Job, ranks int) int { return nodesForRanks(j.Spec, ranks, gpusPerNode, ranksPerNode) }
	for _, j := range st.Jobs() {
		switch j.Status {
		case consensus.JobPending:
			d.WaitingJobs++
			ranks := int(j.Spec.GetRanks())
			if ranks == 0 {
				ranks = int(j.Spec.GetMinRanks())
			}
			d.NodesNeeded += nodesFor(j, ranks)
		case consensus.JobRunning:
			service := j.Spec.GetType() == jobspec.TypeService
			placed := map[int32]bool{}
			for _, al := range st.Allocations(j.Id) {
				// A service's replicas keep their generation while others
				// are replaced: every live one holds its node.
				if (al.Generation == j.Generation || service) && al.DesiredStatus == consensus.DesiredRun {
					busy[al.NodeId] = true
					placed[al.Rank] = true
				}
			}
			if service {
				// Replica slots no node could take (a service scaled out
				// beyond the cluster).
				missing := 0
				for r := int32(0); r < j.WorldSize; r++ {
					if !placed[r] {
						missing++
					}
				}
				if missing > 0 {
					d.WaitingJobs++
					d.NodesNeeded += nodesFor(j, missing)
				}
			}
		}
	}
	now := time.Now()
	h := &a.hooks
	h.idleMu.Lock()
	defer h.idleMu.Unlock()
	if h.idleSince == nil {
		h.idleSince = map[string]time.Time{}
	}
	seen := map[string]bool{}
	for _, n := range st.Nodes() {
		if n.Status != consensus.NodeReady {
			continue
		}
		seen[n.Name] = true
		if busy[n.Id] {
			delete(h.idleSince, n.Name)
			d.Members[n.Name] = time.Time{}
			continue
		}
		if _, ok := h.idleSince[n.Name]; !ok {
			h.idleSince[n.Name] = now
		}
		d.Members[n.Name] = h.idleSince[n.Name]
	}
	for name := range h.idleSince {
		if !seen[name] {
			delete(h.idleSince, name)
		}
	}
	return d
}

// RecordScale notes a fleet change for `gpumesh nodes`.
func (a *Agent) RecordScale(msg string) {
	a.hooks.scaleMu.Lock()
	a.hooks.lastScale = time.Now().UTC().Format(time.RFC3339) + " " + msg
	a.hooks.scaleMu.Unlock()
	a.logger.Info("fleet scaled", "change", msg)
}

func (a *Agent) lastScale() string {
	a.hooks.scaleMu.Lock()
	defer a.hooks.scaleMu.Unlock()
	return a.hooks.lastScale
}
