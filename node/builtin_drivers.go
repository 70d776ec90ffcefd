package node

import (
	"context"
	"encoding/json"
	"fmt"
	"sort"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/collective/pipeline"
	"github.com/gpumesh/gpumesh/internal/bytesize"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// registerBuiltinDrivers installs the drivers that run inside the agent.
func registerBuiltinDrivers(r *runner) {
	r.drivers[jobspec.TypeAllReduce] = startAllReduce
	r.drivers[jobspec.TypePipeline] = startPipeline
}

// rankAddrs returns the data-plane address of every rank of al's
// generation, by rank.
func (r *runner) rankAddrs(ctx context.Context, al *pb.Allocation) ([]string, error) {
	cs := &controlServer{a: r.a}
	for {
		resp, err := cs.GetJob(ctx, &pb.GetJobRequest{Id: al.JobId, Query: &pb.QueryOptions{Stale: true}})
		if err != nil {
			return nil, fmt.Errorf("looking up the job's ranks: %w", err)
		}
		var ranks []*pb.Allocation
		for _, o := range resp.Allocations {
			if o.Generation == al.Generation {
				ranks = append(ranks, o)
			}
		}
		sort.Slice(ranks, func(i, k int) bool { return ranks[i].Rank < ranks[k].Rank })
		if len(ranks) == int(al.WorldSize) {
			addrs := make([]string, len(ranks))
			for i, o := range ranks {
				if int(o.Rank) != i || o.RankAddr == "" {
					return nil, fmt.Errorf("generation %d has no address for rank %d", al.Generation, i)
				}
				addrs[i] = o.RankAddr
			}
			return addrs, nil
		}
		// A stale replica may not hold the whole plan yet.
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

func toMap(v any) map[string]any {
	b, err := json.Marshal(v)
	if err != nil {
		return map[string]any{"error": err.Error()}
	}
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	return m
}

// deviceIndex is the GPU a built-in rank computes on: the one it was placed
// on (ranks sharing a GPU get the same), or its local rank when it was
// placed without GPUs (device auto or cuda with gpus_per_rank 0).
func deviceIndex(al *pb.Allocation) int {
	if len(al.Gpus) > 0 {
		return int(al.Gpus[0])
	}
	return int(al.LocalRank)
}

func intsOf(v []int32) []int {
	out := make([]int, len(v))
	for i, x := range v {
		out[i] = int(x)
	}
	return out
}

func startAllReduce(ctx context.Context, r *runner, al *pb.Allocation, job *pb.Job) (task, error) {
	s := job.Spec.GetAllreduce()
	spec := collective.AllReduceJobSpec{Iters: int(s.GetIters()), Device: s.GetDevice(), LocalRank: int(al.LocalRank), GPUs: intsOf(al.Gpus)}
	dt, err := collective.ParseDType(s.GetDtype())
	if err != nil {
		return nil, err
	}
	spec.DType = dt
	for _, sz := range s.GetSizes() {
		n, err := bytesize.Parse(sz)
		if err != nil {
			return nil, err
		}
		// Round down to whole elements, as nccl-tests does.
		n -= n % int64(dt.Size())
		spec.Sizes = append(spec.Sizes, n)
	}
	if err := spec.Validate(); err != nil {
		return nil, err
	}
	return startBuiltin(r, al, func(ctx context.Context, logger hclog.Logger) (map[string]any, error) {
		addrs, err := r.rankAddrs(ctx, al)
		if err != nil {
			return nil, err
		}
		logger.Info("all-reduce starting", "rank", al.Rank, "ranks", len(addrs), "sizes", s.GetSizes(), "dtype", s.GetDtype())
		comm, err := collective.New(r.a.data.tr, collective.Group{Job: al.JobId, Generation: al.Generation, Rank: int(al.Rank), Addrs: addrs}, r.a.collectiveConfig(int(s.GetChannels())))
		if err != nil {
			return nil, err
		}
		defer comm.Close()
		rep, err := collective.RunAllReduceJob(ctx, comm, spec, logger)
		m := toMap(rep)
		var rows []any
		for _, res := range rep.Results {
			check := "ok"
			if res.Wrong != 0 {
				check = fmt.Sprintf("%d wrong", res.Wrong)
			}
			logger.Info("all-reduce result", "size", bytesize.Format(res.Bytes), "time_us", fmt.Sprintf("%.1f", res.TimeUs),
				"algbw_gbps", fmt.Sprintf("%.2f", res.AlgBWGBps), "busbw_gbps", fmt.Sprintf("%.2f", res.BusBWGBps), "check", check)
			rows = append(rows, map[string]any{
				"size": bytesize.Format(res.Bytes), "dtype": res.DType, "time_us": fmt.Sprintf("%.1f", res.TimeUs),
				"algbw_gbps": fmt.Sprintf("%.2f", res.AlgBWGBps), "busbw_gbps": fmt.Sprintf("%.2f", res.BusBWGBps), "check": check,
			})
		}
		m["sizes"] = rows
		m["ok"] = err == nil && rep.Wrong == 0 && len(rep.Results) == len(spec.Sizes)
		if err == nil && rep.Wrong != 0 {
			err = fmt.Errorf("%d elements differed from the expected result", rep.Wrong)
		}
		return m, err
	})
}

func startPipeline(ctx context.Context, r *runner, al *pb.Allocation, job *pb.Job) (task, error) {
	p := job.Spec.GetPipeline()
	spec := pipeline.JobSpec{
		BatchSize:    int(p.GetMicrobatches() * p.GetMicrobatchSize()),
		MicroBatches: int(p.GetMicrobatches()),
		Steps:        int(p.GetSteps()),
		Seed:         p.GetSeed(),
		LearningRate: p.GetLearningRate(),
		Schedule:     p.GetSchedule(),
		Mode:         p.GetMode(),
		Device:       p.GetDevice(),
		Chunks:       int(p.GetChunks()),
	}
	for _, w := range p.GetLayers() {
		spec.Layers = append(spec.Layers, int(w))
	}
	return startBuiltin(r, al, func(ctx context.Context, logger hclog.Logger) (map[string]any, error) {
		addrs, err := r.rankAddrs(ctx, al)
		if err != nil {
			return nil, err
		}
		logger.Info("pipeline stage starting", "stage", al.Rank, "stages", len(addrs), "layers", spec.Layers, "schedule", spec.Schedule, "mode", spec.Mode)
		links, err := pipeline.OpenCollectiveLinks(r.a.data.tr, pipeline.CollectiveConfig{
			JobID: al.JobId, Generation: al.Generation, Stage: int(al.Rank), Stages: len(addrs), Addrs: addrs,
			Ring: spec.Schedule == "interleaved",
		})
		if err != nil {
			return nil, err
		}
		dev, err := pipelineDevice(spec.Device, deviceIndex(al))
		if err != nil {
			return nil, err
		}
		if c, ok := dev.(interface{ Close() }); ok && dev != nil {
			defer c.Close()
		}
		rep, err := pipeline.RunJob(ctx, pipeline.RunConfig{
			JobID: al.JobId, Generation: al.Generation, Stage: int(al.Rank), Stages: len(addrs),
			Links: links, Logger: logger, RecvTimeout: r.a.cfg.CollectiveTimeout, Device: dev,
		}, spec)
		if err != nil {
			return nil, err
		}
		for i, l := range rep.Losses {
			logger.Info("step", "step", i+1, "loss", l)
		}
		logger.Info("pipeline stage done", "samples_per_sec", rep.SamplesPerSec, "bubble", rep.Bubble, "param_hash", rep.ParamHash)
		m := toMap(rep)
		m["ok"] = true
		return m, nil
	})
}
