package driver

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/sharding"
)

func envMap(env []string) map[string]string {
	m := make(map[string]string, len(env))
	for _, kv := range env {
		k, v, _ := strings.Cut(kv, "=")
		m[k] = v
	}
	return m
}

func baseRank() RankEnv {
	return RankEnv{
		JobID: "train", Generation: 2, RestartCount: 1, MaxRestarts: 3,
		Rank: 3, WorldSize: 4, LocalRank: 1, LocalWorldSize: 2, GroupRank: 1, GroupWorldSize: 2,
		MasterAddr: "127.0.0.1", MasterPort: 29500, GPUs: []int{2, 3},
		NodeAddr: "127.0.0.2:7947", AllocDir: "/data/alloc/train/2/3",
	}
}

func TestBuildEnv(t *testing.T) {
	tests := []struct {
		name string
		rank func(*RankEnv)
		base []string
		job  map[string]string
		want map[string]string // subset that must match; "" value with key in absent means must be absent
		gone []string          // keys that must not be set
	}{
		{
			name: "torchrun variables",
			want: map[string]string{
				"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
				"GROUP_RANK": "1", "GROUP_WORLD_SIZE": "2", "ROLE_RANK": "3", "ROLE_WORLD_SIZE": "4",
				"ROLE_NAME": "default", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
				"CUDA_VISIBLE_DEVICES": "2,3", "TORCHELASTIC_RESTART_COUNT": "1",
				"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RUN_ID": "train",
				"TORCHELASTIC_USE_AGENT_STORE": "False",
				"TORCHELASTIC_ERROR_FILE":      "/data/alloc/train/2/3/error.json",
				"GPUMESH_JOB_ID":               "train", "GPUMESH_GENERATION": "2", "GPUMESH_RANK": "3",
				"GPUMESH_ADDR": "127.0.0.2:7947", "GPUMESH_ALLOC_DIR": "/data/alloc/train/2/3",
				"GPUMESH_PREEMPT_DEADLINE_FILE":   "/data/alloc/train/2/3/preempt_deadline",
				"TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "OMP_NUM_THREADS": "1",
				"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "PYTHONUNBUFFERED": "1",
			},
		},
		{
			name: "CPU rank hides GPUs; one rank per node leaves OMP_NUM_THREADS alone",
			rank: func(r *RankEnv) {
				r.GPUs = nil
				r.Rank, r.LocalRank, r.LocalWorldSize, r.GroupRank, r.GroupWorldSize = 1, 0, 1, 1, 4
			},
			want: map[string]string{"CUDA_VISIBLE_DEVICES": "", "LOCAL_WORLD_SIZE": "1", "GROUP_WORLD_SIZE": "4"},
			gone: []string{"OMP_NUM_THREADS"},
		},
		{
			name: "job env and base env are kept, defaults yield to them, placement wins",
			base: []string{"PATH=/usr/bin", "OMP_NUM_THREADS=8", "RANK=99", "malformed"},
			job:  map[string]string{"NCCL_DEBUG": "INFO", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "CUDA_VISIBLE_DEVICES": "0,1,2,3", "PYTHONUNBUFFERED": ""},
			want: map[string]string{
				"PATH": "/usr/bin", "OMP_NUM_THREADS": "8", "RANK": "3", "NCCL_DEBUG": "INFO",
				"TORCH_NCCL_ASYNC_ERROR_HANDLING": "0", "CUDA_VISIBLE_DEVICES": "2,3", "PYTHONUNBUFFERED": "",
			},
			gone: []string{"malformed"},
		},
		{
			name: "run ID, role name; no node address or alloc dir",
			rank: func(r *RankEnv) { r.RunID, r.RoleName, r.NodeAddr, r.AllocDir = "run-7", "trainer", "", "" },
			want: map[string]string{"TORCHELASTIC_RUN_ID": "run-7", "ROLE_NAME": "trainer"},
			gone: []string{"GPUMESH_ADDR", "GPUMESH_ALLOC_DIR", "GPUMESH_PREEMPT_DEADLINE_FILE", "TORCHELASTIC_ERROR_FILE"},
		},
		{
			name: "IPv6 master address",
			rank: func(r *RankEnv) { r.MasterAddr = "::1" },
			want: map[string]string{"MASTER_ADDR": "::1"},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := baseRank()
			if tt.rank != nil {
				tt.rank(&r)
			}
			env, err := BuildEnv(r, tt.base, tt.job)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.IsSorted(env) {
				t.Errorf("env is not sorted: %v", env)
			}
			m := envMap(env)
			for k, v := range tt.want {
				got, ok := m[k]
				if !ok || got != v {
					t.Errorf("%s = %q (set %v), want %q", k, got, ok, v)
				}
			}
			for _, k := range tt.gone {
				if v, ok := m[k]; ok {
					t.Errorf("%s = %q, want unset", k, v)
				}
			}
			// Pure: the same input gives the same output.
			again, _ := BuildEnv(r, tt.base, tt.job)
			if !slices.Equal(env, again) {
				t.Errorf("BuildEnv is not deterministic")
			}
		})
	}
}

func TestBuildEnvRejects(t *testing.T) {
	tests := []struct {
		name string
		rank func(*RankEnv)
		job  map[string]string
		msg  string
	}{
		{"no job", func(r *RankEnv) { r.JobID = "" }, nil, "job ID is required"},
		{"zero world", func(r *RankEnv) { r.WorldSize = 0 }, nil, "world size must be >= 1"},
		{"rank too big", func(r *RankEnv) { r.Rank = 4 }, nil, "rank must be in [0, 4)"},
		{"local rank too big", func(r *RankEnv) { r.LocalRank = 2 }, nil, "local rank must be in [0, 2)"},
		{"group rank too big", func(r *RankEnv) { r.GroupRank = 2 }, nil, "group rank must be in [0, 2)"},
		{"local world too big", func(r *RankEnv) { r.LocalWorldSize = 5 }, nil, "local world size must be in [1, world size 4]"},
		{"no master", func(r *RankEnv) { r.MasterAddr = "" }, nil, "master address is required"},
		{"master with port", func(r *RankEnv) { r.MasterAddr = "10.0.0.1:29500" }, nil, "without a port"},
		{"bad port", func(r *RankEnv) { r.MasterPort = 0 }, nil, "master port must be in [1, 65535]"},
		{"GPU twice", func(r *RankEnv) { r.GPUs = []int{1, 1} }, nil, "GPU 1 is given twice"},
		{"negative GPU", func(r *RankEnv) { r.GPUs = []int{-1} }, nil, "GPU ordinals must be >= 0"},
		{"bad job env name", nil, map[string]string{"A=B": "x"}, "not a valid name=value pair"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := baseRank()
			if tt.rank != nil {
				tt.rank(&r)
			}
			_, err := BuildEnv(r, nil, tt.job)
			if !errors.Is(err, ErrInvalidEnv) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("err = %v, want ErrInvalidEnv containing %q", err, tt.msg)
			}
		})
	}
}

func TestRankEnvFromPlan(t *testing.T) {
	plan := sharding.Plan{JobID: "j", Ranks: []sharding.RankPlacement{
		{Rank: 0, LocalRank: 0, LocalWorldSize: 2, GroupRank: 0, NodeID: "a", GPUs: []int{0}},
		{Rank: 1, LocalRank: 1, LocalWorldSize: 2, GroupRank: 0, NodeID: "a", GPUs: []int{1}},
		{Rank: 2, LocalRank: 0, LocalWorldSize: 1, GroupRank: 1, NodeID: "b", GPUs: []int{3}},
	}}
	hosts := map[string]string{"a": "10.0.0.1", "b": "10.0.0.2"}
	r, err := RankEnvFromPlan(plan, 2, hosts)
	if err != nil {
		t.Fatal(err)
	}
	want := RankEnv{JobID: "j", Rank: 2, WorldSize: 3, LocalRank: 0, LocalWorldSize: 1, GroupRank: 1, GroupWorldSize: 2, MasterAddr: "10.0.0.1", GPUs: []int{3}}
	if r.JobID != want.JobID || r.Rank != want.Rank || r.WorldSize != want.WorldSize || r.LocalRank != want.LocalRank ||
		r.LocalWorldSize != want.LocalWorldSize || r.GroupRank != want.GroupRank || r.GroupWorldSize != want.GroupWorldSize ||
		r.MasterAddr != want.MasterAddr || !slices.Equal(r.GPUs, want.GPUs) {
		t.Fatalf("got %+v, want %+v", r, want)
	}
	r.MasterPort = 29500
	if err := r.Validate(); err != nil {
		t.Fatalf("a rank from a plan must validate once the port is set: %v", err)
	}
	if _, err := RankEnvFromPlan(plan, 5, hosts); !errors.Is(err, ErrInvalidEnv) {
		t.Errorf("missing rank: err = %v", err)
	}
	if _, err := RankEnvFromPlan(plan, 1, map[string]string{"b": "x"}); !errors.Is(err, ErrInvalidEnv) {
		t.Errorf("unknown master node: err = %v", err)
	}
}

// Ranks sharing a GPU (ranks_per_gpu): each rank's CUDA_VISIBLE_DEVICES
// names its GPU, the same one for ranks that share it; LOCAL_RANK and
// LOCAL_WORLD_SIZE count the job's ranks on the node, as without sharing.
func TestEnvOfRanksSharingGPUs(t *testing.T) {
	nodes := []sharding.Node{{ID: "a", GPUs: []sharding.GPU{{Index: 0}, {Index: 1}, {Index: 2}}}}
	// GPU 0 is another job's: the shared group takes GPUs 1 and 2.
	plan, err := sharding.Place(nodes, sharding.Job{ID: "j", Ranks: 3, GPUsPerRank: 1, RanksPerGPU: 2},
		[]sharding.Allocation{{JobID: "other", NodeID: "a", GPUs: []int{0}}})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct{ cuda, local string }{{"1", "0"}, {"1", "1"}, {"2", "2"}}
	for rank, w := range want {
		r, err := RankEnvFromPlan(plan, rank, map[string]string{"a": "10.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		r.MasterPort = 29500
		env, err := BuildEnv(r, nil, nil)
		if err != nil {
			t.Fatal(err)
		}
		got := envMap(env)
		if got[EnvCUDAVisibleDevices] != w.cuda || got[EnvLocalRank] != w.local || got[EnvLocalWorldSize] != "3" ||
			got[EnvRank] != fmt.Sprint(rank) || got[EnvWorldSize] != "3" || got["OMP_NUM_THREADS"] != "1" {
			t.Errorf("rank %d: CUDA_VISIBLE_DEVICES=%q LOCAL_RANK=%q LOCAL_WORLD_SIZE=%q RANK=%q WORLD_SIZE=%q OMP_NUM_THREADS=%q; want %s, %s, 3, %d, 3, 1",
				rank, got[EnvCUDAVisibleDevices], got[EnvLocalRank], got[EnvLocalWorldSize], got[EnvRank], got[EnvWorldSize], got["OMP_NUM_THREADS"], w.cuda, w.local, rank)
		}
	}
}
