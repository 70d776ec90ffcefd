//go:build linux

package localapi

import (
	"fmt"
	"sync"
	"testing"
)

// BenchmarkClientAllReduce is the agent's side of a client all_reduce: n
// ranks (clients of this process, on the protocol's Unix socket) of one
// server all-reduce float32 buffers in their registered regions, each op a
// request and its answer per rank, back to back. It measures the local
// API's fixed cost per operation (decode, checks, the hand-off to the
// worker, the same-process all-reduce's synchronisation, the answer) at
// small sizes; the clients' side is Go here, not Python. Profile it with
// go test -run '^$' -bench ClientAllReduce -cpuprofile cpu.out ./node/localapi/.
func BenchmarkClientAllReduce(b *testing.B) {
	for _, ranks := range []int{2, 4} {
		for _, size := range []int{4 << 10, 1 << 20} {
			b.Run(fmt.Sprintf("ranks=%d/bytes=%d", ranks, size), func(b *testing.B) {
				s := startServer(b, ranks)
				cls, _ := connectRanks(b, s, ranks, size)
				op := &Op{Kind: OpAllReduce, DType: 1, Reduce: 1, A: BufRef{Region: 1, Count: uint64(size / 4)}}
				b.SetBytes(int64(size))
				b.ReportAllocs()
				b.ResetTimer()
				var wg sync.WaitGroup
				errs := make(chan error, ranks)
				for r := range cls {
					wg.Add(1)
					go func() {
						defer wg.Done()
						o := *op
						for i := 0; i < b.N; i++ {
							o.ID = uint64(i + 1)
							if _, err := cls[r].c.Write(EncodeOp(&o)); err != nil {
								errs <- err
								return
							}
							if rep := cls[r].recv(); rep.Type != MsgDone || rep.Status != StatusOK {
								errs <- fmt.Errorf("rank %d op %d: %+v", r, i, rep)
								return
							}
						}
					}()
				}
				wg.Wait()
				b.StopTimer()
				select {
				case err := <-errs:
					b.Fatal(err)
				default:
				}
			})
		}
	}
}
