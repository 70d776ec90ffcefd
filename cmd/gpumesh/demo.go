package main

import (
	"fmt"
	"io"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/jobspec"
)

// demoSpec is the job `gpumesh dev --demo` runs: an all-reduce over every
// node whose result each rank checks exactly.
func demoSpec(nodes int) *pb.JobSpec {
	spec := &pb.JobSpec{
		Name:  "demo-allreduce",
		Type:  jobspec.TypeAllReduce,
		Ranks: int32(nodes),
		// One rank per node, so the data crosses the network stack.
		Placement: "spread",
		Allreduce: &pb.AllReduceSpec{Sizes: []string{"1MiB", "16MiB", "64MiB"}, Dtype: "float32", Iters: 5, Device: "cpu"},
	}
	jobspec.ApplyDefaults(spec)
	return spec
}

// demoCheck insists that every rank of the final generation reported a
// checked result.
func demoCheck(resp *pb.GetJobResponse, out io.Writer) error {
	ranks := 0
	for _, al := range resp.Allocations {
		if al.Generation != resp.Job.Generation {
			continue
		}
		ranks++
		m := al.Result.AsMap()
		if ok, _ := m["ok"].(bool); !ok {
			return fmt.Errorf("rank %d did not report a correct result: %v", al.Rank, m)
		}
	}
	if ranks != int(resp.Job.WorldSize) {
		return fmt.Errorf("%d of %d ranks reported", ranks, resp.Job.WorldSize)
	}
	fmt.Fprintf(out, "==> all %d ranks checked the reduced values exactly: OK\n", ranks)
	return nil
}
