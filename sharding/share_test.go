package sharding

import (
	"errors"
	"fmt"
	"reflect"
	"strings"
	"testing"
)

// TestPlaceRanksPerGPU: up to RanksPerGPU ranks of a job on each GPU, the
// fewest GPUs per node, never a GPU another job holds (even one its shared
// group leaves partly unused), gang as before.
func TestPlaceRanksPerGPU(t *testing.T) {
	capped := node("n1", "a", 4)
	capped.MaxRanks = 2
	cases := []struct {
		name     string
		nodes    []Node
		job      Job
		existing []Allocation
		ranks    []string // "node:gpu" per rank
		err      error
		reason   string
	}{
		{
			name:  "two ranks per GPU fill the lowest GPUs",
			nodes: []Node{node("n1", "a", 4)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1, RanksPerGPU: 2},
			ranks: []string{"n1:0", "n1:0", "n1:1", "n1:1"},
		},
		{
			name:  "the last GPU may hold fewer",
			nodes: []Node{node("n1", "a", 4)},
			job:   Job{ID: "j", Ranks: 5, GPUsPerRank: 1, RanksPerGPU: 2},
			ranks: []string{"n1:0", "n1:0", "n1:1", "n1:1", "n1:2"},
		},
		{
			name:  "one GPU holds every rank",
			nodes: []Node{node("n1", "a", 1)},
			job:   Job{ID: "j", Ranks: 2, GPUsPerRank: 1, RanksPerGPU: 2},
			ranks: []string{"n1:0", "n1:0"},
		},
		{
			name:  "ranks_per_gpu 1 is the old placement",
			nodes: []Node{node("n1", "a", 4)},
			job:   Job{ID: "j", Ranks: 2, GPUsPerRank: 1, RanksPerGPU: 1},
			ranks: []string{"n1:0", "n1:1"},
		},
		{
			name:     "a partly used shared GPU of another job is not given",
			nodes:    []Node{node("n1", "a", 2)},
			job:      Job{ID: "j", Ranks: 1, GPUsPerRank: 1, RanksPerGPU: 2},
			existing: []Allocation{{JobID: "other", Rank: 0, NodeID: "n1", GPUs: []int{0}}},
			ranks:    []string{"n1:1"},
		},
		{
			name:  "pack puts the gang on the fewest nodes",
			nodes: []Node{node("n1", "a", 2), node("n2", "a", 2)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1, RanksPerGPU: 2},
			ranks: []string{"n1:0", "n1:0", "n1:1", "n1:1"},
		},
		{
			name:  "pack spans nodes counting N ranks per free GPU",
			nodes: []Node{node("n1", "a", 2), node("n2", "a", 1)},
			job:   Job{ID: "j", Ranks: 6, GPUsPerRank: 1, RanksPerGPU: 2},
			ranks: []string{"n1:0", "n1:0", "n1:1", "n1:1", "n2:0", "n2:0"},
		},
		{
			name:  "spread spreads over nodes, then shares on each",
			nodes: []Node{node("n1", "a", 2), node("n2", "a", 2)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1, RanksPerGPU: 2, Placement: PlacementSpread},
			ranks: []string{"n1:0", "n1:0", "n2:0", "n2:0"},
		},
		{
			name:  "elastic takes what N per GPU allows",
			nodes: []Node{node("n1", "a", 1)},
			job:   Job{ID: "j", Ranks: 8, MinRanks: 2, GPUsPerRank: 1, RanksPerGPU: 3},
			ranks: []string{"n1:0", "n1:0", "n1:0"},
		},
		{
			name:     "more GPUs than free: nothing",
			nodes:    []Node{node("n1", "a", 2)},
			job:      Job{ID: "j", Ranks: 4, GPUsPerRank: 1, RanksPerGPU: 2},
			existing: []Allocation{{JobID: "other", Rank: 0, NodeID: "n1", GPUs: []int{1}}},
			err:      ErrUnplaceable,
			reason:   "needs at least 2 GPUs (4 ranks, up to 2 on one GPU); 1 free on 1 eligible node",
		},
		{
			name:   "MaxRanks still caps the ranks of a node",
			nodes:  []Node{capped},
			job:    Job{ID: "j", Ranks: 3, GPUsPerRank: 1, RanksPerGPU: 4},
			err:    ErrUnplaceable,
			reason: "needs at least 1 GPU (3 ranks, up to 4 on one GPU); 4 free on 1 eligible node; max ranks per node leaves room for fewer ranks than free GPUs on 1 node",
		},
		{name: "sharing needs one GPU per rank", nodes: []Node{node("n1", "a", 4)}, job: Job{ID: "j", Ranks: 2, GPUsPerRank: 2, RanksPerGPU: 2}, err: ErrInvalidJob, reason: "needs 1 GPU per rank, got 2"},
		{name: "sharing needs GPUs", nodes: []Node{node("n1", "a", 4)}, job: Job{ID: "j", Ranks: 2, RanksPerGPU: 2}, err: ErrInvalidJob, reason: "needs 1 GPU per rank, got 0"},
		{name: "negative ranks per GPU", nodes: []Node{node("n1", "a", 4)}, job: Job{ID: "j", Ranks: 2, GPUsPerRank: 1, RanksPerGPU: -1}, err: ErrInvalidJob, reason: "must be >= 0"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := Place(tc.nodes, tc.job, tc.existing)
			if tc.err != nil {
				if !errors.Is(err, tc.err) || len(plan.Ranks) != 0 {
					t.Fatalf("got %v and %d ranks, want %v and none", err, len(plan.Ranks), tc.err)
				}
				if !strings.Contains(err.Error(), tc.reason) {
					t.Fatalf("error %q does not say %q", err, tc.reason)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, r := range plan.Ranks {
				got = append(got, fmt.Sprintf("%s:%s", r.NodeID, joinInts(r.GPUs)))
			}
			if !reflect.DeepEqual(got, tc.ranks) {
				t.Fatalf("plan = %v, want %v", got, tc.ranks)
			}
			checkPlan(t, tc.nodes, tc.job, tc.existing, plan)
		})
	}
}

// TestSharedGPUsAreBookedWhole: once a shared group is applied, its GPUs
// are taken for every other job until the job is released; a plan may put
// at most RanksPerGPU of its ranks on one GPU.
func TestSharedGPUsAreBookedWhole(t *testing.T) {
	c, err := NewCluster([]Node{node("n1", "a", 2)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	shared, err := c.Place(Job{ID: "shared", Ranks: 3, GPUsPerRank: 1, RanksPerGPU: 4})
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Apply(shared); err != nil {
		t.Fatalf("Apply of 3 ranks on one GPU with 4 per GPU: %v", err)
	}
	if got := c.FreeGPUs("n1"); !reflect.DeepEqual(got, []int{1}) {
		t.Fatalf("free GPUs = %v, want [1]", got)
	}
	// Another sharing job gets the other GPU, not a slot on GPU 0.
	p, err := c.Place(Job{ID: "next", Ranks: 2, GPUsPerRank: 1, RanksPerGPU: 2})
	if err != nil || joinInts(p.Ranks[0].GPUs) != "1" || joinInts(p.Ranks[1].GPUs) != "1" {
		t.Fatalf("second shared job: %+v %v, want both ranks on GPU 1", p, err)
	}
	if _, err := c.Place(Job{ID: "more", Ranks: 1, GPUsPerRank: 1}); err != nil {
		t.Fatalf("one free GPU left, Place: %v", err)
	}
	if err := c.Apply(p); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Place(Job{ID: "more", Ranks: 1, GPUsPerRank: 1, RanksPerGPU: 8}); !errors.Is(err, ErrUnplaceable) {
		t.Fatalf("no free GPU: err = %v, want ErrUnplaceable", err)
	}
	// Releasing the job frees its shared GPU once, for anyone.
	c.ReleaseJob("shared")
	if got := c.FreeGPUs("n1"); !reflect.DeepEqual(got, []int{0}) {
		t.Fatalf("free GPUs after release = %v, want [0]", got)
	}
	// Rebuilt from the allocations (as the scheduler does), the same holds.
	d, err := NewCluster([]Node{node("n1", "a", 2)}, p.Allocations())
	if err != nil {
		t.Fatal(err)
	}
	if got := d.FreeGPUs("n1"); !reflect.DeepEqual(got, []int{0}) {
		t.Fatalf("free GPUs from allocations = %v, want [0]", got)
	}

	over := Plan{JobID: "over", RanksPerGPU: 2, Ranks: []RankPlacement{
		{Rank: 0, NodeID: "n1", GPUs: []int{0}}, {Rank: 1, NodeID: "n1", GPUs: []int{0}}, {Rank: 2, NodeID: "n1", GPUs: []int{0}}}}
	if err := d.Apply(over); !errors.Is(err, ErrConflict) {
		t.Fatalf("3 ranks on one GPU with 2 per GPU: err = %v, want ErrConflict", err)
	}
	if err := d.Apply(Plan{JobID: "over", RanksPerGPU: 2, Ranks: over.Ranks[:2]}); err != nil {
		t.Fatalf("2 ranks on one GPU with 2 per GPU: %v", err)
	}
	if err := d.Apply(Plan{JobID: "steal", RanksPerGPU: 2, Ranks: []RankPlacement{{NodeID: "n1", GPUs: []int{0}}}}); !errors.Is(err, ErrConflict) {
		t.Fatalf("another job on a shared GPU: err = %v, want ErrConflict", err)
	}
}
