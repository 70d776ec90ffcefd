package collbench

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"
)

// RawTCP measures the baseline: every rank sends perRank bytes to its ring
// neighbour over flows TCP connections (perRank/flows each, in 4 MiB
// writes) while receiving the same from the other neighbour, all ranks at
// once, on 127.0.0.1. It returns the median time of iters rounds.
func RawTCP(ctx context.Context, ranks, flows int, perRank int64, iters, warmup int) (time.Duration, error) {
	return rawTCP(ctx, ranks, flows, perRank, iters, warmup, 0)
}

// rawTCP is RawTCP; with span > 0 every flow's sender reads and receiver
// writes successive 4 MiB windows of its own span-byte buffer instead of
// reusing one 4 MiB buffer, as a transfer from and into tensors of that
// size does (memory traffic instead of cache hits).
func rawTCP(ctx context.Context, ranks, flows int, perRank int64, iters, warmup int, span int64) (time.Duration, error) {
	if ranks < 2 || flows < 1 {
		return 0, fmt.Errorf("raw TCP: needs >= 2 ranks and >= 1 flow")
	}
	type pair struct{ w, r net.Conn }
	pairs := make([]pair, 0, ranks*flows)
	defer func() {
		for _, p := range pairs {
			_ = p.w.Close()
			_ = p.r.Close()
		}
	}()
	for i := 0; i < ranks*flows; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return 0, err
		}
		accepted := make(chan net.Conn, 1)
		go func() {
			c, _ := l.Accept()
			accepted <- c
		}()
		var d net.Dialer
		w, err := d.DialContext(ctx, "tcp", l.Addr().String())
		r := <-accepted
		_ = l.Close()
		if err != nil || r == nil {
			if w != nil {
				_ = w.Close()
			}
			return 0, errors.Join(err, errors.New("raw TCP: accept failed"))
		}
		pairs = append(pairs, pair{w, r})
	}
	const block = 4 << 20
	span = max(span, block)
	bufs := make([][]byte, 2*len(pairs))
	for i := range bufs {
		bufs[i] = make([]byte, span)
		// Real bytes in every page: a buffer that is never written maps
		// the kernel's shared zero page, and sending from it reads one
		// cache-resident 4 KiB page over and over instead of memory.
		for j := range bufs[i] {
			bufs[i][j] = byte(j*7 + i + 1)
		}
	}
	round := func() (time.Duration, error) {
		var wg sync.WaitGroup
		errs := make([]error, 2*len(pairs))
		start := time.Now()
		for i, p := range pairs {
			n := perRank / int64(flows)
			if i%flows < int(perRank%int64(flows)) {
				n++
			}
			wg.Add(2)
			go func() {
				defer wg.Done()
				var at int64
				for left := n; left > 0; {
					k := min(left, block)
					if at+k > span {
						at = 0
					}
					if _, err := p.w.Write(bufs[2*i][at : at+k]); err != nil {
						errs[2*i] = err
						return
					}
					left -= k
					at += k
				}
			}()
			go func() {
				defer wg.Done()
				var at int64
				for left := n; left > 0; {
					k := min(left, block)
					if at+k > span {
						at = 0
					}
					m, err := p.r.Read(bufs[2*i+1][at : at+k])
					if err != nil {
						errs[2*i+1] = err
						return
					}
					left -= int64(m)
					at += int64(m)
				}
			}()
		}
		wg.Wait()
		return time.Since(start), errors.Join(errs...)
	}
	for i := 0; i < warmup; i++ {
		if _, err := round(); err != nil {
			return 0, err
		}
	}
	ts := make([]time.Duration, 0, iters)
	for i := 0; i < iters; i++ {
		if err := ctx.Err(); err != nil {
			return 0, err
		}
		t, err := round()
		if err != nil {
			return 0, err
		}
		ts = append(ts, t)
	}
	return median(ts), nil
}
