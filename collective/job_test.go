package collective

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
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
