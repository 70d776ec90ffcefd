package sharding

import (
	"errors"
	"math"
	"math/rand"
	"reflect"
	"testing"
)

// bruteForce tries every split of n layers into k non-empty stages.
func bruteForce(costs []float64, mem []uint64, k int, limits []uint64) (best float64, ok bool) {
	n := len(costs)
	best = math.Inf(1)
	bounds := make([]int, k+1)
	bounds[k] = n
	var rec func(s, start int)
	rec = func(s, start int) {
		if s == k-1 {
			bounds[s] = start
			worst := 0.0
			for t := 0; t < k; t++ {
				var c float64
				var m uint64
				for j := bounds[t]; j < bounds[t+1]; j++ {
					c += costs[j]
					if mem != nil {
						m += mem[j]
					}
				}
				lim := uint64(math.MaxUint64)
				if len(limits) == 1 {
					lim = limits[0]
				} else if len(limits) == k {
					lim = limits[t]
				}
				if m > lim {
					return
				}
				worst = math.Max(worst, c)
			}
			if worst < best {
				best, ok = worst, true
			}
			return
		}
		bounds[s] = start
		for next := start + 1; next <= n-(k-1-s); next++ {
			bounds[s+1] = next
			rec(s+1, next)
		}
	}
	bounds[0] = 0
	if k == 1 {
		rec(0, 0)
	} else {
		for next := 1; next <= n-(k-1); next++ {
			bounds[1] = next
			rec(1, next)
		}
	}
	return best, ok
}

func TestPartitionLayersBruteForce(t *testing.T) {
	r := rand.New(rand.NewSource(3))
	feasible := 0
	for it := 0; it < 4000; it++ {
		n := 1 + r.Intn(9)
		k := 1 + r.Intn(n)
		costs := make([]float64, n)
		var mem []uint64
		if r.Intn(4) != 0 {
			mem = make([]uint64, n)
		}
		for i := range costs {
			costs[i] = float64(r.Intn(20)) + r.Float64()*float64(r.Intn(2))
			if mem != nil {
				mem[i] = uint64(1 + r.Intn(10))
			}
		}
		var limits []uint64
		switch r.Intn(3) {
		case 1:
			limits = []uint64{uint64(5 + r.Intn(30))}
		case 2:
			for s := 0; s < k; s++ {
				limits = append(limits, uint64(5+r.Intn(30)))
			}
		}
		want, ok := bruteForce(costs, mem, k, limits)
		got, err := PartitionLayers(costs, mem, k, limits...)
		if !ok {
			if !errors.Is(err, ErrInfeasiblePartition) {
				t.Fatalf("case %d: brute force finds no split, PartitionLayers says %+v, %v", it, got, err)
			}
			continue
		}
		feasible++
		if err != nil {
			t.Fatalf("case %d: %v (brute force found %v)", it, err, want)
		}
		if math.Abs(got.MaxCost-want) > 1e-9*math.Max(1, want) {
			t.Fatalf("case %d: max cost %v, brute force %v (costs %v mem %v k %d limits %v: %+v)", it, got.MaxCost, want, costs, mem, k, limits, got)
		}
		// The split itself is valid: contiguous, non-empty, covering, in limits.
		if len(got.Stages) != k || got.Stages[0].Start != 0 || got.Stages[k-1].End != n {
			t.Fatalf("case %d: bad stages %+v", it, got.Stages)
		}
		for s, st := range got.Stages {
			if st.End <= st.Start || (s > 0 && st.Start != got.Stages[s-1].End) {
				t.Fatalf("case %d: stages not contiguous and non-empty: %+v", it, got.Stages)
			}
			lim := uint64(math.MaxUint64)
			if len(limits) == 1 {
				lim = limits[0]
			} else if len(limits) == k {
				lim = limits[s]
			}
			if st.MemoryBytes > lim {
				t.Fatalf("case %d: stage %d uses %d over limit %d", it, s, st.MemoryBytes, lim)
			}
		}
		// Deterministic.
		again, _ := PartitionLayers(costs, mem, k, limits...)
		if !reflect.DeepEqual(got, again) {
			t.Fatalf("case %d: not deterministic", it)
		}
	}
	if feasible < 1000 {
		t.Fatalf("only %d feasible cases; generator too tight", feasible)
	}
}

func TestPartitionLayersTable(t *testing.T) {
	got, err := PartitionLayers([]float64{1, 1, 1, 1, 4, 1, 1, 1}, nil, 3)
	if err != nil {
		t.Fatal(err)
	}
	if b := got.Boundaries(); !reflect.DeepEqual(b, []int{0, 4, 5, 8}) || got.MaxCost != 4 {
		t.Fatalf("boundaries %v max %v, want [0 4 5 8] and 4", b, got.MaxCost)
	}
	// Memory pushes a layer to the next stage even though compute would
	// balance better without the limit.
	got, err = PartitionLayers([]float64{1, 1, 1, 1}, []uint64{3, 3, 1, 1}, 2, 5)
	if err != nil {
		t.Fatal(err)
	}
	if b := got.Boundaries(); !reflect.DeepEqual(b, []int{0, 1, 4}) {
		t.Fatalf("boundaries %v, want [0 1 4]", b)
	}
	for _, tc := range []struct {
		name    string
		costs   []float64
		mem     []uint64
		stages  int
		limits  []uint64
		wantErr error
	}{
		{"no layers", nil, nil, 1, nil, ErrInvalidPartition},
		{"zero stages", []float64{1}, nil, 0, nil, ErrInvalidPartition},
		{"more stages than layers", []float64{1, 2}, nil, 3, nil, ErrInfeasiblePartition},
		{"negative cost", []float64{1, -1}, nil, 1, nil, ErrInvalidPartition},
		{"NaN cost", []float64{math.NaN()}, nil, 1, nil, ErrInvalidPartition},
		{"memory length", []float64{1, 1}, []uint64{1}, 1, nil, ErrInvalidPartition},
		{"limits length", []float64{1, 1, 1}, nil, 3, []uint64{1, 2}, ErrInvalidPartition},
		{"layer too big", []float64{1, 1}, []uint64{1, 10 << 30}, 2, []uint64{8 << 30}, ErrInfeasiblePartition},
		{"total too big", []float64{1, 1, 1}, []uint64{4, 4, 4}, 2, []uint64{5}, ErrInfeasiblePartition},
	} {
		if _, err := PartitionLayers(tc.costs, tc.mem, tc.stages, tc.limits...); !errors.Is(err, tc.wantErr) {
			t.Errorf("%s: err = %v, want %v", tc.name, err, tc.wantErr)
		} else {
			t.Logf("%s: %v", tc.name, err)
		}
	}
}

func BenchmarkPartitionLayers(b *testing.B) {
	costs := make([]float64, 256)
	mem := make([]uint64, 256)
	for i := range costs {
		costs[i] = float64(1 + i%7)
		mem[i] = 1 << 28
	}
	for i := 0; i < b.N; i++ {
		if _, err := PartitionLayers(costs, mem, 16, 8<<30); err != nil {
			b.Fatal(err)
		}
	}
}
