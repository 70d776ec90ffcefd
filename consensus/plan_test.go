package consensus

import (
	"errors"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/sharding"
)

func TestPlanJob(t *testing.T) {
	gpuNode := func(id, status string, gpus int) *controlpb.Node {
		n := &controlpb.Node{Id: id, Name: "node-" + id, Status: status}
		for i := 0; i < gpus; i++ {
			n.Gpus = append(n.Gpus, &controlpb.GPU{Index: int32(i), MemoryBytes: 80 << 30})
		}
		return n
	}
	nodes := []*controlpb.Node{gpuNode("a", NodeReady, 2), gpuNode("b", NodeReady, 2), gpuNode("c", NodeDraining, 2), gpuNode("d", NodeDown, 8)}
	busy := []*controlpb.Allocation{
		{JobId: "other", Rank: 0, NodeId: "a", Gpus: []int32{0, 1}, ClientStatus: AllocRunning},
		// Ended ranks and ranks on dead nodes hold nothing.
		{JobId: "old", Rank: 0, NodeId: "b", Gpus: []int32{0, 1}, ClientStatus: AllocComplete},
		{JobId: "gone", Rank: 0, NodeId: "d", Gpus: []int32{0}, ClientStatus: AllocRunning},
	}
	cases := []struct {
		name    string
		spec    *controlpb.JobSpec
		allocs  []*controlpb.Allocation
		nodes   []string // node of each rank, when it places
		because string   // a part of the reason, when it does not
	}{
		{"fits on the free node", &controlpb.JobSpec{Ranks: 2, GpusPerRank: 1, Placement: "pack"}, busy, []string{"b", "b"}, ""},
		{"the busy node's GPUs are taken", &controlpb.JobSpec{Ranks: 3, GpusPerRank: 1, Placement: "pack"}, busy, nil, "needs 3 GPUs"},
		{"without allocations both nodes serve", &controlpb.JobSpec{Ranks: 4, GpusPerRank: 1, Placement: "pack"}, nil, []string{"a", "a", "b", "b"}, ""},
		{"draining and down nodes take nothing", &controlpb.JobSpec{Ranks: 5, GpusPerRank: 1, Placement: "pack"}, nil, nil, "1 node draining"},
		{"ranks share the free node's GPUs", &controlpb.JobSpec{Ranks: 4, GpusPerRank: 1, RanksPerGpu: 2, Placement: "pack"}, busy, []string{"b", "b", "b", "b"}, ""},
		{"sharing needs free GPUs too", &controlpb.JobSpec{Ranks: 5, GpusPerRank: 1, RanksPerGpu: 2, Placement: "pack"}, busy, nil, "needs at least 3 GPUs (5 ranks, up to 2 on one GPU); 2 free"},
		{"a constraint nobody meets", &controlpb.JobSpec{Ranks: 1, GpusPerRank: 1, Placement: "pack", Constraints: &controlpb.Constraints{MinGpuMemory: "100GiB"}}, nil, nil, "min_gpu_memory=100GiB"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := PlanJob(nodes, tc.allocs, tc.spec)
			if tc.because != "" {
				var ue *sharding.UnplaceableError
				if !errors.As(err, &ue) || !errors.Is(err, sharding.ErrUnplaceable) {
					t.Fatalf("got plan %v, err %v; want unplaceable", plan, err)
				}
				if !strings.Contains(ue.Reason, tc.because) {
					t.Fatalf("reason %q does not say %q", ue.Reason, tc.because)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range plan.Ranks {
				got = append(got, r.NodeID)
			}
			if strings.Join(got, ",") != strings.Join(tc.nodes, ",") {
				t.Fatalf("ranks on %v, want %v", got, tc.nodes)
			}
		})
	}
	if _, err := PlanJob(nodes, nil, &controlpb.JobSpec{Ranks: 1, Constraints: &controlpb.Constraints{MinGpuMemory: "lots"}}); !errors.Is(err, ErrInvalidArgument) {
		t.Fatalf("a bad size: %v", err)
	}
}
