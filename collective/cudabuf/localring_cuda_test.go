//go:build cuda

package cudabuf

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// smallInts fills rank r's host copy with values that make every op exact in
// every dtype for up to 8 ranks: [-8, 8) for sums, {1, 2} for products.
// hostRef is the host reference of an all-reduce of inputs (in rank
// order): op folded over them from the first, divided by their number for
// OpAvg.
func hostRef(op collective.Op, inputs []*collective.HostBuffer) *collective.HostBuffer {
	ref := collective.NewHostBuffer(inputs[0].DType(), inputs[0].Len())
	copy(ref.Bytes(), inputs[0].Bytes())
	for _, h := range inputs[1:] {
		ref.ReduceChunk(0, collective.Segments{h.Bytes()}, op)
	}
	if op == collective.OpAvg {
		ref.DivChunk(0, ref.Len(), len(inputs))
	}
	return ref
}

func smallInts(r *rand.Rand, dt collective.DType, n int, op collective.Op) *collective.HostBuffer {
	h := collective.NewHostBuffer(dt, n)
	for i := 0; i < n; i++ {
		v := float64(r.IntN(16) - 8)
		if op == collective.OpProd {
			v = float64(r.IntN(2) + 1)
		}
		if dt == collective.Uint8 {
			v = float64(r.IntN(30))
		}
		h.Set(i, v)
	}
	return h
}

// uploadSmallInts fills every rank's buffer with its own smallInts (seeded
// by rank and count) and returns the host reference of their all-reduce.
func uploadSmallInts(t *testing.T, bufs []*Buffer, dt collective.DType, count int, op collective.Op) *collective.HostBuffer {
	t.Helper()
	ins := make([]*collective.HostBuffer, len(bufs))
	for r, b := range bufs {
		ins[r] = smallInts(rand.New(rand.NewPCG(uint64(r), uint64(count))), dt, count, op)
		if err := b.Upload(ins[r].Bytes()); err != nil {
			t.Fatal(err)
		}
	}
	return hostRef(op, ins)
}

// allReduceGroup all-reduces bufs[r] on every rank r of comms at once and
// fails the test on any rank's error.
func allReduceGroup(t *testing.T, ctx context.Context, name string, comms []*collective.Communicator, bufs []*Buffer, op collective.Op) {
	t.Helper()
	for r, err := range collective.RunAll(comms, func(c *collective.Communicator) error {
		return c.AllReduce(ctx, bufs[c.Rank()], op)
	}) {
		if err != nil {
			t.Fatalf("%s rank %d: %v", name, r, err)
		}
	}
}

// checkDownload downloads b (rank r's buffer) and compares it with ref.
func checkDownload(t *testing.T, name string, r int, b *Buffer, ref *collective.HostBuffer) {
	t.Helper()
	got := make([]byte, len(ref.Bytes()))
	if err := b.Download(got); err != nil {
		t.Fatal(err)
	}
	if string(got) != string(ref.Bytes()) {
		t.Errorf("%s rank %d: result differs from the host reference", name, r)
	}
	compareBytes(t, ref.DType(), got, ref.Bytes())
}

// placements: which device each rank uses, for the GPUs this host has.
func placements(ndev int) [][]int {
	if ndev >= 2 {
		return [][]int{{0, 1}, {0, 1, 0, 1}, {0, 0, 1}}
	}
	return [][]int{{0, 0}, {0, 0, 0, 0}}
}

func TestLocalRingAllReduceEveryOpAndDType(t *testing.T) {
	be := openBackend(t)
	r := rand.New(rand.NewPCG(7, 8))
	for _, place := range placements(be.NumDevices()) {
		for _, dt := range collective.AllDTypes {
			for _, op := range collective.AllOps {
				name := fmt.Sprintf("devs%v/%v/%v", place, dt, op)
				t.Run(name, func(t *testing.T) {
					const n = 200003
					var bufs []*Buffer
					var hosts []*collective.HostBuffer
					for k, d := range place {
						h := smallInts(r, dt, n, op)
						b, err := be.NewBuffer(d, dt, n)
						if err != nil {
							t.Fatal(err)
						}
						defer b.Free()
						if err := b.Upload(h.Bytes()); err != nil {
							t.Fatal(err)
						}
						bufs, hosts = append(bufs, b), append(hosts, h)
						_ = k
					}
					// reference: plain sequential reduction on the host
					ref := hostRef(op, hosts)
					ring, err := NewLocalRing(bufs, 64<<10) // small chunks: many pipeline steps
					if err != nil {
						t.Fatal(err)
					}
					defer ring.Close()
					if err := ring.AllReduce(op); err != nil {
						t.Fatal(err)
					}
					for k, b := range bufs {
						got := make([]byte, n*dt.Size())
						if err := b.Download(got); err != nil {
							t.Fatal(err)
						}
						t.Logf("rank %d", k)
						compareBytes(t, dt, got, ref.Bytes())
					}
				})
			}
		}
	}
}

// TestLocalRingBandwidth measures busbw of in-process all-reduce (float32).
// Runs only with GPUMESH_CUDA_BENCH=1; prints a table.
func TestLocalRingBandwidth(t *testing.T) {
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		t.Skip("set GPUMESH_CUDA_BENCH=1 to measure")
	}
	be := openBackend(t)
	if be.NumDevices() < 2 {
		t.Skip("needs two GPUs")
	}
	iters := 20
	if s := os.Getenv("GPUMESH_CUDA_BENCH_ITERS"); s != "" {
		iters, _ = strconv.Atoi(s)
	}
	for _, place := range [][]int{{0, 1}, {0, 1, 0, 1}} {
		for _, mib := range []int{1, 16, 64, 256} {
			for _, chunk := range []int{8 << 20, 32 << 20, 64 << 20} {
				n := mib << 20 / 4
				var bufs []*Buffer
				for _, d := range place {
					b, err := be.NewBuffer(d, collective.Float32, n)
					if err != nil {
						t.Fatal(err)
					}
					if err := b.wr.Fill(cuda.Float32, b.mem.Ptr(), int64(n), 1, false); err != nil {
						t.Fatal(err)
					}
					bufs = append(bufs, b)
				}
				ring, err := NewLocalRing(bufs, chunk)
				if err != nil {
					t.Fatal(err)
				}
				for i := 0; i < 3; i++ {
					ring.AllReduce(collective.OpSum)
				}
				var ts []time.Duration
				for i := 0; i < iters; i++ {
					t0 := time.Now()
					if err := ring.AllReduce(collective.OpSum); err != nil {
						t.Fatal(err)
					}
					ts = append(ts, time.Since(t0))
				}
				med := median(ts)
				alg := float64(mib<<20) / med.Seconds() / 1e9
				nr := float64(len(place))
				fmt.Printf("local n=%d devs=%s size=%dMiB chunk=%dMiB time=%.1fus algbw=%.2fGB/s busbw=%.2fGB/s\n", len(place),
					strings.Trim(strings.ReplaceAll(fmt.Sprint(place), " ", ","), "[]"), mib, chunk>>20,
					float64(med.Microseconds()), alg, alg*2*(nr-1)/nr)
				ring.Close()
				for _, b := range bufs {
					b.Free()
				}
			}
		}
	}
}

func median(ts []time.Duration) time.Duration {
	s := append([]time.Duration(nil), ts...)
	for i := range s {
		for j := i + 1; j < len(s); j++ {
			if s[j] < s[i] {
				s[i], s[j] = s[j], s[i]
			}
		}
	}
	return s[len(s)/2]
}
