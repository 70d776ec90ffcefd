package node

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc/status"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/cuda"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Limits of the dashboard feed, so that it stays cheap on large clusters.
const (
	dashMaxJobs     = 50 // most recent jobs shown (running and pending first)
	dashMaxGPUNodes = 64 // nodes whose GPUs are fetched
	dashGPUTimeout  = 800 * time.Millisecond
	dashCacheFor    = 900 * time.Millisecond
)

// dashView is what /v1/dashboard returns: the cluster as this node sees it.
type dashView struct {
	Node     string       `json:"node"`
	NodeID   string       `json:"node_id"`
	Role     string       `json:"role"`
	Leader   string       `json:"leader"`
	LeaderID string       `json:"leader_id"`
	Index    uint64       `json:"index"`
	Time     time.Time    `json:"time"`
	Version  string       `json:"version"`
	Members  []dashMember `json:"members"`
	Jobs     []dashJob    `json:"jobs"`
	GPUs     []dashGPUs   `json:"gpus"`
	Errors   []string     `json:"errors,omitempty"`
	// Banner is a warning for the top of the page (no leader), or empty.
	Banner string `json:"banner,omitempty"`
}

type dashMember struct {
	Name         string `json:"name"`
	ID           string `json:"id"`
	Addr         string `json:"addr"`
	HTTPAddr     string `json:"http_addr"`
	ServeAddr    string `json:"serve_addr,omitempty"` // the serve port (--serve); none when empty
	State        string `json:"state"`                // gossip: alive, suspect, dead, left
	Role         string `json:"role"`                 // leader, voter, standby, client; unknown
	Status       string `json:"status"`               // ready, draining; down (dead in gossip), left
	AZ           string `json:"az"`
	Lifecycle    string `json:"lifecycle"`
	InstanceType string `json:"instance_type"`
	GPUs         int    `json:"gpus"`
	Version      string `json:"version"`
}

type dashJob struct {
	ID         string     `json:"id"`
	Name       string     `json:"name"`
	Type       string     `json:"type"`
	Status     string     `json:"status"`
	Reason     string     `json:"reason,omitempty"`
	Generation uint64     `json:"generation"`
	WorldSize  int32      `json:"world_size"`
	Restarts   int32      `json:"restarts"`
	Submitted  time.Time  `json:"submitted"`
	Ranks      []dashRank `json:"ranks"`
}

type dashRank struct {
	Rank     int32   `json:"rank"`
	Node     string  `json:"node"`
	GPUs     []int32 `json:"gpus"`
	Status   string  `json:"status"`
	Desired  string  `json:"desired"`
	ExitCode int32   `json:"exit_code"`
	Message  string  `json:"message,omitempty"`
}

type dashGPUs struct {
	Node  string    `json:"node"`
	Error string    `json:"error,omitempty"`
	GPUs  []dashGPU `json:"gpus"`
}

type dashGPU struct {
	Index          int     `json:"index"`
	UUID           string  `json:"uuid"`
	Utilization    float64 `json:"utilization"`     // percent, -1 unknown
	MemUtilization float64 `json:"mem_utilization"` // percent, -1 unknown
	MemUsed        uint64  `json:"mem_used"`
	MemTotal       uint64  `json:"mem_total"`
	Temperature    float64 `json:"temperature"` // °C, -1 unknown
	Power          float64 `json:"power"`       // W, -1 unknown
	ECCCorrected   uint64  `json:"ecc_corrected"`
	ECCUncorrected uint64  `json:"ecc_uncorrected"`
}

// dashCache keeps the last view briefly: browsers poll every second.
type dashCache struct {
	mu   sync.Mutex
	at   time.Time
	body []byte
}

func (o *opsState) handleDashboard(w http.ResponseWriter, r *http.Request) {
	c := &o.dash
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.body == nil || time.Since(c.at) > dashCacheFor {
		ctx, cancel := context.WithTimeout(r.Context(), 3*time.Second)
		view := o.dashboard(ctx)
		cancel()
		b, err := json.Marshal(view)
		if err != nil {
			http.Error(w, err.Error(), http.StatusInternalServerError)
			return
		}
		c.body, c.at = b, time.Now()
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(c.body)
}

// handleGPUs serves this node's GPU sample (other nodes' dashboards fetch it).
func (o *opsState) handleGPUs(w http.ResponseWriter, r *http.Request) {
	out := dashGPUs{Node: o.a.cfg.NodeName, GPUs: []dashGPU{}}
	ms, err := o.sampleGPUs()
	if err != nil {
		out.Error = err.Error()
	}
	for _, m := range sortedGPUs(ms) {
		out.GPUs = append(out.GPUs, toDashGPU(m))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_ = json.NewEncoder(w).Encode(out)
}

// dashboard assembles the view: gossip locally; Raft roles, jobs and ranks
// from the local replica, or through the Control API where this node holds
// none; GPUs from every node's /v1/gpus.
func (o *opsState) dashboard(ctx context.Context) *dashView {
	a := o.a
	v := &dashView{Node: a.cfg.NodeName, NodeID: a.nodeID, Role: a.Role(), Time: time.Now().UTC(), Version: Version,
		Members: []dashMember{}, Jobs: []dashJob{}, GPUs: []dashGPUs{}}
	cs := &controlServer{a: a}

	roles := map[string]string{}
	peers, peersErr := cs.RaftPeers(ctx, &pb.RaftPeersRequest{})
	if peersErr == nil {
		for _, p := range peers.Peers {
			switch {
			case p.Leader:
				roles[p.Id] = "leader"
				v.LeaderID, v.Leader = p.Id, p.NodeName
			case p.Suffrage == "voter":
				roles[p.Id] = "voter"
			default:
				roles[p.Id] = "standby"
			}
		}
	}

	voters, votersUp := 0, 0
	for _, m := range a.mesh.Members() {
		dm := dashMember{Name: m.Name, Addr: m.Addr, State: m.State, Role: "client"}
		if n := m.Node; n != nil {
			dm.ID, dm.HTTPAddr, dm.Status, dm.AZ, dm.Lifecycle = n.Id, n.HttpAddr, n.Status, n.Az, n.Lifecycle
			dm.ServeAddr = n.ServeAddr
			dm.InstanceType, dm.GPUs, dm.Version = n.InstanceType, len(n.Gpus), n.Version
			if r, ok := roles[n.Id]; ok {
				dm.Role = r
			} else if peersErr != nil {
				// No leader to ask: the duty the member last gossiped.
				dm.Role = orDefault(m.role, "unknown")
			}
		}
		// A member's own record says "ready" until it is replaced; gossip
		// knows better (gpumesh members shows the same state).
		switch m.State {
		case "dead":
			dm.Status = "down"
		case "left":
			dm.Status = "left"
		}
		if dm.Role == "voter" || dm.Role == "leader" {
			voters++
			if m.State == "alive" {
				votersUp++
			}
		}
		v.Members = append(v.Members, dm)
	}
	if peersErr != nil {
		// The Raft configuration comes from the leader: no answer means no
		// leader this node can reach.
		v.Banner = fmt.Sprintf("No leader: %d of %d voters answer. Jobs cannot be placed or stopped until a majority of voters is back; "+
			"what follows is this node's last known view (roles as the members last gossiped them).", votersUp, voters)
	}
	sort.Slice(v.Members, func(i, k int) bool { return v.Members[i].Name < v.Members[k].Name })

	stale := &pb.QueryOptions{Stale: true}
	jobs, err := cs.ListJobs(ctx, &pb.ListJobsRequest{Query: stale})
	if err != nil {
		v.Errors = append(v.Errors, "jobs: "+status.Convert(err).Message())
	} else {
		v.Index = jobs.Index
		list := jobs.Jobs
		// Live jobs first, then the newest.
		sort.SliceStable(list, func(i, k int) bool {
			ti, tk := consensus.JobTerminal(list[i].Status), consensus.JobTerminal(list[k].Status)
			if ti != tk {
				return !ti
			}
			return list[i].CreateIndex > list[k].CreateIndex
		})
		if len(list) > dashMaxJobs {
			list = list[:dashMaxJobs]
		}
		for _, j := range list {
			dj := dashJob{ID: j.Id, Name: j.GetSpec().GetName(), Type: j.GetSpec().GetType(), Status: j.Status,
				Reason: j.StatusReason, Generation: j.Generation, WorldSize: j.WorldSize, Restarts: j.Restarts,
				Submitted: j.GetSubmitTime().AsTime(), Ranks: []dashRank{}}
			var allocs []*pb.Allocation
			if a.raft != nil && a.raft.HasState() {
				allocs = a.raft.State().Allocations(j.Id)
			} else if resp, err := cs.GetJob(ctx, &pb.GetJobRequest{Id: j.Id, Query: stale}); err == nil {
				allocs = resp.Allocations
			}
			for _, al := range allocs {
				if al.Generation != j.Generation {
					continue
				}
				st := al.ClientStatus
				if st == "" {
					st = consensus.AllocPending
				}
				dj.Ranks = append(dj.Ranks, dashRank{Rank: al.Rank, Node: al.NodeName, GPUs: al.Gpus, Status: st,
					Desired: al.DesiredStatus, ExitCode: al.ExitCode, Message: al.Message})
			}
			sort.Slice(dj.Ranks, func(i, k int) bool { return dj.Ranks[i].Rank < dj.Ranks[k].Rank })
			v.Jobs = append(v.Jobs, dj)
		}
	}
	v.GPUs = o.clusterGPUs(ctx, v.Members)
	return v
}

// clusterGPUs gathers the GPU samples of up to dashMaxGPUNodes alive nodes
// (those that report GPUs first), in parallel, each bounded by
// dashGPUTimeout. Nodes without GPUs are left out.
func (o *opsState) clusterGPUs(ctx context.Context, members []dashMember) []dashGPUs {
	var targets []dashMember
	for _, m := range members {
		if m.State == consensus.MemberAlive && m.HTTPAddr != "" && m.ID != o.a.nodeID {
			targets = append(targets, m)
		}
	}
	sort.SliceStable(targets, func(i, k int) bool { return targets[i].GPUs > targets[k].GPUs })
	if len(targets) > dashMaxGPUNodes-1 {
		targets = targets[:dashMaxGPUNodes-1]
	}
	out := make([]dashGPUs, len(targets)+1)
	out[0] = o.localGPUs()
	var wg sync.WaitGroup
	sec := o.a.sec
	client := &http.Client{Timeout: dashGPUTimeout, Transport: &http.Transport{TLSClientConfig: sec.httpClientTLS()}}
	defer client.CloseIdleConnections()
	for i, m := range targets {
		wg.Add(1)
		go func() {
			defer wg.Done()
			res := dashGPUs{Node: m.Name}
			req, err := http.NewRequestWithContext(ctx, http.MethodGet, sec.httpScheme()+"://"+m.HTTPAddr+"/v1/gpus", nil)
			if err == nil {
				if tok := sec.httpToken(); tok != "" {
					req.Header.Set("Authorization", "Bearer "+tok)
				}
				var resp *http.Response
				if resp, err = client.Do(req); err == nil {
					err = json.NewDecoder(resp.Body).Decode(&res)
					resp.Body.Close()
				}
			}
			if err != nil {
				res.Error = err.Error()
			}
			res.Node = m.Name
			out[i+1] = res
		}()
	}
	wg.Wait()
	kept := out[:0]
	for _, g := range out {
		if len(g.GPUs) > 0 {
			kept = append(kept, g)
		}
	}
	sort.Slice(kept, func(i, k int) bool { return kept[i].Node < kept[k].Node })
	return kept
}

func (o *opsState) localGPUs() dashGPUs {
	out := dashGPUs{Node: o.a.cfg.NodeName}
	ms, err := o.sampleGPUs()
	if err != nil {
		out.Error = err.Error()
	}
	for _, m := range sortedGPUs(ms) {
		out.GPUs = append(out.GPUs, toDashGPU(m))
	}
	return out
}

func toDashGPU(m cuda.GPUMetrics) dashGPU {
	return dashGPU{
		Index: m.Index, UUID: m.UUID, Utilization: m.UtilizationGPU, MemUtilization: m.UtilizationMem,
		MemUsed: m.MemoryUsedBytes, MemTotal: m.MemoryUsedBytes + m.MemoryFreeBytes,
		Temperature: m.TemperatureC, Power: m.PowerWatts, ECCCorrected: m.ECCCorrected, ECCUncorrected: m.ECCUncorrected,
	}
}
