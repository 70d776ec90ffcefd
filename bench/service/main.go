// Command service measures the /svc/ router's overhead: a replica answering
// 1 KiB, the router in front of it, and a closed-loop load generator, each
// meant to run as its own process pinned to its own cores (taskset), so
// that the router gets one core as the replica does.
//
//	service replica -listen 127.0.0.1:9001
//	service router  -listen 127.0.0.1:9002 -replica 127.0.0.1:9001
//	service load    -url http://127.0.0.1:9001/x        # direct
//	service load    -url http://127.0.0.1:9002/svc/bench/x  # through the router
//
// router serves the router behind net/http's server, as an agent's HTTP
// port does; router -serve behind the agent's serve-port front end
// (gpumesh agent --serve); router -lean and -floor are measuring sticks
// (a minimal server prototype, a byte relay). router -pprof 127.0.0.1:6060
// serves net/http/pprof there (go tool pprof
// http://127.0.0.1:6060/debug/pprof/profile?seconds=5).
//
// load prints requests/s and latency percentiles as one JSON line; with
// -rate it sends that many requests/s whatever the answers' pace (an open
// loop, vegeta), which measures the latency a router adds below saturation.
//
//	service cpu [-n 50000] [-c 16] [-r 3] [-pin] [-y examples/service/server.py] [LABEL=COMMAND...]
//
// cpu starts the replica and each router itself and prints the CPU time
// (user+sys) and read/write system calls per request of the router against
// the replica's, over -n requests of the same closed-loop load: a figure
// that holds on a loaded machine, where requests/s do not (cpu.go). The
// routers default to this binary's fast and general paths behind net/http's
// server and the fast path behind the serve port's front end (-serve);
// another build of bench/service compares as main=/path/to/service.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	_ "net/http/pprof"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"

	"github.com/gpumesh/gpumesh/node"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: service replica|router|load|cpu [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", "127.0.0.1:9001", "address to serve on (replica, router)")
	replica := fs.String("replica", "127.0.0.1:9001", "the replica's address (router)")
	size := fs.Int("size", 1024, "answer size in bytes (replica)")
	url := fs.String("url", "http://127.0.0.1:9001/x", "what to load (load)")
	clients := fs.Int("c", 16, "concurrent keep-alive clients (load)")
	dur := fs.Duration("d", 10*time.Second, "how long to load, after a 2 s warm-up (load)")
	pprofAddr := fs.String("pprof", "", "serve net/http/pprof on this address (router)")
	rate := fs.Int("rate", 0, "requests/s in an open loop instead of -c closed-loop clients (load); with -vegeta, 0 is as fast as -c workers go")
	useVegeta := fs.Bool("vegeta", false, "load with vegeta: at -rate, or with -rate 0 as fast as -c workers go, each waiting for its answer (load)")
	requests := fs.Int("n", 50000, "measured requests per run, after n/10 of warm-up (cpu)")
	rounds := fs.Int("r", 3, "rounds with the Go replica (cpu)")
	serverPy := fs.String("y", "", "also measure with this examples/service/server.py as the replica (cpu)")
	pyRounds := fs.Int("R", 1, "rounds with -y's replica (cpu)")
	pin := fs.Bool("pin", false, "replica on core 0, router on core 1, load on the others (cpu; at least 3 cores)")
	floor := fs.Bool("floor", false, "instead of the router, relay bytes without reading HTTP: the floor of any proxy's cost, for comparison only (router)")
	lean := fs.Bool("lean", false, "serve the router with a minimal HTTP/1.1 server instead of net/http's: what a leaner server side would save, for comparison only (router)")
	serve := fs.Bool("serve", false, "serve the router with the agent's serve-port front end (gpumesh agent --serve) instead of net/http's server, as an agent does (router)")
	general := fs.Bool("general", false, "send every request through httputil.ReverseProxy, not the fast path (router)")
	_ = fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "replica":
		payload := bytes.Repeat([]byte("x"), *size)
		err = http.ListenAndServe(*listen, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "application/octet-stream")
			_, _ = w.Write(payload)
		}))
	case "router":
		if *pprofAddr != "" {
			go func() { _ = http.ListenAndServe(*pprofAddr, nil) }() // DefaultServeMux holds net/http/pprof
		}
		if *floor {
			err = relay(*listen, *replica)
			break
		}
		rt := node.NewStaticRouter("bench", []string{*replica}, *general)
		if *lean {
			err = serveLean(*listen, rt)
			break
		}
		if *serve {
			var ln net.Listener
			if ln, err = net.Listen("tcp", *listen); err == nil {
				err = node.ServeServices(ln, rt)
			}
			break
		}
		err = http.ListenAndServe(*listen, rt)
	case "cpu":
		err = runCPU(cpuConfig{requests: *requests, clients: *clients, rounds: *rounds, serverPy: *serverPy, pyRounds: *pyRounds, pin: *pin, routers: fs.Args()})
	case "load":
		if *rate > 0 || *useVegeta {
			err = loadRate(*url, *rate, *clients, *dur)
		} else {
			err = load(*url, *clients, *dur)
		}
	default:
		err = fmt.Errorf("unknown mode %q: use replica, router, load or cpu", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}

func load(url string, clients int, dur time.Duration) error {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: clients}}
	var measuring atomic.Bool
	var mu sync.Mutex
	var lat []time.Duration
	var failed atomic.Int64
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := 0; g < clients; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for {
				select {
				case <-stop:
					mu.Lock()
					lat = append(lat, mine...)
					mu.Unlock()
					return
				default:
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
				if !measuring.Load() {
					continue
				}
				if err != nil {
					failed.Add(1)
					continue
				}
				mine = append(mine, time.Since(t0))
			}
		}()
	}
	time.Sleep(2 * time.Second) // warm-up: connections open, caches warm
	measuring.Store(true)
	start := time.Now()
	time.Sleep(dur)
	measuring.Store(false)
	elapsed := time.Since(start)
	close(stop)
	wg.Wait()
	if len(lat) == 0 {
		return fmt.Errorf("no request succeeded (%d failed)", failed.Load())
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	pct := func(p float64) float64 { return float64(lat[int(p*float64(len(lat)-1))].Microseconds()) / 1000 }
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"url": url, "clients": clients, "requests": len(lat), "failed": failed.Load(),
		"req_per_s": float64(len(lat)) / elapsed.Seconds(),
		"p50_ms":    pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": pct(1),
	})
}

// loadRate sends rate GETs/s to url (with rate 0, as fast as workers
// waiting each for its answer go) for 2 s of warm-up, then for dur, and
// prints the latencies of the measured part.
func loadRate(url string, rate, workers int, dur time.Duration) error {
	target := vegeta.NewStaticTargeter(vegeta.Target{Method: http.MethodGet, URL: url})
	opts := []func(*vegeta.Attacker){vegeta.KeepAlive(true), vegeta.Timeout(5 * time.Second)}
	if rate == 0 {
		opts = append(opts, vegeta.Workers(uint64(workers)), vegeta.MaxWorkers(uint64(workers)))
	}
	attacker := vegeta.NewAttacker(opts...)
	const warmUp = 2 * time.Second
	start := time.Now()
	var m vegeta.Metrics
	for res := range attacker.Attack(target, vegeta.Rate{Freq: rate, Per: time.Second}, warmUp+dur, "load") {
		if res.Timestamp.Sub(start) >= warmUp {
			m.Add(res)
		}
	}
	m.Close()
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	return json.NewEncoder(os.Stdout).Encode(map[string]any{
		"url": url, "rate": rate, "workers": workers, "requests": m.Requests, "success": m.Success,
		"req_per_s": m.Throughput,
		"p50_ms":    ms(m.Latencies.P50), "p90_ms": ms(m.Latencies.P90), "p99_ms": ms(m.Latencies.P99), "max_ms": ms(m.Latencies.Max),
	})
}
