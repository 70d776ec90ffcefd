package pipeline

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// MeasureLayerCosts times every weight layer of spec's model on dev, as
// JobSpec.LayerCosts for StageLayers: seconds of one micro-batch's forward
// and backward. Each layer runs as a stage of its own (the first with the
// input upload, the last with the loss), reps micro-batches after two
// untimed, in five rounds of which the median counts; the stage overhead every stage pays once whatever its layers
// (receiving and sending a message) is measured as 2·T(one middle layer) −
// T(two middle layers) and taken off every layer, so that a stage's cost is
// the sum of its layers' plus that constant. Models of fewer than four
// layers keep the overhead in. Costs are at least 1% of the largest.
// On an AsyncDevice the layers run as RunJob runs them there (staged
// messages, the loss gradient on the device) and the cost is the device's
// busy time, the time RunJob's stages count as busy; wrap dev in a type
// that hides AsyncDevice to measure the synchronous path.
func MeasureLayerCosts(ctx context.Context, dev Device, spec JobSpec, reps int) ([]float64, error) {
	spec = spec.WithDefaults(1)
	m := spec.model()
	if err := m.Validate(); err != nil {
		return nil, err
	}
	if reps < 1 {
		return nil, fmt.Errorf("%w: layer cost measurement needs reps >= 1, got %d", ErrInvalidSpec, reps)
	}
	n := m.NumLayers()
	// every stage timed in measureRounds rounds, round robin (so that a
	// slow moment of the machine does not land on one layer), the median
	// kept; the last entry is the two-layer stage
	const measureRounds = 5
	ranges := make([][2]int, 0, n+1)
	for l := 0; l < n; l++ {
		ranges = append(ranges, [2]int{l, l + 1})
	}
	if n >= 4 {
		ranges = append(ranges, [2]int{1, 3})
	}
	times := make([][]float64, len(ranges))
	for round := 0; round < measureRounds; round++ {
		for i, r := range ranges {
			t, err := timeStage(ctx, dev, spec, r[0], r[1], reps)
			if err != nil {
				return nil, err
			}
			times[i] = append(times[i], t)
		}
	}
	med := make([]float64, len(ranges))
	for i, ts := range times {
		slices.Sort(ts)
		med[i] = ts[len(ts)/2]
	}
	costs := med[:n]
	if n >= 4 {
		one, two := med[1], med[n]
		if over := 2*one - two; over > 0 {
			for l := range costs {
				costs[l] -= over
			}
		}
	}
	hi := 0.0
	for _, c := range costs {
		hi = max(hi, c)
	}
	for l := range costs {
		costs[l] = max(costs[l], hi/100, 1e-9)
	}
	return costs, nil
}

// timeStage returns the seconds per micro-batch (forward then backward) of
// a stage holding weight layers [start, end).
func timeStage(ctx context.Context, dev Device, spec JobSpec, start, end, reps int) (float64, error) {
	m := spec.model()
	n := m.NumLayers()
	st, err := newMLPStage(dev, m, start, end, start == 0, end == n, spec.MicroBatches, true)
	if err != nil {
		return 0, err
	}
	defer st.Close()
	ad, async := dev.(AsyncDevice)
	if async {
		st.async = ad
	}
	r := st.mbRows
	// non-zero values: a device may skip zeros
	in := &Message{Rows: r, Cols: m.Layers[start], Data: make([]float32, r*m.Layers[start])}
	grad := &Message{Rows: r, Cols: m.Layers[end], Data: make([]float32, r*m.Layers[end])}
	for i := range in.Data {
		in.Data[i] = float32(i%13-6) / 8
	}
	for i := range grad.Data {
		grad.Data[i] = float32(i%7-3) / 1024
	}
	// drain waits for a staged message and gives its memory back, as a
	// stage's sender does
	drain := func(m *Message) error {
		if m == nil {
			return nil
		}
		var err error
		if m.ready != nil {
			err = m.ready()
		}
		m.finishSend()
		return err
	}
	run := func(mb int) error {
		if async {
			if err := ad.BeginBusy(); err != nil {
				return err
			}
		}
		out, err := st.Forward(0, mb, in)
		if err != nil {
			return err
		}
		g, err := st.Backward(0, mb, grad)
		if err == nil && async {
			err = ad.EndBusy()
		}
		return errors.Join(err, drain(out), drain(g))
	}
	for mb := 0; mb < 2; mb++ { // kernels loaded, step 0's data made, memory pooled
		if err := run(mb % spec.MicroBatches); err != nil {
			return 0, err
		}
	}
	if async {
		if _, err := ad.BusySeconds(); err != nil { // the warm-up's
			return 0, err
		}
	}
	t0 := time.Now()
	for i := 0; i < reps; i++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		if err := run((1 + i) % spec.MicroBatches); err != nil {
			return 0, err
		}
	}
	took := time.Since(t0).Seconds()
	if async {
		busy, err := ad.BusySeconds()
		if err != nil {
			return 0, err
		}
		took = busy
		if err := st.addPendingLoss(); err != nil {
			return 0, err
		}
	}
	return took / float64(reps), nil
}

// syncDevice hides a device's AsyncDevice methods: RunJob and
// MeasureLayerCosts then use it as a synchronous device.
type syncDevice struct{ Device }
