package sharding_test

import (
	"errors"
	"fmt"

	"github.com/gpumesh/gpumesh/sharding"
)

func ExampleCluster() {
	gpu := func(i int) sharding.GPU { return sharding.GPU{Index: i, MemoryBytes: 80 << 30} }
	nodes := []sharding.Node{
		{ID: "a", AZ: "us-east-1a", GPUs: []sharding.GPU{gpu(0), gpu(1), gpu(2), gpu(3)}},
		{ID: "b", AZ: "us-east-1a", GPUs: []sharding.GPU{gpu(0), gpu(1)}},
		{ID: "c", AZ: "us-east-1b", GPUs: []sharding.GPU{gpu(0), gpu(1)}, Draining: true},
	}
	c, _ := sharding.NewCluster(nodes, nil)
	plan, _ := c.Place(sharding.Job{ID: "train", Ranks: 3, GPUsPerRank: 2})
	for _, r := range plan.Ranks {
		fmt.Printf("rank %d on %s GPUs %v (local %d of %d, group %d)\n", r.Rank, r.NodeID, r.GPUs, r.LocalRank, r.LocalWorldSize, r.GroupRank)
	}
	_ = c.Apply(plan)
	_, err := c.Place(sharding.Job{ID: "more", Ranks: 1, GPUsPerRank: 1})
	fmt.Println(errors.Is(err, sharding.ErrUnplaceable))
	fmt.Println(err)
	// Output:
	// rank 0 on a GPUs [0 1] (local 0 of 2, group 0)
	// rank 1 on a GPUs [2 3] (local 1 of 2, group 0)
	// rank 2 on b GPUs [0 1] (local 0 of 1, group 1)
	// true
	// job "more" cannot be placed: needs 1 GPU (1 rank × 1); 0 free on 2 eligible nodes; 1 node draining; 2 nodes full
}

func ExamplePartitionLayers() {
	costs := []float64{1, 1, 1, 1, 4, 1, 1, 1}
	p, _ := sharding.PartitionLayers(costs, nil, 3)
	fmt.Println(p.Boundaries(), p.MaxCost)
	// Output: [0 4 5 8] 4
}
