package node

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// BenchmarkServePort measures the serve port's path (the front end of
// `gpumesh agent --serve`, the router's fast path, a replica over loopback)
// at 1 KiB answers, against the same replica directly: 16 keep-alive
// clients, each a raw HTTP/1.1 loop on its own connection (so that the
// client's own cost stays small), in one process. ns/op and allocs/op are
// per request for client, router and replica together: "serve" less
// "direct" is what the router adds.
//
//	go test -run '^$' -bench ServePort -benchmem -benchtime 20000x -count 5 ./node/
//	go test -run '^$' -bench ServePort/serve -cpuprofile cpu.out -benchtime 100000x ./node/
func BenchmarkServePort(b *testing.B) {
	replica, payload := kibReplica()
	defer replica.Close()
	rt := newRouter("n-router", "", hclog.NewNullLogger())
	rt.update(svcState(b, "bench", []string{replica.Listener.Addr().String()}, []string{HealthHealthy}))
	defer rt.closeConns()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	f := newServeFront(ln, rt, nil, hclog.NewNullLogger())
	served := make(chan error, 1)
	go func() { served <- f.serve() }()
	defer func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = f.shutdown(ctx)
		<-served
	}()
	for _, c := range []struct{ name, addr, path string }{
		{"direct", replica.Listener.Addr().String(), "/x"},
		{"serve", ln.Addr().String(), "/svc/bench/x"},
	} {
		b.Run(c.name, func(b *testing.B) { benchRawClients(b, c.addr, c.path, 16, len(payload)) })
	}
}

// benchRawClients sends b.N GETs of path to addr from clients keep-alive
// connections, each waiting for its answer (of size bytes) before the next.
func benchRawClients(b *testing.B, addr, path string, clients, size int) {
	req := []byte("GET " + path + " HTTP/1.1\r\nHost: " + addr + "\r\nUser-Agent: bench\r\nAccept-Encoding: gzip\r\n\r\n")
	conns := make([]net.Conn, clients)
	for i := range conns {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			b.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	var mu sync.Mutex
	next := 0
	var failed error
	var wg sync.WaitGroup
	b.ReportAllocs()
	b.ResetTimer()
	for _, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			br := bufio.NewReaderSize(c, 8<<10)
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= b.N {
					return
				}
				if err := rawGet(c, br, req, size); err != nil {
					mu.Lock()
					failed = err
					next = b.N
					mu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	b.StopTimer()
	if failed != nil {
		b.Fatal(failed)
	}
}

// rawGet writes req on c and reads a 200 answer of size bytes with a
// Content-Length from br.
func rawGet(c net.Conn, br *bufio.Reader, req []byte, size int) error {
	if _, err := c.Write(req); err != nil {
		return err
	}
	length := -1
	for first := true; ; first = false {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return err
		}
		if first && !bytes.HasPrefix(line, []byte("HTTP/1.1 200 ")) {
			return fmt.Errorf("answer %q", line)
		}
		if len(line) == 2 {
			break
		}
		if v, ok := bytes.CutPrefix(line, []byte("Content-Length: ")); ok {
			length, _ = strconv.Atoi(string(bytes.TrimSpace(v)))
		}
	}
	if length != size {
		return fmt.Errorf("answer of %d bytes, want %d", length, size)
	}
	_, err := br.Discard(length)
	if err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return err
}
