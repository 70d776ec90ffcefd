package node

import (
	"context"
	"time"

	"github.com/gpumesh/gpumesh/consensus"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// loadSampleEvery is how often a router samples its requests in flight;
// every consensus.ScaleEvery it reports their average to the leader.
const loadSampleEvery = 100 * time.Millisecond

// inFlightOfScaled returns this router's requests in flight on each live
// service job scaled by load (zero included, so the leader hears the load
// fall).
func (rt *router) inFlightOfScaled() map[string]float64 {
	tbl := rt.table.Load()
	if len(tbl.scaled) == 0 {
		return nil
	}
	out := make(map[string]float64, len(tbl.scaled))
	for _, id := range tbl.scaled {
		out[id] = 0
	}
	for _, s := range tbl.services {
		for _, b := range s.replicas {
			if _, ok := out[b.jobID]; ok {
				out[b.jobID] += float64(b.st.inflight.Load())
			}
		}
	}
	return out
}

// loadLoop reports this router's load on the services scaled by load to
// the leader: every consensus.ScaleEvery, the average of samples taken
// every loadSampleEvery. A node that routes to no such service reports
// nothing (after one last empty report).
func (a *Agent) loadLoop() {
	cs := &controlServer{a: a}
	t := time.NewTicker(loadSampleEvery)
	defer t.Stop()
	sums := map[string]float64{}
	samples := 0
	last := time.Now()
	reported := false
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
		}
		cur := a.router.inFlightOfScaled()
		for id, v := range cur {
			sums[id] += v
		}
		samples++
		if time.Since(last) < consensus.ScaleEvery {
			continue
		}
		req := &pb.ReportLoadRequest{NodeId: a.nodeID}
		for id, sum := range sums {
			if _, live := cur[id]; live {
				req.Services = append(req.Services, &pb.ServiceLoad{JobId: id, InFlight: sum / float64(samples)})
			}
		}
		clear(sums)
		samples, last = 0, time.Now()
		if len(req.Services) == 0 && !reported {
			continue
		}
		ctx, cancel := context.WithTimeout(a.ctx, consensus.ScaleEvery)
		_, err := cs.ReportLoad(ctx, req)
		cancel()
		if err != nil {
			a.logger.Debug("could not report the routers' load to the leader", "error", err)
			continue
		}
		reported = len(req.Services) > 0
	}
}
