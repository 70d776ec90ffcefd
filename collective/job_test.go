package collective

import (
	"context"
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"sync"
	"testing"
)

func TestRunAllReduceJob(t *testing.T) {
	for _, dt := range []DType{Float32, BFloat16, Uint8} {
		_, comms, err := NewLocalGroup("job", 1, 3, testConfig())
		if err != nil {
			t.Fatal(err)
		}
		reps := make([]AllReduceReport, 3)
		errs := RunAll(comms, func(c *Communicator) error {
			var err error
			reps[c.Rank()], err = RunAllReduceJob(context.Background(), c, AllReduceJobSpec{Sizes: []int64{12, 6 << 10, 96 << 10}, DType: dt, Iters: 3, Device: "cpu"}, nil)
			return err
		})
		CloseAll(comms)
		noErrs(t, errs)
		for r, rep := range reps {
			if rep.Rank != r || rep.Ranks != 3 || len(rep.Results) != 3 || rep.Wrong != 0 || rep.Device != "cpu" {
				t.Fatalf("%v rank %d report %+v", dt, r, rep)
			}
			for _, res := range rep.Results {
				if res.BusBWGBps <= 0 || res.TimeUs <= 0 || res.Count != res.Bytes/int64(dt.Size()) {
					t.Fatalf("%v: bad result %+v", dt, res)
				}
			}
		}
		if reps[0].Results[0].Algorithm != "recursive-doubling" || reps[0].Results[2].Algorithm != "ring" {
			t.Fatalf("algorithms: %+v", reps[0].Results)
		}
		b, err := json.Marshal(reps[0])
		if err != nil || !strings.Contains(string(b), `"busbw_gbps"`) {
			t.Fatalf("json: %s %v", b, err)
		}
	}
}

// A rank that computes garbage is caught by the exact check.
func TestRunAllReduceJobDetectsWrongResults(t *testing.T) {
	_, comms, err := NewLocalGroup("job", 1, 2, testConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer CloseAll(comms)
	corrupted := 0
	// Corrupt through a buffer that lies about its reduction.
	RegisterDevice(lyingDevice{})
	errs := RunAll(comms, func(c *Communicator) error {
		dev := "cpu"
		if c.Rank() == 1 {
			dev = "lying"
		}
		_, err := RunAllReduceJob(context.Background(), c, AllReduceJobSpec{Sizes: []int64{64 << 10}, Iters: 1, Device: dev}, nil)
		return err
	})
	for _, err := range errs {
		if errors.Is(err, ErrCheckFailed) {
			corrupted++
		}
	}
	if corrupted == 0 {
		t.Fatalf("no rank saw the wrong values: %v", errs)
	}
}

type lyingDevice struct{}

func (lyingDevice) Name() string { return "lying" }
func (lyingDevice) Alloc(_ int, dt DType, n int) (Buffer, error) {
	return &lyingBuffer{HostBuffer: NewHostBuffer(dt, n)}, nil
}

type lyingBuffer struct{ *HostBuffer }

func (l *lyingBuffer) ReduceChunk(off int, src Segments, op Op) error { return nil }
func (l *lyingBuffer) PeerReduce(int, Buffer, int, int, Op) (bool, error) {
	return true, nil
}

func TestLookupDevice(t *testing.T) {
	if d, err := LookupDevice("cpu"); err != nil || d.Name() != "cpu" {
		t.Fatal(d, err)
	}
	if _, err := LookupDevice("cuda"); !errors.Is(err, ErrNoDevice) || !strings.Contains(err.Error(), "-tags cuda") {
		t.Fatalf("cuda without a backend: %v", err)
	}
	if d, _ := LookupDevice("auto"); d.Name() != "cpu" {
		t.Fatalf("auto without cuda: %v", d.Name())
	}
}

// indexDevice is the host device that records the device index each Alloc
// was given.
type indexDevice struct {
	mu  *sync.Mutex
	got map[int]bool
}

func (indexDevice) Name() string { return "index" }
func (d indexDevice) Alloc(gpu int, dt DType, n int) (Buffer, error) {
	d.mu.Lock()
	d.got[gpu] = true
	d.mu.Unlock()
	return NewHostBuffer(dt, n), nil
}

// The allreduce job computes on the GPU its rank was placed on (ranks that
// share a GPU name the same one); without one, its local rank picks.
func TestRunAllReduceJobUsesThePlacedGPU(t *testing.T) {
	for _, tc := range []struct {
		name string
		gpus func(rank int) []int
		want map[int]bool
	}{
		{"two ranks share GPU 3", func(int) []int { return []int{3} }, map[int]bool{3: true}},
		{"a GPU each", func(r int) []int { return []int{5 + r} }, map[int]bool{5: true, 6: true}},
		{"no GPUs: local ranks", func(int) []int { return nil }, map[int]bool{0: true, 1: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, comms, err := NewLocalGroup("job-"+strings.ReplaceAll(tc.name, " ", "-"), 1, 2, testConfig())
			if err != nil {
				t.Fatal(err)
			}
			defer CloseAll(comms)
			dev := indexDevice{mu: &sync.Mutex{}, got: map[int]bool{}}
			RegisterDevice(dev)
			for _, err := range RunAll(comms, func(c *Communicator) error {
				_, err := RunAllReduceJob(context.Background(), c, AllReduceJobSpec{Sizes: []int64{4 << 10}, Iters: 1, Device: "index",
					LocalRank: c.Rank(), GPUs: tc.gpus(c.Rank())}, nil)
				return err
			}) {
				if err != nil {
					t.Fatal(err)
				}
			}
			if !reflect.DeepEqual(dev.got, tc.want) {
				t.Fatalf("allocated on device indexes %v, want %v", dev.got, tc.want)
			}
		})
	}
}
