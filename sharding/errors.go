package sharding

import (
	"errors"
	"fmt"
)

var (
	// ErrUnplaceable is matched (errors.Is) by every *UnplaceableError: the
	// job is valid but does not fit the cluster as it is now. The caller
	// should keep the job pending with the error's Reason and retry when
	// capacity changes.
	ErrUnplaceable = errors.New("job cannot be placed")
	// ErrInvalidJob means the job itself is malformed; retrying cannot help.
	ErrInvalidJob = errors.New("invalid job")
	// ErrInvalidNodes means the node list is malformed (for example two
	// nodes share an ID).
	ErrInvalidNodes = errors.New("invalid node list")
	// ErrConflict means a plan given to Cluster.Apply books a GPU or a rank
	// slot that is no longer free.
	ErrConflict = errors.New("plan conflicts with current usage")
	// ErrInfeasiblePartition means layers cannot be split into the wanted
	// number of stages within the memory limits.
	ErrInfeasiblePartition = errors.New("layers cannot be partitioned")
	// ErrInvalidPartition means the input of PartitionLayers is malformed.
	ErrInvalidPartition = errors.New("invalid partition input")
)

// UnplaceableError says why a job cannot be placed, in words a person
// understands, plus the numbers behind them for programs.
type UnplaceableError struct {
	JobID string
	// Reason is a one-line explanation, for example
	// "needs 8 GPUs (4 ranks × 2) on nodes matching az=us-east-1a; 4 free on 2 eligible nodes; 1 node draining".
	Reason string
	// WantRanks is the smallest number of ranks that would have been
	// accepted (MinRanks for an elastic job).
	WantRanks int
	// FitRanks is how many ranks would fit now.
	FitRanks int
	// EligibleNodes counts nodes that pass every filter (state and constraints).
	EligibleNodes int
	// FreeGPUs counts free GPUs (meeting the memory constraint) on eligible nodes.
	FreeGPUs int
}

func (e *UnplaceableError) Error() string {
	return fmt.Sprintf("job %q cannot be placed: %s", e.JobID, e.Reason)
}

// Is makes errors.Is(err, ErrUnplaceable) true.
func (e *UnplaceableError) Is(target error) bool { return target == ErrUnplaceable }
