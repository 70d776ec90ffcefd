package sharding

import (
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// Place computes a gang placement of job on nodes, given the allocations that
// already hold resources. It is a pure function: the same input (in any
// order) gives the same plan. It builds a Cluster and calls its Place; a
// scheduler that places many jobs in a row should keep one Cluster and call
// Cluster.Place and Cluster.Apply instead, which costs one pass over the
// nodes per placement.
//
// Placement rules:
//   - Gang: every rank of the job, or an error and nothing.
//   - A rank with GPUsPerRank > 0 gets that many whole GPUs of one node, never
//     a GPU held by an existing allocation, never a GPU smaller than
//     Constraints.MinGPUMemoryBytes. GPUs are given lowest index first, and a
//     node's ranks get consecutive blocks of them.
//   - With RanksPerGPU N > 1 (and GPUsPerRank 1), a node takes up to N ranks
//     of the job per free GPU: its ranks fill the lowest free GPUs N at a
//     time (local ranks 0..N-1 share the first, and so on; the last GPU may
//     hold fewer). A GPU given to the job's ranks is held as a whole: no
//     other job is placed on it, however few of the job's ranks use it.
//     Ranks sharing a GPU are always on one node; pack and spread decide
//     how many ranks each node gets, counting N ranks per free GPU.
//   - CPU ranks (GPUsPerRank 0) share a node up to Node.MaxRanks (zero means
//     no cap). They go to nodes without GPUs when those can hold the job, so
//     GPU nodes stay free for GPU work.
//   - Node.MaxRanks caps the ranks of all jobs on a node, GPU ranks included.
//   - Draining and ineligible nodes, and nodes failing a constraint, get nothing.
//   - Pack (the default) uses the fewest nodes: the largest holes first and a
//     best fit for the remainder, so small jobs fill partly used nodes and
//     large holes stay open for large jobs. Pack keeps a job in one
//     availability zone whenever some zone can hold it (a collective that
//     crosses zones pays cross-zone latency and transfer charges on every
//     step); if no zone can, it spans zones rather than wait, unless
//     Constraints.SameAZ is set. Among zones that can hold the job, it takes
//     the plan with the fewest nodes, then the tightest fit, then the zone
//     name.
//   - Spread uses as many nodes as possible, one rank per node per round,
//     alternating availability zones, emptiest nodes first.
//   - Ranks on one node are consecutive; LocalRank counts from 0 on each node;
//     GroupRank is the node's index in the plan, which starts with rank 0's
//     node.
//   - Elastic jobs (0 < MinRanks < Ranks) get as many ranks as fit, from
//     MinRanks up to Ranks.
//
// Errors: ErrInvalidJob or ErrInvalidNodes (wrapped) for malformed input; an
// *UnplaceableError (errors.Is(err, ErrUnplaceable)) with a Reason when the
// job does not fit now.
func Place(nodes []Node, job Job, existing []Allocation) (Plan, error) {
	c, err := newCluster(nodes, existing, false)
	if err != nil {
		return Plan{}, err
	}
	return c.Place(job)
}

// MaxJobRanks bounds a job's ranks (a plan holds one entry per rank).
const MaxJobRanks = 1 << 20

// ValidateJob checks a job for Place.
func ValidateJob(job Job) error {
	switch {
	case job.Ranks > MaxJobRanks:
		return fmt.Errorf("%w: job %q: ranks must be <= %d, got %d", ErrInvalidJob, job.ID, MaxJobRanks, job.Ranks)
	case job.ID == "":
		return fmt.Errorf("%w: job ID must not be empty", ErrInvalidJob)
	case job.Ranks < 1:
		return fmt.Errorf("%w: job %q: ranks must be >= 1, got %d", ErrInvalidJob, job.ID, job.Ranks)
	case job.MinRanks < 0:
		return fmt.Errorf("%w: job %q: min ranks must be >= 0, got %d", ErrInvalidJob, job.ID, job.MinRanks)
	case job.MinRanks > job.Ranks:
		return fmt.Errorf("%w: job %q: min ranks (%d) must not exceed ranks (%d)", ErrInvalidJob, job.ID, job.MinRanks, job.Ranks)
	case job.GPUsPerRank < 0:
		return fmt.Errorf("%w: job %q: GPUs per rank must be >= 0, got %d", ErrInvalidJob, job.ID, job.GPUsPerRank)
	case job.RanksPerGPU < 0:
		return fmt.Errorf("%w: job %q: ranks per GPU must be >= 0, got %d", ErrInvalidJob, job.ID, job.RanksPerGPU)
	case job.RanksPerGPU > 1 && job.GPUsPerRank != 1:
		return fmt.Errorf("%w: job %q: %d ranks per GPU needs 1 GPU per rank, got %d; ask for 1 GPU per rank or drop the sharing", ErrInvalidJob, job.ID, job.RanksPerGPU, job.GPUsPerRank)
	}
	switch job.Placement {
	case "", PlacementPack, PlacementSpread:
	default:
		return fmt.Errorf("%w: job %q: placement must be %q or %q, got %q", ErrInvalidJob, job.ID, PlacementPack, PlacementSpread, job.Placement)
	}
	switch job.Constraints.Lifecycle {
	case "", LifecycleOnDemand, LifecycleSpot, LifecycleUnknown:
	default:
		return fmt.Errorf("%w: job %q: lifecycle constraint must be %q or %q, got %q", ErrInvalidJob, job.ID, LifecycleOnDemand, LifecycleSpot, job.Constraints.Lifecycle)
	}
	if job.GPUsPerRank == 0 && job.Constraints.MinGPUMemoryBytes > 0 {
		return fmt.Errorf("%w: job %q: min GPU memory is set but GPUs per rank is 0; ask for GPUs or drop the constraint", ErrInvalidJob, job.ID)
	}
	return nil
}

// share is how many of the job's ranks may hold one GPU (1: none share).
func (job Job) share() int {
	return max(job.RanksPerGPU, 1)
}

// Cluster is a snapshot of the nodes and what is booked on them, for placing
// many jobs in a row: build it once with NewCluster, then Place a job and
// Apply the plan once it is committed. Place does not change the Cluster.
// A Cluster is not safe for concurrent use.
type Cluster struct {
	nodes []nodeState // sorted by ID
	index map[string]int
	// jobs remembers what each job holds, for ReleaseJob.
	jobs map[string][]Allocation
	// cpuOnly counts nodes without GPUs.
	cpuOnly int
	// scratch is reused by scan to avoid an allocation per placement.
	scratch []candidate
}

type nodeState struct {
	node Node
	gpus []GPU // sorted by Index
	held []bool
	// free counts GPUs not held.
	free int
	// ranks counts ranks (of any job) on the node.
	ranks int
}

// NewCluster builds a Cluster from nodes and the allocations that hold
// resources. Allocations on unknown nodes are ignored (the node is gone);
// GPU ordinals a node does not have are ignored. Node IDs must be unique and
// non-empty, and a node's GPU ordinals unique.
func NewCluster(nodes []Node, existing []Allocation) (*Cluster, error) {
	return newCluster(nodes, existing, true)
}

// newCluster builds the snapshot; trackJobs keeps what each job holds (for
// ReleaseJob), which the one-shot Place does not need.
func newCluster(nodes []Node, existing []Allocation, trackJobs bool) (*Cluster, error) {
	c := &Cluster{
		nodes: make([]nodeState, len(nodes)),
		index: make(map[string]int, len(nodes)),
		jobs:  make(map[string][]Allocation),
	}
	for i, n := range nodes {
		st := nodeState{node: n, gpus: slices.Clone(n.GPUs)}
		st.node.GPUs = nil
		sort.Slice(st.gpus, func(a, b int) bool { return st.gpus[a].Index < st.gpus[b].Index })
		for j := 1; j < len(st.gpus); j++ {
			if st.gpus[j].Index == st.gpus[j-1].Index {
				return nil, fmt.Errorf("%w: node %q lists GPU %d twice", ErrInvalidNodes, n.ID, st.gpus[j].Index)
			}
		}
		st.held = make([]bool, len(st.gpus))
		st.free = len(st.gpus)
		if len(st.gpus) == 0 {
			c.cpuOnly++
		}
		c.nodes[i] = st
	}
	sort.Slice(c.nodes, func(a, b int) bool { return c.nodes[a].node.ID < c.nodes[b].node.ID })
	for i := range c.nodes {
		id := c.nodes[i].node.ID
		if id == "" {
			return nil, fmt.Errorf("%w: a node has an empty ID", ErrInvalidNodes)
		}
		if _, dup := c.index[id]; dup {
			return nil, fmt.Errorf("%w: node ID %q appears twice", ErrInvalidNodes, id)
		}
		c.index[id] = i
	}
	for _, a := range existing {
		i, ok := c.index[a.NodeID]
		if !ok {
			continue
		}
		st := &c.nodes[i]
		st.ranks++
		for _, g := range a.GPUs {
			if k := st.gpuSlot(g); k >= 0 && !st.held[k] {
				st.held[k] = true
				st.free--
			}
		}
		if trackJobs {
			c.jobs[a.JobID] = append(c.jobs[a.JobID], cloneAlloc(a))
		}
	}
	return c, nil
}

func cloneAlloc(a Allocation) Allocation {
	a.GPUs = slices.Clone(a.GPUs)
	return a
}

// gpuSlot returns the position of GPU ordinal g in st.gpus, or -1.
func (st *nodeState) gpuSlot(g int) int {
	k, ok := slices.BinarySearchFunc(st.gpus, g, func(x GPU, t int) int { return x.Index - t })
	if !ok {
		return -1
	}
	return k
}

// exclusion reasons, counted for the error message.
const (
	exDraining = iota
	exIneligible
	exAZ
	exLifecycle
	exInstanceType
	exGPUMemory
	exNoGPUs
	exFull
	exCount
)

// candidate is an eligible node and how many of the job's ranks it can take.
type candidate struct {
	idx int // into Cluster.nodes
	cap int // ranks of this job it can take, at most the job's ranks
	// room is cap before that limit (for best fit); unlimited CPU room is
	// unlimitedRoom.
	room int
}

const unlimitedRoom = 1 << 30

// scan is one pass over the nodes for a job.
type scan struct {
	cands    []candidate // eligible nodes with cap > 0, in ID order
	eligible int         // nodes passing state and constraints
	freeGPUs int         // free GPUs (meeting memory) on eligible nodes
	maxFree  int         // most such GPUs on one eligible node
	// rankLimited counts eligible GPU nodes whose MaxRanks leaves room for
	// some of the job's ranks, but fewer than their free GPUs would take.
	rankLimited int
	excluded    [exCount]int
}

func (c *Cluster) scan(job Job, want int, cpuOnlyNodes bool) scan {
	s := scan{cands: c.scratch[:0]}
	defer func() { c.scratch = s.cands[:0] }()
	con := job.Constraints
	gpr := job.GPUsPerRank
	for i := range c.nodes {
		st := &c.nodes[i]
		n := &st.node
		if job.avoiding && slices.Contains(job.Avoid, n.ID) {
			continue
		}
		switch {
		case n.Draining:
			s.excluded[exDraining]++
			continue
		case n.Ineligible:
			s.excluded[exIneligible]++
			continue
		case con.AZ != "" && n.AZ != con.AZ:
			s.excluded[exAZ]++
			continue
		case con.Lifecycle != "" && lifecycleOf(n) != con.Lifecycle:
			s.excluded[exLifecycle]++
			continue
		case con.InstanceType != "" && n.InstanceType != con.InstanceType:
			s.excluded[exInstanceType]++
			continue
		}
		if cpuOnlyNodes && len(st.gpus) > 0 {
			continue
		}
		capacity := unlimitedRoom
		if gpr > 0 {
			if len(st.gpus) == 0 {
				s.excluded[exNoGPUs]++
				continue
			}
			free := st.free
			if con.MinGPUMemoryBytes > 0 {
				free = 0
				big := 0
				for k, g := range st.gpus {
					if g.MemoryBytes >= con.MinGPUMemoryBytes {
						big++
						if !st.held[k] {
							free++
						}
					}
				}
				if big == 0 {
					s.excluded[exGPUMemory]++
					continue
				}
			}
			s.eligible++
			s.freeGPUs += free
			s.maxFree = max(s.maxFree, free)
			capacity = free / gpr * job.share()
		} else {
			s.eligible++
		}
		if n.MaxRanks > 0 {
			if room := n.MaxRanks - st.ranks; gpr > 0 && room > 0 && room < capacity && room < want {
				s.rankLimited++
			}
			capacity = min(capacity, n.MaxRanks-st.ranks)
		}
		if capacity <= 0 {
			s.excluded[exFull]++
			continue
		}
		s.cands = append(s.cands, candidate{idx: i, cap: min(capacity, want), room: capacity})
	}
	return s
}

func lifecycleOf(n *Node) string {
	if n.Lifecycle == "" {
		return LifecycleUnknown
	}
	return n.Lifecycle
}

// choice is a set of nodes and how many ranks each gets, in plan order.
type choice struct {
	nodes  []candidate // cap holds the ranks given
	slack  int         // capacity of chosen nodes left unused (pack)
	az     string
	placed int
}

// Place computes a plan for job on the current snapshot without changing
// it. See the package-level Place for the rules and errors.
func (c *Cluster) Place(job Job) (Plan, error) {
	if err := ValidateJob(job); err != nil {
		return Plan{}, err
	}
	if len(job.Avoid) > 0 && !job.avoiding {
		// First without the nodes to avoid; then with them.
		strict := job
		strict.avoiding = true
		if p, err := c.Place(strict); err == nil {
			return p, nil
		}
		job.Avoid = nil
	}
	want := job.Ranks
	minRanks := job.MinRanks
	if minRanks == 0 {
		minRanks = want
	}
	if job.GPUsPerRank == 0 && c.cpuOnly > 0 {
		// CPU ranks go to CPU-only nodes when those can hold them all.
		s := c.scan(job, want, true)
		if total(s.cands) >= want {
			if ch, ok := c.choose(job, s.cands, want, want); ok && ch.placed == want {
				return c.buildPlan(job, ch), nil
			}
		}
	}
	s := c.scan(job, want, false)
	tot := total(s.cands)
	if tot < minRanks {
		return Plan{}, c.unplaceable(job, minRanks, tot, s, "")
	}
	ch, ok := c.choose(job, s.cands, min(want, tot), minRanks)
	if !ok {
		best, _ := c.bestAZ(s.cands)
		return Plan{}, c.unplaceable(job, minRanks, best, s, "in one AZ")
	}
	return c.buildPlan(job, ch), nil
}

func (c *Cluster) choose(job Job, cands []candidate, n, minRanks int) (choice, bool) {
	if job.Placement == PlacementSpread {
		return c.spread(cands, n, job.Constraints.SameAZ, minRanks)
	}
	return c.pack(cands, n, job.Constraints.SameAZ, minRanks)
}

func total(cs []candidate) int {
	t := 0
	for _, c := range cs {
		t += c.cap
	}
	return t
}

// byAZ groups candidates by AZ, zones in name order, nodes in ID order.
func (c *Cluster) byAZ(cands []candidate) (azs []string, groups [][]candidate) {
	pos := map[string]int{}
	for _, cd := range cands {
		az := c.nodes[cd.idx].node.AZ
		p, ok := pos[az]
		if !ok {
			p = len(azs)
			pos[az] = p
			azs = append(azs, az)
			groups = append(groups, nil)
		}
		groups[p] = append(groups[p], cd)
	}
	order := make([]int, len(azs))
	for i := range order {
		order[i] = i
	}
	sort.Slice(order, func(a, b int) bool { return azs[order[a]] < azs[order[b]] })
	sa := make([]string, len(azs))
	sg := make([][]candidate, len(azs))
	for i, o := range order {
		sa[i], sg[i] = azs[o], groups[o]
	}
	return sa, sg
}

// bestAZ returns the largest capacity in one zone and that zone.
func (c *Cluster) bestAZ(cands []candidate) (int, string) {
	azs, groups := c.byAZ(cands)
	best, name := 0, ""
	for i, g := range groups {
		if t := total(g); t > best {
			best, name = t, azs[i]
		}
	}
	return best, name
}

func (c *Cluster) pack(cands []candidate, n int, sameAZ bool, minRanks int) (choice, bool) {
	// Fast path, the common case of a job that fits one node: best fit in
	// one pass (smallest capacity that holds n, lowest ID on ties).
	bestI := -1
	for i, cd := range cands {
		if cd.cap >= n && (bestI < 0 || cd.room < cands[bestI].room) {
			bestI = i
		}
	}
	if bestI >= 0 {
		cd := cands[bestI]
		return choice{nodes: []candidate{{idx: cd.idx, cap: n}}, slack: cd.room - n, az: c.nodes[cd.idx].node.AZ, placed: n}, true
	}
	azs, groups := c.byAZ(cands)
	var best choice
	found := false
	for i, g := range groups {
		if total(g) < n {
			continue
		}
		ch := packGreedy(g, n)
		ch.az = azs[i]
		if !found || len(ch.nodes) < len(best.nodes) || (len(ch.nodes) == len(best.nodes) && ch.slack < best.slack) {
			best, found = ch, true
		}
	}
	if found {
		return best, true
	}
	if sameAZ {
		// Elastic jobs may still fit with fewer ranks in one zone.
		most, _ := c.bestAZ(cands)
		if most < minRanks {
			return choice{}, false
		}
		return c.pack(cands, most, true, minRanks)
	}
	return packGreedy(cands, n), true
}

// packGreedy takes the largest nodes until the remainder fits one node, then
// the best fit for the remainder. This uses the fewest nodes possible.
func packGreedy(cands []candidate, n int) choice {
	sorted := slices.Clone(cands)
	sort.SliceStable(sorted, func(a, b int) bool { return sorted[a].cap > sorted[b].cap })
	var ch choice
	rem := n
	for i := 0; rem > 0 && i < len(sorted); i++ {
		if sorted[i].cap >= rem {
			// Best fit: the last node with cap >= rem; on equal capacity
			// the first of them (lowest ID, as the sort is stable).
			j := sort.Search(len(sorted)-i, func(k int) bool { return sorted[i+k].cap < rem }) + i - 1
			// Among those, the least room; then the lowest ID.
			c := sorted[j].cap
			k := j
			for j > i && sorted[j-1].cap == c {
				j--
				if sorted[j].room <= sorted[k].room {
					k = j
				}
			}
			ch.nodes = append(ch.nodes, candidate{idx: sorted[k].idx, cap: rem})
			ch.slack += sorted[k].room - rem
			rem = 0
			break
		}
		ch.nodes = append(ch.nodes, sorted[i])
		rem -= sorted[i].cap
	}
	ch.placed = n - rem
	return ch
}

func (c *Cluster) spread(cands []candidate, n int, sameAZ bool, minRanks int) (choice, bool) {
	azs, groups := c.byAZ(cands)
	if sameAZ {
		// The zone with the most capacity (name order on ties).
		bi, bt := -1, 0
		for i, g := range groups {
			if t := total(g); t > bt {
				bi, bt = i, t
			}
		}
		if bi < 0 || bt < minRanks {
			return choice{}, false
		}
		azs, groups = azs[bi:bi+1], groups[bi:bi+1]
		n = min(n, bt)
	}
	for _, g := range groups {
		sort.SliceStable(g, func(a, b int) bool { return g[a].room > g[b].room })
	}
	// Interleave zones: first node of each zone, then the second, ...
	var order []candidate
	for k := 0; ; k++ {
		added := false
		for _, g := range groups {
			if k < len(g) {
				order = append(order, g[k])
				added = true
			}
		}
		if !added {
			break
		}
	}
	counts := make([]int, len(order))
	placed := 0
	for placed < n {
		progress := false
		for i := range order {
			if placed == n {
				break
			}
			if counts[i] < order[i].cap {
				counts[i]++
				placed++
				progress = true
			}
		}
		if !progress {
			break
		}
	}
	var ch choice
	for i, cd := range order {
		if counts[i] > 0 {
			ch.nodes = append(ch.nodes, candidate{idx: cd.idx, cap: counts[i]})
		}
	}
	ch.placed = placed
	if len(azs) == 1 {
		ch.az = azs[0]
	}
	return ch, placed >= minRanks
}

func (c *Cluster) buildPlan(job Job, ch choice) Plan {
	plan := Plan{JobID: job.ID, Ranks: make([]RankPlacement, 0, ch.placed)}
	gpr := job.GPUsPerRank
	share := job.share()
	if share > 1 {
		plan.RanksPerGPU = share
	}
	minMem := job.Constraints.MinGPUMemoryBytes
	rank := 0
	for g, cd := range ch.nodes {
		st := &c.nodes[cd.idx]
		var free []int
		if gpr > 0 {
			// share > 1 only with gpr 1: cd.cap ranks on ⌈cd.cap/share⌉ GPUs.
			need := (cd.cap*gpr + share - 1) / share
			free = make([]int, 0, need)
			for k, gpu := range st.gpus {
				if !st.held[k] && gpu.MemoryBytes >= minMem && len(free) < need {
					free = append(free, gpu.Index)
				}
			}
		}
		for l := 0; l < cd.cap; l++ {
			rp := RankPlacement{
				Rank:           rank,
				LocalRank:      l,
				LocalWorldSize: cd.cap,
				GroupRank:      g,
				NodeID:         st.node.ID,
			}
			switch {
			case share > 1:
				rp.GPUs = []int{free[l/share]}
			case gpr > 0:
				rp.GPUs = slices.Clone(free[l*gpr : (l+1)*gpr])
			}
			plan.Ranks = append(plan.Ranks, rp)
			rank++
		}
	}
	return plan
}

func (c *Cluster) unplaceable(job Job, wantRanks, fit int, s scan, scope string) *UnplaceableError {
	con := job.Constraints
	var match []string
	if con.AZ != "" {
		match = append(match, "az="+con.AZ)
	}
	if con.Lifecycle != "" {
		match = append(match, "lifecycle="+con.Lifecycle)
	}
	if con.InstanceType != "" {
		match = append(match, "instance_type="+con.InstanceType)
	}
	if con.MinGPUMemoryBytes > 0 {
		match = append(match, "min_gpu_memory="+bytesize.Format(int64(con.MinGPUMemoryBytes)))
	}
	var b strings.Builder
	ranksWord := fmt.Sprintf("%d ranks", wantRanks)
	if wantRanks == 1 {
		ranksWord = "1 rank"
	}
	if job.MinRanks > 0 && job.MinRanks < job.Ranks {
		ranksWord = fmt.Sprintf("at least %d of %d ranks", wantRanks, job.Ranks)
	}
	if share := job.share(); share > 1 && job.GPUsPerRank > 0 {
		fmt.Fprintf(&b, "needs at least %s (%s, up to %d on one GPU)", plural((wantRanks+share-1)/share, "GPU"), ranksWord, share)
	} else if job.GPUsPerRank > 0 {
		fmt.Fprintf(&b, "needs %s (%s × %d", plural(wantRanks*job.GPUsPerRank, "GPU"), ranksWord, job.GPUsPerRank)
		if job.GPUsPerRank > 1 {
			fmt.Fprintf(&b, ", %d on one node per rank", job.GPUsPerRank)
		}
		b.WriteString(")")
	} else {
		fmt.Fprintf(&b, "needs %s (CPU)", ranksWord)
	}
	if len(match) > 0 {
		fmt.Fprintf(&b, " on nodes matching %s", strings.Join(match, ","))
	}
	if scope != "" {
		b.WriteString(" " + scope)
	}
	b.WriteString("; ")
	if job.GPUsPerRank > 0 {
		fmt.Fprintf(&b, "%d free on %s", s.freeGPUs, plural(s.eligible, "eligible node"))
		if job.GPUsPerRank > 1 && s.eligible > 0 {
			fmt.Fprintf(&b, " (at most %d on one node)", s.maxFree)
		}
		if s.rankLimited > 0 {
			fmt.Fprintf(&b, "; max ranks per node leaves room for fewer ranks than free GPUs on %s", plural(s.rankLimited, "node"))
		}
	} else {
		fmt.Fprintf(&b, "room for %d on %s", total(s.cands), plural(s.eligible, "eligible node"))
	}
	if scope != "" {
		fmt.Fprintf(&b, "; room for %d in the best AZ", fit)
	}
	ex := s.excluded
	notes := []struct {
		n    int
		what string
	}{
		{ex[exDraining], "draining"},
		{ex[exIneligible], "ineligible"},
		{ex[exAZ], "in another AZ"},
		{ex[exLifecycle], "of another lifecycle"},
		{ex[exInstanceType], "of another instance type"},
		{ex[exGPUMemory], "with smaller GPUs"},
		{ex[exNoGPUs], "without GPUs"},
		{ex[exFull], "full"},
	}
	for _, nt := range notes {
		if nt.n > 0 {
			fmt.Fprintf(&b, "; %s %s", plural(nt.n, "node"), nt.what)
		}
	}
	if len(c.nodes) == 0 {
		b.WriteString("; the cluster has no nodes")
	}
	return &UnplaceableError{
		JobID:         job.ID,
		Reason:        b.String(),
		WantRanks:     wantRanks,
		FitRanks:      fit,
		EligibleNodes: s.eligible,
		FreeGPUs:      s.freeGPUs,
	}
}

func plural(n int, what string) string {
	if n == 1 {
		return "1 " + what
	}
	return fmt.Sprintf("%d %ss", n, what)
}

// Apply books a plan's resources: its GPUs and one rank slot per rank. It
// checks the whole plan first and changes nothing on error
// (ErrConflict wrapped: a GPU already held, a GPU given to more than
// max(1, plan.RanksPerGPU) of the plan's ranks, an unknown node or GPU, a
// node over MaxRanks).
func (c *Cluster) Apply(plan Plan) error {
	extra := map[int]int{}
	for _, r := range plan.Ranks {
		i, ok := c.index[r.NodeID]
		if !ok {
			return fmt.Errorf("%w: rank %d is on unknown node %q", ErrConflict, r.Rank, r.NodeID)
		}
		extra[i]++
	}
	share := max(plan.RanksPerGPU, 1)
	seen := map[[2]int]int{} // (node, GPU slot) → ranks of the plan on it
	for _, r := range plan.Ranks {
		i := c.index[r.NodeID]
		st := &c.nodes[i]
		for _, g := range r.GPUs {
			k := st.gpuSlot(g)
			if k < 0 {
				return fmt.Errorf("%w: rank %d: node %q has no GPU %d", ErrConflict, r.Rank, r.NodeID, g)
			}
			if st.held[k] {
				return fmt.Errorf("%w: rank %d: GPU %d of node %q is already held", ErrConflict, r.Rank, g, r.NodeID)
			}
			if seen[[2]int{i, k}] == share {
				return fmt.Errorf("%w: rank %d: GPU %d of node %q is already given to %s of the plan", ErrConflict, r.Rank, g, r.NodeID, plural(share, "rank"))
			}
			seen[[2]int{i, k}]++
		}
	}
	for i, n := range extra {
		st := &c.nodes[i]
		if st.node.MaxRanks > 0 && st.ranks+n > st.node.MaxRanks {
			return fmt.Errorf("%w: node %q would run %d ranks, over its limit of %d", ErrConflict, st.node.ID, st.ranks+n, st.node.MaxRanks)
		}
	}
	for _, r := range plan.Ranks {
		st := &c.nodes[c.index[r.NodeID]]
		st.ranks++
		for _, g := range r.GPUs {
			if k := st.gpuSlot(g); !st.held[k] {
				st.held[k] = true
				st.free--
			}
		}
		c.jobs[plan.JobID] = append(c.jobs[plan.JobID], Allocation{JobID: plan.JobID, Rank: r.Rank, NodeID: r.NodeID, GPUs: slices.Clone(r.GPUs)})
	}
	return nil
}

// ReleaseJob frees everything the job holds (from NewCluster's allocations
// and from Apply). Releasing a job that holds nothing does nothing.
func (c *Cluster) ReleaseJob(jobID string) {
	for _, a := range c.jobs[jobID] {
		i, ok := c.index[a.NodeID]
		if !ok {
			continue
		}
		st := &c.nodes[i]
		st.ranks--
		for _, g := range a.GPUs {
			if k := st.gpuSlot(g); k >= 0 && st.held[k] {
				st.held[k] = false
				st.free++
			}
		}
	}
	delete(c.jobs, jobID)
}

// Clone returns an independent copy, for what-if planning (for example:
// release an elastic job's ranks in the copy and see how many would fit
// now) without touching the real snapshot.
func (c *Cluster) Clone() *Cluster {
	d := &Cluster{
		nodes:   make([]nodeState, len(c.nodes)),
		index:   c.index, // never written after NewCluster
		jobs:    make(map[string][]Allocation, len(c.jobs)),
		cpuOnly: c.cpuOnly,
	}
	for i, st := range c.nodes {
		st.held = slices.Clone(st.held)
		d.nodes[i] = st
	}
	for j, as := range c.jobs {
		d.jobs[j] = slices.Clone(as)
	}
	return d
}

// FreeGPUs returns the free GPU ordinals of a node in index order, or nil
// for an unknown node.
func (c *Cluster) FreeGPUs(nodeID string) []int {
	i, ok := c.index[nodeID]
	if !ok {
		return nil
	}
	st := &c.nodes[i]
	var out []int
	for k, g := range st.gpus {
		if !st.held[k] {
			out = append(out, g.Index)
		}
	}
	return out
}

// Allocations turns a plan into the allocations it creates.
func (p Plan) Allocations() []Allocation {
	out := make([]Allocation, len(p.Ranks))
	for i, r := range p.Ranks {
		out[i] = Allocation{JobID: p.JobID, Rank: r.Rank, NodeID: r.NodeID, GPUs: slices.Clone(r.GPUs)}
	}
	return out
}
