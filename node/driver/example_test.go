package driver_test

import (
	"fmt"
	"strings"

	"github.com/gpumesh/gpumesh/node/driver"
)

// The environment of rank 3 of a 4-rank job placed two ranks per node, as
// the exec driver gives it to a torchrun-style script.
func ExampleBuildEnv() {
	env, err := driver.BuildEnv(driver.RankEnv{
		JobID: "train", Generation: 2, RestartCount: 1, MaxRestarts: 3,
		Rank: 3, WorldSize: 4, LocalRank: 1, LocalWorldSize: 2, GroupRank: 1, GroupWorldSize: 2,
		MasterAddr: "10.0.0.1", MasterPort: 29500, GPUs: []int{2, 3},
		NodeAddr: "10.0.0.2:7947", AllocDir: "/var/lib/gpumesh/alloc/train/2/3",
	}, []string{"PATH=/usr/bin:/bin"}, map[string]string{"NCCL_DEBUG": "WARN"})
	if err != nil {
		panic(err)
	}
	fmt.Println(strings.Join(env, "\n"))
	// Output:
	// CUDA_DEVICE_ORDER=PCI_BUS_ID
	// CUDA_VISIBLE_DEVICES=2,3
	// GPUMESH_ADDR=10.0.0.2:7947
	// GPUMESH_ALLOC_DIR=/var/lib/gpumesh/alloc/train/2/3
	// GPUMESH_GENERATION=2
	// GPUMESH_JOB_ID=train
	// GPUMESH_PREEMPT_DEADLINE_FILE=/var/lib/gpumesh/alloc/train/2/3/preempt_deadline
	// GPUMESH_RANK=3
	// GROUP_RANK=1
	// GROUP_WORLD_SIZE=2
	// LOCAL_RANK=1
	// LOCAL_WORLD_SIZE=2
	// MASTER_ADDR=10.0.0.1
	// MASTER_PORT=29500
	// NCCL_DEBUG=WARN
	// OMP_NUM_THREADS=1
	// PATH=/usr/bin:/bin
	// PYTHONUNBUFFERED=1
	// RANK=3
	// ROLE_NAME=default
	// ROLE_RANK=3
	// ROLE_WORLD_SIZE=4
	// TORCHELASTIC_ERROR_FILE=/var/lib/gpumesh/alloc/train/2/3/error.json
	// TORCHELASTIC_MAX_RESTARTS=3
	// TORCHELASTIC_RESTART_COUNT=1
	// TORCHELASTIC_RUN_ID=train
	// TORCHELASTIC_USE_AGENT_STORE=False
	// TORCH_NCCL_ASYNC_ERROR_HANDLING=1
	// WORLD_SIZE=4
}
