package pipeline

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestStageLayersBalancesGivenCosts(t *testing.T) {
	spec := JobSpec{Layers: []int{8, 8, 8, 8, 8}, BatchSize: 8, MicroBatches: 2}.WithDefaults(2)
	got, err := spec.StageLayers(2)
	if err != nil {
		t.Fatal(err)
	}
	if got[0] != [2]int{0, 2} || got[1] != [2]int{2, 4} {
		t.Fatalf("equal layers by multiply-adds: %v, want [0,2) [2,4)", got)
	}
	// the first layer costs as much as the three others together
	spec.LayerCosts = []float64{3, 1, 1, 1}
	if err := spec.Validate(2); err != nil {
		t.Fatal(err)
	}
	if got, err = spec.StageLayers(2); err != nil || got[0] != [2]int{0, 1} || got[1] != [2]int{1, 4} {
		t.Fatalf("by given costs: %v, %v; want [0,1) [1,4)", got, err)
	}
	for _, bad := range [][]float64{{1, 1, 1}, {1, 0, 1, 1}, {1, -2, 1, 1}} {
		spec.LayerCosts = bad
		if err := spec.Validate(2); !errors.Is(err, ErrInvalidSpec) {
			t.Fatalf("layer costs %v accepted (err %v)", bad, err)
		}
	}
}

func TestMeasureLayerCosts(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	spec := JobSpec{Layers: []int{32, 32, 32, 32, 32}, BatchSize: 32, MicroBatches: 4, Seed: 1}
	costs, err := MeasureLayerCosts(ctx, CPU{}, spec, 3)
	if err != nil {
		t.Fatal(err)
	}
	if len(costs) != 4 {
		t.Fatalf("%d costs for 4 layers", len(costs))
	}
	for l, c := range costs {
		if !(c > 0) {
			t.Fatalf("layer %d cost %v", l, c)
		}
	}
	spec.LayerCosts = costs
	if err := spec.WithDefaults(2).Validate(2); err != nil {
		t.Fatalf("measured costs do not validate: %v", err)
	}
	if _, err := MeasureLayerCosts(ctx, CPU{}, spec, 0); !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("reps 0: %v", err)
	}
}

// The MLP bench with measured balance reports the costs and a partition
// that covers every layer.
func TestBenchMeasuredBalance(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cfg := DefaultBenchConfig()
	cfg.Stages, cfg.MicroBatches, cfg.Steps = 2, 4, 1
	cfg.Rows, cfg.Width = 4, 32
	cfg.BandwidthBytes = 0
	cfg.Compute, cfg.Layers, cfg.Balance = ComputeMLP, 5, BalanceMeasured
	res, err := Bench(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(res.LayerCosts) != 5 || len(res.StageLayers) != 2 || res.StageLayers[0][0] != 0 || res.StageLayers[0][1] != res.StageLayers[1][0] || res.StageLayers[1][1] != 5 {
		t.Fatalf("costs %v, stages %v: want 5 costs and 2 stages covering [0,5)", res.LayerCosts, res.StageLayers)
	}
	cfg.Layers = 1
	if _, err := Bench(ctx, cfg); !errors.Is(err, ErrInvalidSpec) {
		t.Fatalf("1 layer over 2 stages accepted: %v", err)
	}
}
