package driver

import (
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/gpumesh/gpumesh/sharding"
)

// DefaultRoleName is torchrun's default worker role (ROLE_NAME).
const DefaultRoleName = "default"

// RankEnv is where one rank of a job runs, as its environment tells it.
// The field comments name the variable each one sets; the names and meaning
// are torchrun's (torch.distributed.elastic's LocalElasticAgent), so a
// script written for torchrun runs unchanged.
type RankEnv struct {
	// JobID sets GPUMESH_JOB_ID.
	JobID string
	// Generation sets GPUMESH_GENERATION.
	Generation uint64
	// RunID sets TORCHELASTIC_RUN_ID. Default: JobID.
	RunID string
	// RestartCount sets TORCHELASTIC_RESTART_COUNT: how many times the job's
	// ranks have been restarted before this generation (generation-1 when
	// generations start at 1 and every one is a restart).
	RestartCount int
	// MaxRestarts sets TORCHELASTIC_MAX_RESTARTS (the restart policy's
	// attempts).
	MaxRestarts int

	// Rank sets RANK, ROLE_RANK and GPUMESH_RANK; WorldSize sets WORLD_SIZE
	// and ROLE_WORLD_SIZE (gpumesh runs one role per job).
	Rank      int
	WorldSize int
	// LocalRank and LocalWorldSize set LOCAL_RANK and LOCAL_WORLD_SIZE: the
	// rank's index among the job's ranks on this node, and their number.
	LocalRank      int
	LocalWorldSize int
	// GroupRank and GroupWorldSize set GROUP_RANK and GROUP_WORLD_SIZE: the
	// index of this node among the job's nodes, and their number.
	GroupRank      int
	GroupWorldSize int
	// RoleName sets ROLE_NAME. Default: DefaultRoleName.
	RoleName string

	// MasterAddr and MasterPort set MASTER_ADDR and MASTER_PORT: the host
	// (no port) of rank 0's node and the port reserved for the job there.
	MasterAddr string
	MasterPort int

	// GPUs sets CUDA_VISIBLE_DEVICES to the device ordinals placed, in
	// PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID is set by default so that
	// ordinals mean what nvidia-smi and NVML mean). Empty hides every GPU
	// (CUDA_VISIBLE_DEVICES="") for a CPU rank. Ranks that share a GPU
	// (a job's ranks_per_gpu) are given the same ordinal.
	GPUs []int

	// NodeAddr sets GPUMESH_ADDR: the local agent's RPC address, so that the
	// gpumesh CLI run inside the task talks to its own node.
	NodeAddr string
	// AllocDir sets GPUMESH_ALLOC_DIR, GPUMESH_PREEMPT_DEADLINE_FILE and
	// TORCHELASTIC_ERROR_FILE (files inside it).
	AllocDir string
}

// Names of the variables BuildEnv sets.
const (
	EnvRank                = "RANK"
	EnvWorldSize           = "WORLD_SIZE"
	EnvLocalRank           = "LOCAL_RANK"
	EnvLocalWorldSize      = "LOCAL_WORLD_SIZE"
	EnvGroupRank           = "GROUP_RANK"
	EnvGroupWorldSize      = "GROUP_WORLD_SIZE"
	EnvRoleRank            = "ROLE_RANK"
	EnvRoleWorldSize       = "ROLE_WORLD_SIZE"
	EnvRoleName            = "ROLE_NAME"
	EnvMasterAddr          = "MASTER_ADDR"
	EnvMasterPort          = "MASTER_PORT"
	EnvCUDAVisibleDevices  = "CUDA_VISIBLE_DEVICES"
	EnvRestartCount        = "TORCHELASTIC_RESTART_COUNT"
	EnvMaxRestarts         = "TORCHELASTIC_MAX_RESTARTS"
	EnvRunID               = "TORCHELASTIC_RUN_ID"
	EnvUseAgentStore       = "TORCHELASTIC_USE_AGENT_STORE"
	EnvErrorFile           = "TORCHELASTIC_ERROR_FILE"
	EnvJobID               = "GPUMESH_JOB_ID"
	EnvGeneration          = "GPUMESH_GENERATION"
	EnvGPUMeshRank         = "GPUMESH_RANK"
	EnvAddr                = "GPUMESH_ADDR"
	EnvAllocDir            = "GPUMESH_ALLOC_DIR"
	EnvPreemptDeadlineFile = "GPUMESH_PREEMPT_DEADLINE_FILE"
)

// Defaults BuildEnv sets only where neither the base environment nor the
// job's sets them.
var envDefaults = []struct {
	key, value string
	// when returns whether the default applies to this rank.
	when func(RankEnv) bool
}{
	// torchrun's own default: NCCL errors abort the process instead of
	// hanging it.
	{"TORCH_NCCL_ASYNC_ERROR_HANDLING", "1", func(RankEnv) bool { return true }},
	// torchrun sets OMP_NUM_THREADS=1 when it runs several processes per
	// node, so that they do not oversubscribe the cores.
	{"OMP_NUM_THREADS", "1", func(r RankEnv) bool { return r.LocalWorldSize > 1 }},
	// CUDA's default order is "fastest first"; NVML's (and the placement's)
	// is PCI bus order.
	{"CUDA_DEVICE_ORDER", "PCI_BUS_ID", func(RankEnv) bool { return true }},
	// stdout goes to a pipe, where Python would buffer a whole block:
	// unbuffered output makes "gpumesh job logs -f" show lines as printed.
	{"PYTHONUNBUFFERED", "1", func(RankEnv) bool { return true }},
}

// Validate checks that the placement is one a rank can run in.
func (r RankEnv) Validate() error {
	fail := func(format string, args ...any) error {
		return fmt.Errorf("%w: "+format, append([]any{ErrInvalidEnv}, args...)...)
	}
	switch {
	case r.JobID == "":
		return fail("job ID is required")
	case r.WorldSize < 1:
		return fail("world size must be >= 1, got %d", r.WorldSize)
	case r.Rank < 0 || r.Rank >= r.WorldSize:
		return fail("rank must be in [0, %d), got %d", r.WorldSize, r.Rank)
	case r.LocalWorldSize < 1 || r.LocalWorldSize > r.WorldSize:
		return fail("local world size must be in [1, world size %d], got %d", r.WorldSize, r.LocalWorldSize)
	case r.LocalRank < 0 || r.LocalRank >= r.LocalWorldSize:
		return fail("local rank must be in [0, %d), got %d", r.LocalWorldSize, r.LocalRank)
	case r.GroupWorldSize < 1 || r.GroupWorldSize > r.WorldSize:
		return fail("group world size (nodes) must be in [1, world size %d], got %d", r.WorldSize, r.GroupWorldSize)
	case r.GroupRank < 0 || r.GroupRank >= r.GroupWorldSize:
		return fail("group rank must be in [0, %d), got %d", r.GroupWorldSize, r.GroupRank)
	case r.MasterAddr == "":
		return fail("master address is required (the host of rank 0's node)")
	case net.ParseIP(r.MasterAddr) == nil && strings.Contains(r.MasterAddr, ":"):
		return fail("master address must be a host without a port, got %q (the port goes in MasterPort)", r.MasterAddr)
	case r.MasterPort < 1 || r.MasterPort > 65535:
		return fail("master port must be in [1, 65535], got %d", r.MasterPort)
	case r.RestartCount < 0 || r.MaxRestarts < 0:
		return fail("restart count and max restarts must be >= 0, got %d and %d", r.RestartCount, r.MaxRestarts)
	}
	seen := make(map[int]bool, len(r.GPUs))
	for _, g := range r.GPUs {
		if g < 0 {
			return fail("GPU ordinals must be >= 0, got %d", g)
		}
		if seen[g] {
			return fail("GPU %d is given twice", g)
		}
		seen[g] = true
	}
	return nil
}

// Vars returns the variables the placement defines (torchrun's and
// gpumesh's), without defaults or inherited ones.
func (r RankEnv) Vars() (map[string]string, error) {
	if err := r.Validate(); err != nil {
		return nil, err
	}
	runID := r.RunID
	if runID == "" {
		runID = r.JobID
	}
	role := r.RoleName
	if role == "" {
		role = DefaultRoleName
	}
	gpus := make([]string, len(r.GPUs))
	for i, g := range r.GPUs {
		gpus[i] = strconv.Itoa(g)
	}
	itoa := strconv.Itoa
	v := map[string]string{
		EnvRank:               itoa(r.Rank),
		EnvWorldSize:          itoa(r.WorldSize),
		EnvLocalRank:          itoa(r.LocalRank),
		EnvLocalWorldSize:     itoa(r.LocalWorldSize),
		EnvGroupRank:          itoa(r.GroupRank),
		EnvGroupWorldSize:     itoa(r.GroupWorldSize),
		EnvRoleRank:           itoa(r.Rank),
		EnvRoleWorldSize:      itoa(r.WorldSize),
		EnvRoleName:           role,
		EnvMasterAddr:         r.MasterAddr,
		EnvMasterPort:         itoa(r.MasterPort),
		EnvCUDAVisibleDevices: strings.Join(gpus, ","),
		EnvRestartCount:       itoa(r.RestartCount),
		EnvMaxRestarts:        itoa(r.MaxRestarts),
		EnvRunID:              runID,
		// No torchrun agent runs a TCPStore for the workers: rank 0 creates
		// it at MASTER_ADDR:MASTER_PORT, as with a plain env:// init.
		EnvUseAgentStore: "False",
		EnvJobID:         r.JobID,
		EnvGeneration:    strconv.FormatUint(r.Generation, 10),
		EnvGPUMeshRank:   itoa(r.Rank),
	}
	if r.NodeAddr != "" {
		v[EnvAddr] = r.NodeAddr
	}
	if r.AllocDir != "" {
		v[EnvAllocDir] = r.AllocDir
		v[EnvPreemptDeadlineFile] = DeadlineFile(r.AllocDir)
		v[EnvErrorFile] = filepath.Join(r.AllocDir, ErrorFileName)
	}
	return v, nil
}

// BuildEnv returns the complete environment of one rank, sorted by name:
// base (usually the daemon's own environment), then defaults that neither
// base nor job sets (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, OMP_NUM_THREADS=1
// with several ranks per node, CUDA_DEVICE_ORDER=PCI_BUS_ID,
// PYTHONUNBUFFERED=1), then the job's own variables, then the placement's
// variables (RankEnv.Vars), which always win. It is a pure function.
func BuildEnv(r RankEnv, base []string, job map[string]string) ([]string, error) {
	vars, err := r.Vars()
	if err != nil {
		return nil, err
	}
	env := make(map[string]string, len(base)+len(job)+len(vars)+len(envDefaults))
	for _, kv := range base {
		k, v, ok := strings.Cut(kv, "=")
		if !ok || k == "" {
			continue
		}
		env[k] = v
	}
	for _, d := range envDefaults {
		if _, set := env[d.key]; set {
			continue
		}
		if _, set := job[d.key]; set {
			continue
		}
		if d.when(r) {
			env[d.key] = d.value
		}
	}
	for k, v := range job {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.Contains(v, "\x00") {
			return nil, fmt.Errorf("%w: job env variable %q is not a valid name=value pair", ErrInvalidEnv, k)
		}
		env[k] = v
	}
	for k, v := range vars {
		env[k] = v
	}
	out := make([]string, 0, len(env))
	for k, v := range env {
		out = append(out, k+"="+v)
	}
	slices.Sort(out)
	return out, nil
}

// RankEnvFromPlan fills the topology of one rank (ranks, local ranks,
// groups, GPUs, master address) from a placement plan. nodeHost maps a node
// ID to the host other nodes reach it at (no port); MASTER_ADDR is rank 0's.
// The caller sets JobID, Generation, restart counts, MasterPort, NodeAddr
// and AllocDir.
func RankEnvFromPlan(plan sharding.Plan, rank int, nodeHost map[string]string) (RankEnv, error) {
	var me, zero *sharding.RankPlacement
	nodes := make(map[string]bool)
	for i := range plan.Ranks {
		p := &plan.Ranks[i]
		nodes[p.NodeID] = true
		if p.Rank == rank {
			me = p
		}
		if p.Rank == 0 {
			zero = p
		}
	}
	if me == nil {
		return RankEnv{}, fmt.Errorf("%w: rank %d is not in the plan of job %q (%d ranks)", ErrInvalidEnv, rank, plan.JobID, len(plan.Ranks))
	}
	if zero == nil {
		return RankEnv{}, fmt.Errorf("%w: the plan of job %q has no rank 0", ErrInvalidEnv, plan.JobID)
	}
	master, ok := nodeHost[zero.NodeID]
	if !ok || master == "" {
		return RankEnv{}, fmt.Errorf("%w: no address known for node %q of rank 0", ErrInvalidEnv, zero.NodeID)
	}
	return RankEnv{
		JobID:          plan.JobID,
		Rank:           me.Rank,
		WorldSize:      len(plan.Ranks),
		LocalRank:      me.LocalRank,
		LocalWorldSize: me.LocalWorldSize,
		GroupRank:      me.GroupRank,
		GroupWorldSize: len(nodes),
		MasterAddr:     master,
		GPUs:           slices.Clone(me.GPUs),
	}, nil
}
