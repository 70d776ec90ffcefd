package node

import (
	"testing"

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
