package pipeline

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// countModel counts forwards and can block them until released.
type countModel struct {
	forwards atomic.Int32
	gate     chan struct{} // nil: never blocks
}

func (m *countModel) Forward(step, mb int, in *Message) (*Message, error) {
	if m.gate != nil {
		<-m.gate
	}
	m.forwards.Add(1)
	return &Message{Rows: 1, Cols: 4, Data: make([]float32, 4)}, nil
}
func (m *countModel) Backward(step, mb int, g *Message) (*Message, error) { return nil, nil }
func (m *countModel) EndStep(int) (float64, error)                        { return 0, nil }

// TestBackPressure: when the next stage stops consuming, the previous stage
// stops too, after a fixed number of micro-batches set by the in-flight
// bound, instead of queueing without limit.
func TestBackPressure(t *testing.T) {
	const inFlight = 2
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	links := NewMemPipeline(2, 0) // rendezvous link: no buffering of its own
	producer := &countModel{}
	consumer := &countModel{gate: make(chan struct{})}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for s, m := range []StageModel{producer, consumer} {
		wg.Add(1)
		go func(s int, m StageModel) {
			defer wg.Done()
			_, errs[s] = RunStage(ctx, StageConfig{JobID: "bp", Stage: s, Stages: 2, Schedule: ScheduleInference, MicroBatches: 40, Steps: 1, Links: links[s], InFlight: inFlight}, m)
		}(s, m)
	}
	// Consumer holds micro-batch 0 in Forward; its receive queue (inFlight)
	// and its reader (1) hold more; the link holds none; the producer's
	// send queue (inFlight), its sender (1) and its blocked Post (1) hold
	// the rest.
	want := int32(1 + inFlight + 1 + inFlight + 1 + 1)
	deadline := time.Now().Add(10 * time.Second)
	for producer.forwards.Load() < want {
		if time.Now().After(deadline) {
			t.Fatalf("producer stopped at %d forwards, want it to reach %d", producer.forwards.Load(), want)
		}
		time.Sleep(time.Millisecond)
	}
	// It must stay there while the consumer is blocked.
	stable := time.Now().Add(200 * time.Millisecond)
	for time.Now().Before(stable) {
		if n := producer.forwards.Load(); n > want {
			t.Fatalf("producer ran %d forwards with the consumer blocked; the bound allows %d", n, want)
		}
		time.Sleep(time.Millisecond)
	}
	close(consumer.gate)
	wg.Wait()
	for s, err := range errs {
		if err != nil {
			t.Fatalf("stage %d: %v", s, err)
		}
	}
	if producer.forwards.Load() != 40 || consumer.forwards.Load() != 40 {
		t.Fatalf("forwards %d and %d, want 40", producer.forwards.Load(), consumer.forwards.Load())
	}
}
