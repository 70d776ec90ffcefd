// Package sharding is pure, deterministic planning: placing a job's ranks on
// nodes (gang placement, pack or spread, constraints) and partitioning layers
// into pipeline stages. It does no I/O and reads no clock. (How a ring cuts
// a tensor into chunks is the ring schedule's business: collective's
// schedule.go and Config.ChunkBytes.)
//
// Placement. Place(nodes, job, existing) returns a Plan (every rank of the
// job, or an error and nothing). A scheduler that places many jobs keeps a
// Cluster instead:
//
//	c, err := sharding.NewCluster(nodes, allocations) // once
//	plan, err := c.Place(job)                        // cheap: one pass over the nodes
//	// ... commit the plan (one Raft entry) ...
//	err = c.Apply(plan)                              // book its GPUs and rank slots
//	c.ReleaseJob(jobID)                              // when the job stops or is re-placed
//
// A job that does not fit returns an *UnplaceableError whose Reason says
// why in words ("needs 8 GPUs (4 ranks × 2, 2 on one node per rank) on nodes
// matching az=us-east-1a; 4 free on 2 eligible nodes (at most 2 on one
// node); 1 node draining"); errors.Is(err, ErrUnplaceable) holds for it.
//
// Shared GPUs. A job with RanksPerGPU N > 1 (and GPUsPerRank 1) puts up to
// N of its ranks on each GPU it gets: a node takes N ranks per free GPU, and
// its ranks fill the lowest free GPUs N at a time. The GPU is the job's as
// a whole: Apply books it once for the group and no other job is placed on
// it, however few of the job's ranks use it. Pack and spread count N ranks
// per free GPU when they choose nodes; ranks sharing a GPU are on one node.
//
// Availability zones. Pack keeps a job in one zone whenever a zone can hold
// it, because ring collectives pay cross-zone latency on every step and AWS
// charges for cross-zone traffic; when no zone can, it spans zones rather
// than leave the job waiting. Constraints.SameAZ makes one zone a hard
// requirement. Spread alternates zones, for jobs that want to survive the
// loss of one.
//
// Pipeline stages. PartitionLayers(costs, memory, stages, limits...) splits
// layers into contiguous stages minimising the slowest stage within each
// stage's memory limit.
package sharding
