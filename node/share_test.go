package node

import (
	"fmt"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// A built-in rank computes on the GPU it was placed on (ranks sharing one
// get the same); a rank placed without GPUs on its local rank's.
func TestDeviceIndexIsThePlacedGPU(t *testing.T) {
	for _, tc := range []struct {
		al   *pb.Allocation
		want int
	}{
		{&pb.Allocation{LocalRank: 0, Gpus: []int32{3}}, 3},
		{&pb.Allocation{LocalRank: 1, Gpus: []int32{3}}, 3},
		{&pb.Allocation{LocalRank: 1, Gpus: []int32{6, 7}}, 6},
		{&pb.Allocation{LocalRank: 2}, 2},
	} {
		if got := deviceIndex(tc.al); got != tc.want {
			t.Errorf("%v: device %d, want %d", tc.al, got, tc.want)
		}
	}
}

// The autoscaler counts N ranks per GPU for a job whose ranks share GPUs.
func TestNodesForRanksCountsSharedGPUs(t *testing.T) {
	for _, tc := range []struct {
		spec  *pb.JobSpec
		ranks int
		want  int
	}{
		{&pb.JobSpec{GpusPerRank: 1}, 16, 2},
		{&pb.JobSpec{GpusPerRank: 1, RanksPerGpu: 2}, 16, 1},
		{&pb.JobSpec{GpusPerRank: 1, RanksPerGpu: 4}, 40, 2},
		{&pb.JobSpec{GpusPerRank: 2}, 16, 4},
		{&pb.JobSpec{}, 16, 1}, // CPU ranks: 16 per node
	} {
		if got := nodesForRanks(tc.spec, tc.ranks, 8, 16); got != tc.want {
			t.Errorf("%v, %d ranks on 8-GPU nodes: %d nodes, want %d", tc.spec, tc.ranks, got, tc.want)
		}
	}
}

// Ranks sharing a GPU, end to end on one agent with two (fake) GPUs: three
// ranks with ranks_per_gpu 2 are placed as 2 + 1, each task sees its GPU in
// CUDA_VISIBLE_DEVICES (the same for ranks 0 and 1), LOCAL_RANK counts the
// ranks on the node, and generation 2 (after every rank of generation 1
// failed) is placed with the same sharing.
func TestClusterRanksShareGPUs(t *testing.T) {
	dc := startCluster(t, 1, func(_ int, c *Config) {
		c.MaxRanksPerNode = 4 // the default is the CPU count
		c.GPUs = func() []*pb.GPU {
			return []*pb.GPU{{Index: 0, Model: "fake", MemoryBytes: 80 << 30}, {Index: 1, Model: "fake", MemoryBytes: 80 << 30}}
		}
	})
	c := client(t, dc.Leader())
	id := submitJob(t, c, `
name: shared
ranks: 3
gpus_per_rank: 1
ranks_per_gpu: 2
restart: {attempts: 1, delay: 0s}
exec:
  command: ["sh", "-c", "echo rank $RANK local $LOCAL_RANK/$LOCAL_WORLD_SIZE cuda=$CUDA_VISIBLE_DEVICES; [ $GPUMESH_GENERATION -ge 2 ]"]
`)
	final := waitJob(t, c, id, 60*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Status == "complete" })
	if final.Job.Generation != 2 {
		t.Fatalf("job completed at generation %d, want 2 (generation 1 fails on purpose)", final.Job.Generation)
	}
	wantGPU := []string{"0", "0", "1"}
	for gen := uint64(1); gen <= 2; gen++ {
		for r := int32(0); r < 3; r++ {
			out := readLogs(t, c, id, r, gen)
			want := fmt.Sprintf("rank %d local %d/3 cuda=%s\n", r, r, wantGPU[r])
			if !strings.Contains(out, want) {
				t.Errorf("generation %d rank %d: log %q, want %q", gen, r, out, want)
			}
		}
	}
	for _, al := range final.Allocations {
		if len(al.Gpus) != 1 || fmt.Sprint(al.Gpus[0]) != wantGPU[al.Rank] {
			t.Errorf("generation %d rank %d: GPUs %v, want [%s]", al.Generation, al.Rank, al.Gpus, wantGPU[al.Rank])
		}
	}
}
