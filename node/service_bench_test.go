package node

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

// BenchmarkServiceProxy measures the router's cost at 1 KiB answers: the
// same closed-loop load (8 client goroutines, keep-alive) against a replica
// directly and through the /svc/ router, side by side. It reports
// requests/s and the p50 and p99 latency of each, through the fast path
// and through the general one (httputil.ReverseProxy); the ratio and the
// added p99 go to bench/results/service.md.
//
//	go test -run '^$' -bench ServiceProxy -benchtime 20000x -count 5 ./node/
func BenchmarkServiceProxy(b *testing.B) {
	replica, _ := kibReplica()
	defer replica.Close()
	jobs, allocs := svcState(b, "bench", []string{replica.Listener.Addr().String()}, []string{HealthHealthy})
	fronts := map[bool]*httptest.Server{}
	for _, general := range []bool{false, true} {
		rt := newRouter("n-router", "", hclog.NewNullLogger())
		rt.general = general
		rt.update(jobs, allocs)
		fronts[general] = httptest.NewServer(rt)
		defer rt.closeConns()
		defer fronts[general].Close()
	}
	for _, c := range []struct{ name, url string }{
		{"direct", replica.URL + "/x"},
		{"proxy", fronts[false].URL + "/svc/bench/x"},        // the fast path
		{"proxy-general", fronts[true].URL + "/svc/bench/x"}, // httputil.ReverseProxy
	} {
		b.Run(c.name, func(b *testing.B) { benchClosedLoop(b, c.url, 8) })
	}
}

func benchClosedLoop(b *testing.B, url string, clients int) {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	defer client.CloseIdleConnections()
	lat := make([]time.Duration, b.N)
	var next int64
	var mu sync.Mutex
	var wg sync.WaitGroup
	var failed error
	b.ResetTimer()
	start := time.Now()
	for g := 0; g < clients; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				mu.Lock()
				i := next
				next++
				mu.Unlock()
				if i >= int64(b.N) {
					return
				}
				t0 := time.Now()
				resp, err := client.Get(url)
				if err == nil {
					_, err = io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("status %d", resp.StatusCode)
					}
				}
				if err != nil {
					mu.Lock()
					failed = err
					mu.Unlock()
					return
				}
				lat[i] = time.Since(t0)
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	if failed != nil {
		b.Fatal(failed)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "req/s")
	b.ReportMetric(float64(lat[b.N/2].Microseconds()), "p50-µs")
	b.ReportMetric(float64(lat[b.N*99/100].Microseconds()), "p99-µs")
}

// kibReplica starts the benchmarks' replica: every request gets the same
// 1 KiB answer (payload).
func kibReplica() (replica *httptest.Server, payload []byte) {
	payload = bytes.Repeat([]byte("x"), 1024)
	replica = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/octet-stream")
		_, _ = w.Write(payload)
	}))
	return replica, payload
}
