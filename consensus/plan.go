package consensus

import (
	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

// PlanJob says whether and where a job with spec would be placed against
// the given cluster state, through the scheduler's own planner view
// (NewEvaluator) and conversions, so `gpumesh job plan` answers
// what the leader would do. It is pure: nothing is submitted or reserved.
//
// nodes and allocs are the state as the Control API returns it (ListNodes,
// GetJob); like the scheduler, PlanJob counts only nodes that are alive and
// allocations that still hold resources on them. Jobs queued ahead of this
// one are not counted: they may take the capacity first. The error is a
// *sharding.UnplaceableError (errors.Is sharding.ErrUnplaceable) when the
// job does not fit now, ErrInvalidArgument-wrapped for a bad constraint.
func PlanJob(nodes []*controlpb.Node, allocs []*controlpb.Allocation, spec *controlpb.JobSpec) (sharding.Plan, error) {
	e, err := NewEvaluator(ClusterView{Nodes: nodes, Allocations: allocs}, SchedulerConfig{})
	if err != nil {
		return sharding.Plan{}, err
	}
	job, err := toShardingJob("plan", spec)
	if err != nil {
		return sharding.Plan{}, err
	}
	return e.cluster.Place(job)
}
