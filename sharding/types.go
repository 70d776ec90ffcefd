package sharding

// Lifecycle values of a node's capacity.
const (
	LifecycleOnDemand = "on-demand"
	LifecycleSpot     = "spot"
	LifecycleUnknown  = "unknown"
)

// Placement strategies.
const (
	// PlacementPack puts a job's ranks on as few nodes as possible (the
	// default; what collectives want).
	PlacementPack = "pack"
	// PlacementSpread puts a job's ranks on as many nodes as possible.
	PlacementSpread = "spread"
)

// GPU is one GPU of a node as the planner sees it.
type GPU struct {
	// Index is the device ordinal on its node (what CUDA_VISIBLE_DEVICES names).
	Index int
	// Model is the product name, for example "NVIDIA H100 80GB HBM3".
	Model string
	// MemoryBytes is the GPU's total memory in bytes.
	MemoryBytes uint64
}

// Node is a schedulable node as the planner sees it. The caller passes only
// nodes that are alive; Place itself skips nodes that are draining or not
// eligible.
type Node struct {
	ID           string
	Name         string
	AZ           string
	InstanceType string
	// Lifecycle is LifecycleOnDemand, LifecycleSpot or LifecycleUnknown.
	Lifecycle string
	GPUs      []GPU
	// MaxRanks caps how many ranks (of any job) may run on the node at once;
	// zero means no cap. CPU-only ranks are bounded only by it.
	MaxRanks int
	// Draining nodes receive no new work.
	Draining bool
	// Ineligible nodes (for example after a rebalance recommendation)
	// receive no new work.
	Ineligible bool
}

// Constraints restrict where a job's ranks may go. Empty fields match anything.
type Constraints struct {
	AZ           string
	Lifecycle    string
	InstanceType string
	// MinGPUMemoryBytes is the smallest GPU a rank may be given.
	MinGPUMemoryBytes uint64
	// SameAZ keeps all ranks in one availability zone (any zone). Without
	// it, pack still prefers one zone but spans zones when no single zone
	// can hold the job; spread alternates zones.
	SameAZ bool
}

// Job is what Place needs to know of a job.
type Job struct {
	ID string
	// Ranks is the number of ranks wanted. For an elastic job it is the
	// maximum and MinRanks the minimum; for a fixed job MinRanks is zero or
	// equal to Ranks.
	Ranks    int
	MinRanks int
	// GPUsPerRank whole GPUs on one node for each rank; zero for CPU ranks.
	GPUsPerRank int
	// RanksPerGPU lets up to this many of the job's ranks share one GPU
	// (GPUsPerRank must be 1 when it is above 1). A shared GPU is the
	// job's alone: no other job gets it. 0 or 1: every rank gets GPUs of
	// its own.
	RanksPerGPU int
	// Placement is PlacementPack (default when empty) or PlacementSpread.
	Placement   string
	Constraints Constraints
	// Avoid lists nodes (by ID) that take ranks only when no placement
	// without them exists (a service replica kept off the nodes of its
	// siblings).
	Avoid []string
	// avoiding is set on the first try of a job with Avoid.
	avoiding bool
}

// Allocation is a rank already placed and holding resources.
type Allocation struct {
	JobID  string
	Rank   int
	NodeID string
	GPUs   []int
}

// RankPlacement says where one rank of a plan runs.
type RankPlacement struct {
	Rank int
	// LocalRank and LocalWorldSize are the rank's position among the job's
	// ranks on the same node, and how many there are.
	LocalRank      int
	LocalWorldSize int
	// GroupRank is the index of the node among the job's nodes (torchrun's
	// GROUP_RANK).
	GroupRank int
	NodeID    string
	// GPUs are the device ordinals given to the rank on its node.
	GPUs []int
}

// Plan is a whole gang placement: every rank of the job, or none.
type Plan struct {
	JobID string
	Ranks []RankPlacement
	// RanksPerGPU is the most ranks of the plan that may hold one GPU (the
	// job's RanksPerGPU); 0 or 1: each GPU goes to one rank.
	RanksPerGPU int
}
