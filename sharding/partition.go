package sharding

import (
	"fmt"
	"math"

	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// StageRange is one pipeline stage: the contiguous layers [Start, End).
type StageRange struct {
	Start, End int
	// Cost is the sum of the stage's layer costs.
	Cost float64
	// MemoryBytes is the sum of the stage's layer memory.
	MemoryBytes uint64
}

// LayerPartition is a split of layers into pipeline stages.
type LayerPartition struct {
	Stages []StageRange
	// MaxCost is the largest stage cost: the pipeline's step time is
	// proportional to it.
	MaxCost float64
}

// Boundaries returns the first layer of every stage followed by the number
// of layers, e.g. [0 3 5 8] for three stages over eight layers.
func (p LayerPartition) Boundaries() []int {
	out := make([]int, 0, len(p.Stages)+1)
	for _, s := range p.Stages {
		out = append(out, s.Start)
	}
	if n := len(p.Stages); n > 0 {
		out = append(out, p.Stages[n-1].End)
	}
	return out
}

// PartitionLayers splits layers, in order, into exactly `stages` contiguous
// non-empty stages so that the slowest stage's compute (the sum of its
// costs) is as small as possible, subject to every stage's memory (the sum
// of its layers' memory) fitting its limit.
//
// costs[i] is layer i's compute cost in any unit (seconds, FLOPs), >= 0.
// memory[i] is layer i's memory in bytes (weights, gradients, optimizer
// state and activations kept for backward); nil means no memory use.
// memLimits is empty (no limit), one value (the same limit for every
// stage), or one value per stage (stage s must fit memLimits[s], for stages
// on GPUs of different sizes).
//
// It is exact (dynamic programming, O(stages × layers²) time) and
// deterministic: among optimal splits it takes the one whose later stages
// end as late as possible, i.e. the earlier stages hold the extra layers.
// Errors wrap ErrInvalidPartition for malformed input and
// ErrInfeasiblePartition when no split fits the memory limits.
func PartitionLayers(costs []float64, memory []uint64, stages int, memLimits ...uint64) (LayerPartition, error) {
	n := len(costs)
	switch {
	case n == 0:
		return LayerPartition{}, fmt.Errorf("%w: no layers to partition", ErrInvalidPartition)
	case stages < 1:
		return LayerPartition{}, fmt.Errorf("%w: stages must be >= 1, got %d", ErrInvalidPartition, stages)
	case stages > n:
		return LayerPartition{}, fmt.Errorf("%w: %d stages need at least %d layers (one per stage), got %d layers; use fewer stages", ErrInfeasiblePartition, stages, stages, n)
	case memory != nil && len(memory) != n:
		return LayerPartition{}, fmt.Errorf("%w: %d memory values for %d layers; give one per layer or none", ErrInvalidPartition, len(memory), n)
	case len(memLimits) != 0 && len(memLimits) != 1 && len(memLimits) != stages:
		return LayerPartition{}, fmt.Errorf("%w: %d memory limits for %d stages; give none, one, or one per stage", ErrInvalidPartition, len(memLimits), stages)
	}
	for i, c := range costs {
		if c < 0 || math.IsNaN(c) || math.IsInf(c, 0) {
			return LayerPartition{}, fmt.Errorf("%w: layer %d cost must be finite and >= 0, got %v", ErrInvalidPartition, i, c)
		}
	}
	mem := func(i int) uint64 {
		if memory == nil {
			return 0
		}
		return memory[i]
	}
	limit := func(s int) uint64 {
		switch len(memLimits) {
		case 0:
			return math.MaxUint64
		case 1:
			return memLimits[0]
		default:
			return memLimits[s]
		}
	}
	// A single layer larger than every limit can never fit.
	for i := 0; i < n; i++ {
		fits := false
		for s := 0; s < stages && !fits; s++ {
			fits = mem(i) <= limit(s)
		}
		if !fits {
			return LayerPartition{}, fmt.Errorf("%w: layer %d alone needs %s, more than any stage's memory limit; raise the limit or split the layer", ErrInfeasiblePartition, i, bytesize.Format(int64(mem(i))))
		}
	}

	inf := math.Inf(1)
	// dp[s][i]: the best slowest-stage cost for layers [0, i) in s stages.
	// from[s][i]: where stage s starts in that best split.
	dp := make([][]float64, stages+1)
	from := make([][]int, stages+1)
	for s := range dp {
		dp[s] = make([]float64, n+1)
		from[s] = make([]int, n+1)
		for i := range dp[s] {
			dp[s][i] = inf
			from[s][i] = -1
		}
	}
	dp[0][0] = 0
	for s := 1; s <= stages; s++ {
		lim := limit(s - 1)
		// Stage s ends at i, with stages-s stages (one layer each at least)
		// still to come.
		for i := s; i <= n-(stages-s); i++ {
			var cost float64
			var m uint64
			for j := i - 1; j >= s-1; j-- {
				cost += costs[j]
				m += mem(j)
				if m > lim || m < mem(j) { // over the limit (or overflow)
					break
				}
				if dp[s-1][j] == inf {
					continue
				}
				v := math.Max(dp[s-1][j], cost)
				if v < dp[s][i] {
					dp[s][i] = v
					from[s][i] = j
				}
			}
		}
	}
	if dp[stages][n] == inf {
		var total uint64
		for i := 0; i < n; i++ {
			total += mem(i)
		}
		lim := "no limit"
		switch len(memLimits) {
		case 1:
			lim = bytesize.Format(int64(memLimits[0])) + " per stage"
		case stages:
			lim = "the per-stage limits"
		}
		return LayerPartition{}, fmt.Errorf("%w: no split of %d layers (%s in all) into %d contiguous stages fits %s; use more stages or more memory per stage", ErrInfeasiblePartition, n, bytesize.Format(int64(total)), stages, lim)
	}
	out := LayerPartition{Stages: make([]StageRange, stages)}
	end := n
	for s := stages; s >= 1; s-- {
		start := from[s][end]
		r := StageRange{Start: start, End: end}
		for j := start; j < end; j++ {
			r.Cost += costs[j]
			r.MemoryBytes += mem(j)
		}
		out.Stages[s-1] = r
		out.MaxCost = math.Max(out.MaxCost, r.Cost)
		end = start
	}
	return out, nil
}
