//go:build cuda

package cudabuf_test

import (
	"context"
	"fmt"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/collective/cudabuf"
	"github.com/gpumesh/gpumesh/cuda"
)

// Two ranks in one process, one per GPU: a LocalRing all-reduce moves every
// chunk by peer access and peer copies, never through the host.
func ExampleLocalRing() {
	be, err := cudabuf.Open(cuda.DefaultConfig())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer be.Close()
	var bufs []*cudabuf.Buffer
	for r := 0; r < 2; r++ {
		b, err := be.NewBuffer(r%be.NumDevices(), collective.Float32, 1<<20)
		if err != nil {
			fmt.Println(err)
			return
		}
		defer b.Free()
		bufs = append(bufs, b)
	}
	ring, err := cudabuf.NewLocalRing(bufs, 0)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer ring.Close()
	fmt.Println(ring.AllReduce(collective.OpSum))
}

// Ranks over the network: a device Buffer goes to the collective's
// Communicator like any other Buffer.
func ExampleBuffer_communicator() {
	be, err := cudabuf.Open(cuda.DefaultConfig())
	if err != nil {
		fmt.Println(err)
		return
	}
	defer be.Close()
	buf, err := be.NewBuffer(0, collective.BFloat16, 1<<20)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer buf.Free()
	var comm *collective.Communicator // from collective.New over NetTransport
	if comm != nil {
		fmt.Println(comm.AllReduce(context.Background(), buf, collective.OpAvg))
	}
}
