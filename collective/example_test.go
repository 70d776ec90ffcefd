package collective_test

import (
	"context"
	"fmt"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/internal/bytesize"
)

// Two ranks all-reduce over loopback gRPC, each with its own data-plane
// server (as two nodes would).
func Example() {
	g, err := collective.NewLoopbackGroup("job-1", 1, 2, collective.DefaultConfig(), collective.DefaultNetConfig())
	if err != nil {
		panic(err)
	}
	defer g.Close()
	bufs := []*collective.HostBuffer{
		collective.Float32s([]float32{1, 2, 3}),
		collective.Float32s([]float32{10, 20, 30}),
	}
	errs := collective.RunAll(g.Comms, func(c *collective.Communicator) error {
		return c.AllReduce(context.Background(), bufs[c.Rank()], collective.OpSum)
	})
	fmt.Println(errs[0], errs[1], bufs[0].AsFloat32(), bufs[1].AsFloat32())
	// Output: <nil> <nil> [11 22 33] [11 22 33]
}

// The built-in allreduce job on an in-process group: every rank checks the
// result exactly and reports bus bandwidth per size. Ranks of one process
// reduce each other's buffers in place (the same-process path).
func ExampleRunAllReduceJob() {
	_, comms, err := collective.NewLocalGroup("job-2", 1, 4, collective.DefaultConfig())
	if err != nil {
		panic(err)
	}
	defer collective.CloseAll(comms)
	sizes, _ := bytesize.ParseList("4KiB,1MiB")
	reps := make([]collective.AllReduceReport, len(comms))
	collective.RunAll(comms, func(c *collective.Communicator) error {
		var err error
		reps[c.Rank()], err = collective.RunAllReduceJob(context.Background(), c,
			collective.AllReduceJobSpec{Sizes: sizes, DType: collective.BFloat16, Iters: 2, Device: "cpu"}, nil)
		return err
	})
	for _, r := range reps[0].Results {
		fmt.Println(bytesize.Format(r.Bytes), r.Algorithm, "wrong:", r.Wrong)
	}
	// Output:
	// 4KiB same-process wrong: 0
	// 1MiB same-process wrong: 0
}
