//go:build cuda

package cudabuf

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/gpumesh/gpumesh/collective"
)

// hostPath hides the peer fast path, so chunks go through ReadChunk and
// ReduceChunk/WriteChunk (pinned staging), as over the network.
type hostPath struct{ collective.Buffer }

// The collective's own ring and recursive doubling over device buffers, in
// one process: every op and dtype, n = 2 (two GPUs) and n = 4 (four ranks on
// two GPUs), through the peer path and through the staged host path.
func TestCommunicatorAllReduceOnDevices(t *testing.T) {
	be := openBackend(t)
	r := rand.New(rand.NewPCG(9, 10))
	cfg := collective.DefaultConfig()
	cfg.Channels = 2
	cfg.ChunkBytes = 64 << 10
	for _, place := range placements(be.NumDevices()) {
		for _, peer := range []bool{true, false} {
			for _, count := range []int{1000, 200003} { // recursive doubling, ring
				for _, dt := range collective.AllDTypes {
					for _, op := range collective.AllOps {
						name := fmt.Sprintf("devs%v/peer=%v/n=%d/%v/%v", place, peer, count, dt, op)
						t.Run(name, func(t *testing.T) {
							allReduceOnce(t, be, r, cfg, place, peer, count, dt, op)
						})
					}
				}
			}
		}
	}
}

func allReduceOnce(t *testing.T, be *Backend, r *rand.Rand, cfg collective.Config, place []int, peer bool, count int, dt collective.DType, op collective.Op) {
	nr := len(place)
	_, comms, err := collective.NewLocalGroup("cuda-test", 1, nr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer collective.CloseAll(comms)
	bufs := make([]*Buffer, nr)
	ins := make([]*collective.HostBuffer, nr)
	for k, d := range place {
		ins[k] = smallInts(r, dt, count, op)
		b, err := be.NewBuffer(d, dt, count)
		if err != nil {
			t.Fatal(err)
		}
		defer b.Free()
		if err := b.Upload(ins[k].Bytes()); err != nil {
			t.Fatal(err)
		}
		bufs[k] = b
	}
	ref := hostRef(op, ins)
	errs := collective.RunAll(comms, func(c *collective.Communicator) error {
		var b collective.Buffer = bufs[c.Rank()]
		if !peer {
			b = hostPath{b}
		}
		return c.AllReduce(context.Background(), b, op)
	})
	for k, err := range errs {
		if err != nil {
			t.Fatalf("rank %d: %v", k, err)
		}
	}
	// The path the chunks took: with the peer path, a ring (not recursive
	// doubling, which sends whole small buffers with payload) reads nothing
	// to the host and moves every chunk device to device; hidden behind
	// hostPath, every chunk is staged.
	ring := count*dt.Size() > cfg.SmallBytes
	for k, b := range bufs {
		st := b.Stats()
		switch {
		case peer && ring && (st.StagedReads != 0 || st.StagedWrites != 0 || st.PeerChunks == 0):
			t.Errorf("rank %d: peer path: %+v, want only peer chunks", k, st)
		case !peer && (st.PeerChunks != 0 || st.StagedReads == 0 || st.StagedWrites == 0):
			t.Errorf("rank %d: staged path: %+v, want only staged chunks", k, st)
		}
	}
	for k, b := range bufs {
		got := make([]byte, count*dt.Size())
		if err := b.Download(got); err != nil {
			t.Fatal(err)
		}
		t.Logf("rank %d on device %d", k, place[k])
		compareBytes(t, dt, got, ref.Bytes())
	}
}
