package sharding

import (
	"errors"
	"fmt"
	"math/rand"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"
)

const gib = 1 << 30

func gpus(n int, mem uint64) []GPU {
	out := make([]GPU, n)
	for i := range out {
		out[i] = GPU{Index: i, Model: "test", MemoryBytes: mem}
	}
	return out
}

func node(id, az string, nGPU int) Node {
	return Node{ID: id, Name: id, AZ: az, InstanceType: "p4d.24xlarge", Lifecycle: LifecycleOnDemand, GPUs: gpus(nGPU, 80*gib)}
}

func TestPlaceTable(t *testing.T) {
	type want struct {
		ranks  []string // "node:gpus" per rank, e.g. "n1:0,1"
		err    error
		reason string // substring of the UnplaceableError reason
	}
	cases := []struct {
		name     string
		nodes    []Node
		job      Job
		existing []Allocation
		want     want
	}{
		{
			name:  "pack fits one node, best fit",
			nodes: []Node{node("n1", "a", 8), node("n2", "a", 4), node("n3", "a", 2)},
			job:   Job{ID: "j", Ranks: 2, GPUsPerRank: 1},
			want:  want{ranks: []string{"n3:0", "n3:1"}},
		},
		{
			name:  "pack two GPUs per rank spans the largest nodes",
			nodes: []Node{node("n1", "a", 4), node("n2", "a", 4), node("n3", "a", 2)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 2},
			want:  want{ranks: []string{"n1:0,1", "n1:2,3", "n2:0,1", "n2:2,3"}},
		},
		{
			name:  "pack remainder goes to the best fit",
			nodes: []Node{node("n1", "a", 8), node("n2", "a", 4), node("n3", "a", 2)},
			job:   Job{ID: "j", Ranks: 10, GPUsPerRank: 1},
			want:  want{ranks: []string{"n1:0", "n1:1", "n1:2", "n1:3", "n1:4", "n1:5", "n1:6", "n1:7", "n3:0", "n3:1"}},
		},
		{
			name:     "held GPUs are never given again",
			nodes:    []Node{node("n1", "a", 4)},
			job:      Job{ID: "j", Ranks: 2, GPUsPerRank: 1},
			existing: []Allocation{{JobID: "other", Rank: 0, NodeID: "n1", GPUs: []int{0, 2}}},
			want:     want{ranks: []string{"n1:1", "n1:3"}},
		},
		{
			name:  "spread uses many nodes and alternates zones",
			nodes: []Node{node("n1", "a", 4), node("n2", "a", 4), node("n3", "b", 4)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1, Placement: PlacementSpread},
			// order: a:n1, b:n3, a:n2; counts 2,1,1 -> consecutive ranks per node
			want: want{ranks: []string{"n1:0", "n1:1", "n3:0", "n2:0"}},
		},
		{
			name:  "pack prefers one zone over fewer nodes across zones",
			nodes: []Node{node("a1", "a", 4), node("a2", "a", 4), node("b1", "b", 8)},
			job:   Job{ID: "j", Ranks: 8, GPUsPerRank: 1, Placement: PlacementPack},
			want:  want{ranks: []string{"b1:0", "b1:1", "b1:2", "b1:3", "b1:4", "b1:5", "b1:6", "b1:7"}},
		},
		{
			name:  "pack spans zones when no zone can hold the job",
			nodes: []Node{node("a1", "a", 2), node("b1", "b", 2)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1},
			want:  want{ranks: []string{"a1:0", "a1:1", "b1:0", "b1:1"}},
		},
		{
			name:  "same AZ refuses to span zones",
			nodes: []Node{node("a1", "a", 2), node("b1", "b", 2)},
			job:   Job{ID: "j", Ranks: 4, GPUsPerRank: 1, Constraints: Constraints{SameAZ: true}},
			want:  want{err: ErrUnplaceable, reason: "in one AZ"},
		},
		{
			name:  "elastic takes what fits",
			nodes: []Node{node("n1", "a", 2), node("n2", "a", 1)},
			job:   Job{ID: "j", Ranks: 8, MinRanks: 2, GPUsPerRank: 1},
			want:  want{ranks: []string{"n1:0", "n1:1", "n2:0"}},
		},
		{
			name:  "elastic below minimum waits",
			nodes: []Node{node("n1", "a", 2)},
			job:   Job{ID: "j", Ranks: 8, MinRanks: 3, GPUsPerRank: 1},
			want:  want{err: ErrUnplaceable, reason: "at least 3 of 8 ranks"},
		},
		{
			name: "constraints and draining in the reason",
			nodes: []Node{
				node("n1", "us-east-1a", 2), node("n2", "us-east-1a", 2),
				func() Node { n := node("n3", "us-east-1a", 8); n.Draining = true; return n }(),
				node("n4", "us-east-1b", 8),
			},
			job:  Job{ID: "j", Ranks: 4, GPUsPerRank: 2, Constraints: Constraints{AZ: "us-east-1a"}},
			want: want{err: ErrUnplaceable, reason: "needs 8 GPUs (4 ranks × 2, 2 on one node per rank) on nodes matching az=us-east-1a; 4 free on 2 eligible nodes (at most 2 on one node); 1 node draining; 1 node in another AZ"},
		},
		{
			name: "lifecycle, instance type and GPU memory",
			nodes: []Node{
				func() Node { n := node("spot", "a", 8); n.Lifecycle = LifecycleSpot; return n }(),
				func() Node { n := node("g5", "a", 8); n.InstanceType = "g5.48xlarge"; return n }(),
				func() Node { n := node("small", "a", 8); n.GPUs = gpus(8, 24*gib); return n }(),
				func() Node {
					n := node("mixed", "a", 0)
					n.GPUs = append(gpus(2, 24*gib), GPU{Index: 2, MemoryBytes: 80 * gib}, GPU{Index: 3, MemoryBytes: 80 * gib})
					return n
				}(),
			},
			job:  Job{ID: "j", Ranks: 2, GPUsPerRank: 1, Constraints: Constraints{Lifecycle: LifecycleOnDemand, InstanceType: "p4d.24xlarge", MinGPUMemoryBytes: 40 * gib}},
			want: want{ranks: []string{"mixed:2", "mixed:3"}},
		},
		{
			name:  "ineligible nodes get nothing",
			nodes: []Node{func() Node { n := node("n1", "a", 8); n.Ineligible = true; return n }(), node("n2", "a", 1)},
			job:   Job{ID: "j", Ranks: 2, GPUsPerRank: 1},
			want:  want{err: ErrUnplaceable, reason: "1 node ineligible"},
		},
		{
			name:  "CPU ranks prefer CPU-only nodes and respect MaxRanks",
			nodes: []Node{func() Node { n := node("cpu1", "a", 0); n.MaxRanks = 2; return n }(), func() Node { n := node("cpu2", "a", 0); n.MaxRanks = 3; return n }(), node("gpu", "a", 8)},
			job:   Job{ID: "j", Ranks: 4},
			want:  want{ranks: []string{"cpu2:", "cpu2:", "cpu2:", "cpu1:"}},
		},
		{
			name:     "CPU ranks fall back to GPU nodes",
			nodes:    []Node{func() Node { n := node("cpu1", "a", 0); n.MaxRanks = 1; return n }(), func() Node { n := node("gpu", "a", 8); n.MaxRanks = 4; return n }()},
			job:      Job{ID: "j", Ranks: 4},
			existing: []Allocation{{JobID: "x", NodeID: "gpu", GPUs: []int{0}}},
			want:     want{ranks: []string{"gpu:", "gpu:", "gpu:", "cpu1:"}},
		},
		{
			name:  "MaxRanks caps GPU ranks too",
			nodes: []Node{func() Node { n := node("n1", "a", 8); n.MaxRanks = 2; return n }()},
			job:   Job{ID: "j", Ranks: 3, GPUsPerRank: 1},
			want:  want{err: ErrUnplaceable, reason: "needs 3 GPUs (3 ranks × 1); 8 free on 1 eligible node"},
		},
		{
			name:  "GPU job on CPU-only nodes",
			nodes: []Node{node("cpu", "a", 0)},
			job:   Job{ID: "j", Ranks: 1, GPUsPerRank: 1},
			want:  want{err: ErrUnplaceable, reason: "1 node without GPUs"},
		},
		{
			name: "empty cluster",
			job:  Job{ID: "j", Ranks: 1},
			want: want{err: ErrUnplaceable, reason: "the cluster has no nodes"},
		},
		{name: "zero ranks", nodes: []Node{node("n", "a", 1)}, job: Job{ID: "j"}, want: want{err: ErrInvalidJob}},
		{name: "min over max", nodes: []Node{node("n", "a", 1)}, job: Job{ID: "j", Ranks: 1, MinRanks: 2}, want: want{err: ErrInvalidJob}},
		{name: "bad placement", nodes: []Node{node("n", "a", 1)}, job: Job{ID: "j", Ranks: 1, Placement: "random"}, want: want{err: ErrInvalidJob}},
		{name: "too many ranks", nodes: []Node{node("n", "a", 1)}, job: Job{ID: "j", Ranks: MaxJobRanks + 1}, want: want{err: ErrInvalidJob}},
		{name: "negative GPUs", nodes: []Node{node("n", "a", 1)}, job: Job{ID: "j", Ranks: 1, GPUsPerRank: -1}, want: want{err: ErrInvalidJob}},
		{name: "duplicate node", nodes: []Node{node("n", "a", 1), node("n", "b", 1)}, job: Job{ID: "j", Ranks: 1}, want: want{err: ErrInvalidNodes}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			plan, err := Place(tc.nodes, tc.job, tc.existing)
			if tc.want.err != nil {
				if !errors.Is(err, tc.want.err) {
					t.Fatalf("err = %v, want %v", err, tc.want.err)
				}
				if len(plan.Ranks) != 0 {
					t.Fatalf("error with a partial plan: %+v", plan)
				}
				if tc.want.reason != "" {
					var ue *UnplaceableError
					if !errors.As(err, &ue) {
						t.Fatalf("err %v is not an *UnplaceableError", err)
					}
					if !strings.Contains(ue.Reason, tc.want.reason) {
						t.Fatalf("reason %q does not contain %q", ue.Reason, tc.want.reason)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("Place: %v", err)
			}
			var got []string
			for _, r := range plan.Ranks {
				got = append(got, fmt.Sprintf("%s:%s", r.NodeID, joinInts(r.GPUs)))
			}
			if !reflect.DeepEqual(got, tc.want.ranks) {
				t.Fatalf("plan = %v, want %v", got, tc.want.ranks)
			}
			checkPlan(t, tc.nodes, tc.job, tc.existing, plan)
		})
	}
}

func joinInts(xs []int) string {
	s := make([]string, len(xs))
	for i, x := range xs {
		s[i] = fmt.Sprint(x)
	}
	return strings.Join(s, ",")
}

// checkPlan asserts the invariants every plan must hold.
func checkPlan(t *testing.T, nodes []Node, job Job, existing []Allocation, plan Plan) {
	t.Helper()
	byID := map[string]Node{}
	for _, n := range nodes {
		byID[n.ID] = n
	}
	held := map[string]bool{}
	ranksOn := map[string]int{}
	for _, a := range existing {
		if _, ok := byID[a.NodeID]; !ok {
			continue
		}
		ranksOn[a.NodeID]++
		for _, g := range a.GPUs {
			held[fmt.Sprintf("%s/%d", a.NodeID, g)] = true
		}
	}
	minRanks := job.MinRanks
	if minRanks == 0 {
		minRanks = job.Ranks
	}
	if plan.JobID != job.ID {
		t.Fatalf("plan job %q, want %q", plan.JobID, job.ID)
	}
	if n := len(plan.Ranks); n < minRanks || n > job.Ranks {
		t.Fatalf("plan has %d ranks, want %d..%d", n, minRanks, job.Ranks)
	}
	share := max(job.RanksPerGPU, 1)
	wantShare := 0
	if share > 1 {
		wantShare = share
	}
	if plan.RanksPerGPU != wantShare {
		t.Fatalf("plan ranks per GPU %d, want %d", plan.RanksPerGPU, wantShare)
	}
	usedBy := map[string]int{}          // plan's ranks on each GPU
	gpusOn := map[string]map[int]bool{} // GPUs the plan uses on each node
	var nodeOrder []string
	azs := map[string]bool{}
	for i, r := range plan.Ranks {
		if r.Rank != i {
			t.Fatalf("rank %d at position %d", r.Rank, i)
		}
		n, ok := byID[r.NodeID]
		if !ok {
			t.Fatalf("rank %d on unknown node %q", i, r.NodeID)
		}
		if n.Draining || n.Ineligible {
			t.Fatalf("rank %d on draining/ineligible node %q", i, n.ID)
		}
		c := job.Constraints
		if (c.AZ != "" && n.AZ != c.AZ) || (c.InstanceType != "" && n.InstanceType != c.InstanceType) || (c.Lifecycle != "" && n.Lifecycle != c.Lifecycle) {
			t.Fatalf("rank %d on node %+v violates constraints %+v", i, n, c)
		}
		azs[n.AZ] = true
		if len(r.GPUs) != job.GPUsPerRank {
			t.Fatalf("rank %d has %d GPUs, want %d", i, len(r.GPUs), job.GPUsPerRank)
		}
		for _, g := range r.GPUs {
			k := slices.IndexFunc(n.GPUs, func(x GPU) bool { return x.Index == g })
			if k < 0 {
				t.Fatalf("rank %d given GPU %d that node %q lacks", i, g, n.ID)
			}
			if n.GPUs[k].MemoryBytes < c.MinGPUMemoryBytes {
				t.Fatalf("rank %d given a GPU below the memory constraint", i)
			}
			key := fmt.Sprintf("%s/%d", n.ID, g)
			if held[key] {
				t.Fatalf("GPU %s is held by another allocation (rank %d)", key, i)
			}
			if usedBy[key]++; usedBy[key] > share {
				t.Fatalf("GPU %s given to %d ranks, at most %d may share it (rank %d)", key, usedBy[key], share, i)
			}
			if gpusOn[n.ID] == nil {
				gpusOn[n.ID] = map[int]bool{}
			}
			gpusOn[n.ID][g] = true
		}
		ranksOn[n.ID]++
		if n.MaxRanks > 0 && ranksOn[n.ID] > n.MaxRanks {
			t.Fatalf("node %q over MaxRanks %d", n.ID, n.MaxRanks)
		}
		if len(nodeOrder) == 0 || nodeOrder[len(nodeOrder)-1] != r.NodeID {
			if slices.Contains(nodeOrder, r.NodeID) {
				t.Fatalf("ranks on node %q are not consecutive", r.NodeID)
			}
			nodeOrder = append(nodeOrder, r.NodeID)
			if r.LocalRank != 0 {
				t.Fatalf("rank %d: first on its node with local rank %d", i, r.LocalRank)
			}
		} else if r.LocalRank != plan.Ranks[i-1].LocalRank+1 {
			t.Fatalf("rank %d: local rank %d after %d", i, r.LocalRank, plan.Ranks[i-1].LocalRank)
		}
		if r.GroupRank != len(nodeOrder)-1 {
			t.Fatalf("rank %d: group rank %d, want %d", i, r.GroupRank, len(nodeOrder)-1)
		}
	}
	for i, r := range plan.Ranks {
		cnt := 0
		for _, q := range plan.Ranks {
			if q.NodeID == r.NodeID {
				cnt++
			}
		}
		if r.LocalWorldSize != cnt {
			t.Fatalf("rank %d: local world size %d, want %d", i, r.LocalWorldSize, cnt)
		}
		// Shared ranks use the fewest GPUs: ⌈ranks on the node / share⌉.
		if share > 1 && len(gpusOn[r.NodeID]) != (cnt+share-1)/share {
			t.Fatalf("node %q: %d ranks on %d GPUs, want %d with %d per GPU", r.NodeID, cnt, len(gpusOn[r.NodeID]), (cnt+share-1)/share, share)
		}
	}
	if job.Constraints.SameAZ && len(azs) > 1 {
		t.Fatalf("SameAZ plan spans %d zones", len(azs))
	}
}

// capacities computes, independently of Place, how many of the job's ranks
// each eligible node can take (ignoring the CPU-only preference).
func capacities(nodes []Node, job Job, existing []Allocation) map[string]int {
	held := map[string]bool{}
	ranksOn := map[string]int{}
	for _, a := range existing {
		ranksOn[a.NodeID]++
		for _, g := range a.GPUs {
			held[fmt.Sprintf("%s/%d", a.NodeID, g)] = true
		}
	}
	c := job.Constraints
	out := map[string]int{}
	for _, n := range nodes {
		if n.Draining || n.Ineligible || (c.AZ != "" && n.AZ != c.AZ) || (c.InstanceType != "" && n.InstanceType != c.InstanceType) || (c.Lifecycle != "" && n.Lifecycle != c.Lifecycle) {
			continue
		}
		capacity := job.Ranks
		if job.GPUsPerRank > 0 {
			free := 0
			for _, g := range n.GPUs {
				if g.MemoryBytes >= c.MinGPUMemoryBytes && !held[fmt.Sprintf("%s/%d", n.ID, g.Index)] {
					free++
				}
			}
			capacity = free / job.GPUsPerRank * max(job.RanksPerGPU, 1)
		}
		if n.MaxRanks > 0 {
			capacity = min(capacity, n.MaxRanks-ranksOn[n.ID])
		}
		if capacity > 0 {
			out[n.ID] = min(capacity, job.Ranks)
		}
	}
	return out
}

// minNodes is the fewest nodes that hold n ranks given capacities.
func minNodes(caps []int, n int) int {
	caps = slices.Clone(caps)
	sort.Sort(sort.Reverse(sort.IntSlice(caps)))
	for i, c := range caps {
		n -= c
		if n <= 0 {
			return i + 1
		}
	}
	return -1
}

type randCase struct {
	nodes    []Node
	job      Job
	existing []Allocation
}

func randomCase(r *rand.Rand) randCase {
	azNames := []string{"us-east-1a", "us-east-1b", "us-east-1c"}
	types := []string{"p4d.24xlarge", "g5.12xlarge", "c7i.8xlarge"}
	mems := []uint64{16 * gib, 24 * gib, 80 * gib}
	var rc randCase
	nn := r.Intn(13)
	for i := 0; i < nn; i++ {
		n := Node{
			ID:           fmt.Sprintf("node-%02d", r.Intn(40)),
			AZ:           azNames[r.Intn(len(azNames))],
			InstanceType: types[r.Intn(len(types))],
			Lifecycle:    []string{LifecycleOnDemand, LifecycleSpot}[r.Intn(2)],
			MaxRanks:     []int{0, 0, 2, 4, 8}[r.Intn(5)],
			Draining:     r.Intn(10) == 0,
			Ineligible:   r.Intn(10) == 0,
		}
		if slices.ContainsFunc(rc.nodes, func(x Node) bool { return x.ID == n.ID }) {
			continue
		}
		ng := []int{0, 1, 2, 4, 8}[r.Intn(5)]
		for g := 0; g < ng; g++ {
			n.GPUs = append(n.GPUs, GPU{Index: g, MemoryBytes: mems[r.Intn(len(mems))]})
		}
		r.Shuffle(len(n.GPUs), func(a, b int) { n.GPUs[a], n.GPUs[b] = n.GPUs[b], n.GPUs[a] })
		rc.nodes = append(rc.nodes, n)
	}
	// Existing allocations: random GPUs held by other jobs, including some
	// on nodes that are gone.
	for i, na := 0, r.Intn(10); i < na; i++ {
		a := Allocation{JobID: fmt.Sprintf("old-%d", r.Intn(4)), Rank: i}
		if len(rc.nodes) == 0 || r.Intn(8) == 0 {
			a.NodeID = "gone"
		} else {
			n := rc.nodes[r.Intn(len(rc.nodes))]
			a.NodeID = n.ID
			for _, g := range n.GPUs {
				if r.Intn(3) == 0 {
					a.GPUs = append(a.GPUs, g.Index)
				}
			}
		}
		rc.existing = append(rc.existing, a)
	}
	j := Job{ID: "job", Ranks: 1 + r.Intn(12), GPUsPerRank: []int{0, 1, 1, 2, 4}[r.Intn(5)]}
	if r.Intn(3) == 0 {
		j.MinRanks = 1 + r.Intn(j.Ranks)
	}
	if r.Intn(3) == 0 {
		j.Placement = PlacementSpread
	}
	if r.Intn(4) == 0 {
		j.Constraints.AZ = azNames[r.Intn(len(azNames))]
	}
	if r.Intn(4) == 0 {
		j.Constraints.Lifecycle = LifecycleOnDemand
	}
	if r.Intn(5) == 0 {
		j.Constraints.InstanceType = types[r.Intn(len(types))]
	}
	if j.GPUsPerRank > 0 && r.Intn(4) == 0 {
		j.Constraints.MinGPUMemoryBytes = 24 * gib
	}
	if j.GPUsPerRank == 1 && r.Intn(2) == 0 {
		j.RanksPerGPU = []int{1, 2, 3, 4}[r.Intn(4)]
	}
	if r.Intn(4) == 0 {
		j.Constraints.SameAZ = true
	}
	rc.job = j
	return rc
}

func TestPlaceProperties(t *testing.T) {
	iters := 20000
	if testing.Short() {
		iters = 2000
	}
	r := rand.New(rand.NewSource(1))
	placed := 0
	for it := 0; it < iters; it++ {
		rc := randomCase(r)
		plan, err := Place(rc.nodes, rc.job, rc.existing)

		// Same input in another order gives the same plan.
		nodes2 := slices.Clone(rc.nodes)
		r.Shuffle(len(nodes2), func(a, b int) { nodes2[a], nodes2[b] = nodes2[b], nodes2[a] })
		ex2 := slices.Clone(rc.existing)
		r.Shuffle(len(ex2), func(a, b int) { ex2[a], ex2[b] = ex2[b], ex2[a] })
		plan2, err2 := Place(nodes2, rc.job, ex2)
		if !reflect.DeepEqual(plan, plan2) || fmt.Sprint(err) != fmt.Sprint(err2) {
			t.Fatalf("case %d: not deterministic:\n%+v %v\n%+v %v", it, plan, err, plan2, err2)
		}

		caps := capacities(rc.nodes, rc.job, rc.existing)
		var capList []int
		tot := 0
		azTot := map[string]int{}
		azCaps := map[string][]int{}
		for _, n := range rc.nodes {
			if c, ok := caps[n.ID]; ok {
				capList = append(capList, c)
				tot += c
				azTot[n.AZ] += c
				azCaps[n.AZ] = append(azCaps[n.AZ], c)
			}
		}
		bestAZ := 0
		for _, c := range azTot {
			bestAZ = max(bestAZ, c)
		}
		minRanks := rc.job.MinRanks
		if minRanks == 0 {
			minRanks = rc.job.Ranks
		}
		fits := tot >= minRanks
		if rc.job.Constraints.SameAZ {
			fits = bestAZ >= minRanks
		}
		if err != nil {
			// Gang: nothing, and only when it really does not fit.
			if len(plan.Ranks) != 0 {
				t.Fatalf("case %d: error %v with partial plan", it, err)
			}
			if !errors.Is(err, ErrUnplaceable) {
				t.Fatalf("case %d: unexpected error %v", it, err)
			}
			if fits {
				t.Fatalf("case %d: refused a job that fits (total %d, best AZ %d): %v\n%+v", it, tot, bestAZ, err, rc)
			}
			continue
		}
		placed++
		if !fits {
			t.Fatalf("case %d: placed a job that cannot fit", it)
		}
		checkPlan(t, rc.nodes, rc.job, rc.existing, plan)
		// Elastic: as many ranks as fit.
		wantN := min(rc.job.Ranks, tot)
		if rc.job.Constraints.SameAZ {
			wantN = min(rc.job.Ranks, bestAZ)
		}
		if rc.job.GPUsPerRank > 0 && len(plan.Ranks) != wantN {
			t.Fatalf("case %d: placed %d ranks, %d fit", it, len(plan.Ranks), wantN)
		}
		// Pack uses the fewest nodes of the best zone (or of all zones
		// when no zone holds the job).
		nodesUsed := plan.Ranks[len(plan.Ranks)-1].GroupRank + 1
		if rc.job.GPUsPerRank > 0 && rc.job.Placement != PlacementSpread {
			best := -1
			for _, cs := range azCaps {
				if m := minNodes(cs, len(plan.Ranks)); m > 0 && (best < 0 || m < best) {
					best = m
				}
			}
			if best < 0 {
				best = minNodes(capList, len(plan.Ranks))
			}
			if nodesUsed != best {
				t.Fatalf("case %d: pack used %d nodes, %d suffice\n%+v\n%+v", it, nodesUsed, best, rc, plan)
			}
		}
		// Spread uses as many nodes as it can.
		if rc.job.GPUsPerRank > 0 && rc.job.Placement == PlacementSpread && !rc.job.Constraints.SameAZ {
			if want := min(len(plan.Ranks), len(capList)); nodesUsed != want {
				t.Fatalf("case %d: spread used %d nodes, want %d", it, nodesUsed, want)
			}
		}
	}
	if placed < iters/5 {
		t.Fatalf("only %d of %d random cases placed; the generator is too tight to test much", placed, iters)
	}
}

// TestClusterIncrementalMatchesPlace places jobs one after another on a
// Cluster and checks each plan against the pure Place given the allocations
// so far, and that no GPU is ever booked twice across jobs.
func TestClusterIncrementalMatchesPlace(t *testing.T) {
	r := rand.New(rand.NewSource(7))
	for round := 0; round < 50; round++ {
		rc := randomCase(r)
		c, err := NewCluster(rc.nodes, rc.existing)
		if err != nil {
			t.Fatal(err)
		}
		allocs := slices.Clone(rc.existing)
		for j := 0; j < 30; j++ {
			job := randomCase(r).job
			job.ID = fmt.Sprintf("job-%d", j)
			p1, e1 := c.Place(job)
			p2, e2 := Place(rc.nodes, job, allocs)
			if !reflect.DeepEqual(p1, p2) || fmt.Sprint(e1) != fmt.Sprint(e2) {
				t.Fatalf("round %d job %d: incremental %+v %v != pure %+v %v", round, j, p1, e1, p2, e2)
			}
			if e1 != nil {
				continue
			}
			checkPlan(t, rc.nodes, job, allocs, p1)
			if err := c.Apply(p1); err != nil {
				t.Fatalf("Apply: %v", err)
			}
			if job.GPUsPerRank > 0 {
				if err := c.Apply(p1); !errors.Is(err, ErrConflict) {
					t.Fatalf("applying a plan twice: err = %v, want ErrConflict", err)
				}
			}
			allocs = append(allocs, p1.Allocations()...)
			if j%7 == 3 {
				// Release an earlier job.
				victim := fmt.Sprintf("job-%d", r.Intn(j+1))
				c.ReleaseJob(victim)
				allocs = slices.DeleteFunc(allocs, func(a Allocation) bool { return a.JobID == victim })
			}
		}
	}
}

func TestApplyConflicts(t *testing.T) {
	c, err := NewCluster([]Node{func() Node { n := node("n1", "a", 2); n.MaxRanks = 2; return n }()}, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		plan Plan
	}{
		{"unknown node", Plan{JobID: "j", Ranks: []RankPlacement{{NodeID: "nope"}}}},
		{"unknown GPU", Plan{JobID: "j", Ranks: []RankPlacement{{NodeID: "n1", GPUs: []int{5}}}}},
		{"GPU twice in a plan", Plan{JobID: "j", Ranks: []RankPlacement{{NodeID: "n1", GPUs: []int{0}}, {Rank: 1, NodeID: "n1", GPUs: []int{0}}}}},
		{"over MaxRanks", Plan{JobID: "j", Ranks: []RankPlacement{{NodeID: "n1"}, {Rank: 1, NodeID: "n1"}, {Rank: 2, NodeID: "n1"}}}},
	} {
		if err := c.Apply(tc.plan); !errors.Is(err, ErrConflict) {
			t.Errorf("%s: err = %v, want ErrConflict", tc.name, err)
		}
	}
	// Nothing was booked by the failed applies.
	if got := c.FreeGPUs("n1"); !reflect.DeepEqual(got, []int{0, 1}) {
		t.Fatalf("free GPUs after failed applies = %v", got)
	}
}

// benchCluster is 1,000 nodes with 8 GPUs each in three zones.
func benchCluster(b *testing.B) []Node {
	b.Helper()
	nodes := make([]Node, 1000)
	for i := range nodes {
		nodes[i] = node(fmt.Sprintf("node-%04d", i), fmt.Sprintf("us-east-1%c", 'a'+i%3), 8)
		nodes[i].MaxRanks = 16
	}
	return nodes
}

// BenchmarkClusterPlaceApply places single-rank jobs (one GPU each, or CPU
// ranks) on 1,000 nodes of 8 GPUs, one after another, booking each plan; the
// cluster is rebuilt (untimed) every 8,000 placements, when the GPUs run out.
func BenchmarkClusterPlaceApply(b *testing.B) {
	nodes := benchCluster(b)
	for _, gpr := range []int{1, 0} {
		b.Run(fmt.Sprintf("gpus_per_rank=%d", gpr), func(b *testing.B) {
			var c *Cluster
			for i := 0; i < b.N; i++ {
				if i%8000 == 0 { // 1,000 nodes × 8 GPUs
					b.StopTimer()
					var err error
					if c, err = NewCluster(nodes, nil); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				p, err := c.Place(Job{ID: fmt.Sprintf("job-%d", i), Ranks: 1, GPUsPerRank: gpr})
				if err != nil {
					b.Fatal(err)
				}
				if err := c.Apply(p); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "placements/s")
		})
	}
}

// BenchmarkPlacePure is the pure form (a snapshot built per call) with 1,000
// nodes and 5,000 existing allocations, for comparison.
func BenchmarkPlacePure(b *testing.B) {
	nodes := benchCluster(b)
	var existing []Allocation
	for i := 0; i < 5000; i++ {
		existing = append(existing, Allocation{JobID: fmt.Sprint(i), NodeID: nodes[i%1000].ID, GPUs: []int{i / 1000}})
	}
	for i := 0; i < b.N; i++ {
		if _, err := Place(nodes, Job{ID: "j", Ranks: 4, GPUsPerRank: 2}, existing); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkClusterPlaceLarge places 64-rank, 8-GPU-per-rank jobs (whole
// nodes) with pack, the multi-node path.
func BenchmarkClusterPlaceLarge(b *testing.B) {
	nodes := benchCluster(b)
	c, err := NewCluster(nodes, nil)
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < b.N; i++ {
		if _, err := c.Place(Job{ID: "big", Ranks: 64, GPUsPerRank: 8}); err != nil {
			b.Fatal(err)
		}
	}
}

func TestClusterClone(t *testing.T) {
	c, err := NewCluster([]Node{node("n1", "a", 4)}, []Allocation{{JobID: "elastic", NodeID: "n1", GPUs: []int{0, 1}}})
	if err != nil {
		t.Fatal(err)
	}
	// What if the elastic job were re-placed? In a clone, release it and
	// place it again with more ranks.
	d := c.Clone()
	d.ReleaseJob("elastic")
	p, err := d.Place(Job{ID: "elastic", Ranks: 8, MinRanks: 1, GPUsPerRank: 1})
	if err != nil || len(p.Ranks) != 4 {
		t.Fatalf("clone: %+v %v, want 4 ranks", p, err)
	}
	if err := d.Apply(p); err != nil {
		t.Fatal(err)
	}
	// The original is untouched.
	if got := c.FreeGPUs("n1"); !reflect.DeepEqual(got, []int{2, 3}) {
		t.Fatalf("original free GPUs %v, want [2 3]", got)
	}
	if got := d.FreeGPUs("n1"); len(got) != 0 {
		t.Fatalf("clone free GPUs %v, want none", got)
	}
}
