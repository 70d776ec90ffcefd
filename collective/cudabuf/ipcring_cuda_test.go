//go:build cuda

package cudabuf

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// TestIPCRingSeparateProcesses starts this test binary again as ranks in
// separate processes (one per GPU, round robin) that all-reduce through
// IPCRing, each checking its result against a host reference.
func TestIPCRingSeparateProcesses(t *testing.T) {
	if rank := os.Getenv("GPUMESH_IPC_RANK"); rank != "" {
		ipcChild(t, rank)
		return
	}
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	for _, n := range []int{2, 3} {
		t.Run(fmt.Sprintf("ranks=%d", n), func(t *testing.T) {
			name := fmt.Sprintf("test-%d-%d", os.Getpid(), n)
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			var cmds []*exec.Cmd
			var outs []*strings.Builder
			for r := 0; r < n; r++ {
				cmd := exec.CommandContext(ctx, os.Args[0], "-test.run=^TestIPCRingSeparateProcesses$", "-test.v")
				cmd.Env = append(os.Environ(), "GPUMESH_IPC_RANK="+strconv.Itoa(r), "GPUMESH_IPC_SIZE="+strconv.Itoa(n), "GPUMESH_IPC_NAME="+name)
				var out strings.Builder
				cmd.Stdout, cmd.Stderr = &out, &out
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				cmds, outs = append(cmds, cmd), append(outs, &out)
			}
			for r, cmd := range cmds {
				err := cmd.Wait()
				for _, l := range strings.Split(outs[r].String(), "\n") {
					if strings.HasPrefix(l, "ipc ") {
						fmt.Println(l)
					}
				}
				if err != nil {
					t.Errorf("rank %d: %v\n%s", r, err, outs[r].String())
				}
			}
		})
	}
}

func ipcChild(t *testing.T, rankS string) {
	rank, _ := strconv.Atoi(rankS)
	n, _ := strconv.Atoi(os.Getenv("GPUMESH_IPC_SIZE"))
	name := os.Getenv("GPUMESH_IPC_NAME")
	be := openBackend(t)
	dev := rank % be.NumDevices()
	ctx := context.Background()
	const count = 300007
	for _, dt := range []collective.DType{collective.Float32, collective.BFloat16, collective.Int64, collective.Float16} {
		buf, err := be.NewBuffer(dev, dt, count)
		if err != nil {
			t.Fatal(err)
		}
		ring, err := NewIPCRing(ctx, buf, IPCConfig{Name: fmt.Sprintf("%s-%v", name, dt), Rank: rank, Size: n, ChunkBytes: 128 << 10, Timeout: 20 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		for _, op := range collective.AllOps {
			// every rank derives every rank's input from the same seeds
			ins := make([]*collective.HostBuffer, n)
			for k := range ins {
				ins[k] = smallInts(rand.New(rand.NewPCG(uint64(k), uint64(op))), dt, count, op)
			}
			ref, mine := hostRef(op, ins), ins[rank]
			if err := buf.Upload(mine.Bytes()); err != nil {
				t.Fatal(err)
			}
			if err := ring.AllReduce(ctx, op); err != nil {
				t.Fatalf("%v %v: %v", dt, op, err)
			}
			got := make([]byte, count*dt.Size())
			if err := buf.Download(got); err != nil {
				t.Fatal(err)
			}
			compareBytes(t, dt, got, ref.Bytes())
		}
		if err := ring.Close(); err != nil {
			t.Fatal(err)
		}
		buf.Free()
	}
	if os.Getenv("GPUMESH_CUDA_BENCH") == "1" {
		ipcBench(t, be, rank, n, dev, name)
	}
}

func ipcBench(t *testing.T, be *Backend, rank, n, dev int, name string) {
	ctx := context.Background()
	for _, mib := range []int{1, 16, 64, 256} {
		for _, chunk := range []int{16 << 20, 64 << 20} {
			count := mib << 20 / 4
			buf, err := be.NewBuffer(dev, collective.Float32, count)
			if err != nil {
				t.Fatal(err)
			}
			buf.wr.Fill(cuda.Float32, buf.mem.Ptr(), int64(count), uint64(rank), false)
			ring, err := NewIPCRing(ctx, buf, IPCConfig{Name: fmt.Sprintf("%s-bench-%d-%d", name, mib, chunk), Rank: rank, Size: n, ChunkBytes: chunk})
			if err != nil {
				t.Fatal(err)
			}
			for i := 0; i < 3; i++ {
				if err := ring.AllReduce(ctx, collective.OpSum); err != nil {
					t.Fatal(err)
				}
			}
			var ts []time.Duration
			for i := 0; i < 20; i++ {
				t0 := time.Now()
				if err := ring.AllReduce(ctx, collective.OpSum); err != nil {
					t.Fatal(err)
				}
				ts = append(ts, time.Since(t0))
			}
			med := median(ts)
			alg := float64(mib<<20) / med.Seconds() / 1e9
			if rank == 0 {
				fmt.Printf("ipc n=%d size=%dMiB chunk=%dMiB time=%.1fus algbw=%.2fGB/s busbw=%.2fGB/s\n", n, mib, chunk>>20,
					float64(med.Microseconds()), alg, alg*2*float64(n-1)/float64(n))
			}
			ring.Close()
			buf.Free()
		}
	}
}
