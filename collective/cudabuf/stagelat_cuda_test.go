//go:build cuda

package cudabuf

import (
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// TestStagingLatency measures (GPUMESH_CUDA_BENCH=1) what one buffer's
// staging costs per chunk without any network: g goroutines on disjoint
// ranges of one buffer, each repeating a ReadChunk (device to pinned host,
// waited for), a received chunk (BeginRecv, CommitRecv with a reduce: upload
// and kernel, not waited for), or the forward chain of a ring step (receive
// and reduce, then read the result back: what a rank does before it can
// forward a reduced chunk). It prints the time per step for one goroutine
// and the aggregate rate for many, to tell the device's cost from the host's.
func TestStagingLatency(t *testing.T) {
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		t.Skip("set GPUMESH_CUDA_BENCH=1 to measure")
	}
	be := openBackendCfg(t, 4<<20, 64)
	const iters = 200
	for _, kib := range []int{64, 128, 512} {
		n := kib << 10 / 4
		for _, g := range []int{1, 4, 16} {
			buf, err := be.NewBuffer(0, collective.Float32, n*g)
			if err != nil {
				t.Fatal(err)
			}
			if err := buf.Zero(); err != nil {
				t.Fatal(err)
			}
			run := func(step func(off int) error) time.Duration {
				var wg sync.WaitGroup
				errs := make(chan error, g)
				t0 := time.Now()
				for w := 0; w < g; w++ {
					wg.Add(1)
					go func(off int) {
						defer wg.Done()
						for i := 0; i < iters; i++ {
							if err := step(off); err != nil {
								errs <- err
								return
							}
						}
					}(w * n)
				}
				wg.Wait()
				if err := buf.Sync(); err != nil {
					t.Fatal(err)
				}
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				return time.Since(t0)
			}
			read := func(off int) error {
				b, err := buf.ReadChunk(off, n)
				if err != nil {
					return err
				}
				buf.ReleaseChunk(off, n, b)
				return nil
			}
			recv := func(off int) error {
				_, tok, err := buf.BeginRecv(off, n)
				if err != nil {
					return err
				}
				return buf.CommitRecv(off, n, tok, true, collective.OpSum)
			}
			chain := func(off int) error {
				if err := recv(off); err != nil {
					return err
				}
				return read(off)
			}
			var parts []string
			for _, c := range []struct {
				name string
				f    func(int) error
			}{{"read", read}, {"recv", recv}, {"chain", chain}} {
				run(c.f) // warm
				d := run(c.f)
				per := d / time.Duration(iters)
				parts = append(parts, fmt.Sprintf("%s=%.1fus/step(%.1fus/chunk,%.2fGB/s)", c.name, float64(per)/1e3, float64(per)/1e3/float64(g), float64(iters*g*kib<<10)/d.Seconds()/1e9))
			}
			fmt.Printf("stagelat wait=%s chunk=%dKiB goroutines=%d %s\n", waitName(), kib, g, strings.Join(parts, " "))
			buf.Free()
		}
	}
}

func waitName() string {
	w := "spin"
	if os.Getenv("GPUMESH_SPIN") == "0" {
		w = "sleep"
	}
	switch os.Getenv("GPUMESH_POLL") {
	case "1":
		w = "poll"
	case "shared":
		w = "poller"
	}
	if os.Getenv("GPUMESH_LOCKED") == "1" {
		w += ",locked"
	}
	w += issuerLabel()
	if k := envInt("GPUMESH_ZEROCOPY_KIB", DefaultZeroCopyBytes>>10); k > 0 {
		w += fmt.Sprintf(",zerocopy<=%dKiB", k)
	}
	return w
}

// traceOp records the staging steps of one operation (tracer) into path:
// one line per step, microseconds from the operation's start.
type traceOp struct {
	mu    sync.Mutex
	start time.Time
	lines []traceLine
}

type traceLine struct {
	kind       string
	off, n     int
	start, end time.Duration
}

func startTrace() *traceOp {
	tr := &traceOp{start: time.Now()}
	f := func(kind string, off, n int, start time.Time) {
		end := time.Now()
		tr.mu.Lock()
		tr.lines = append(tr.lines, traceLine{kind, off, n, start.Sub(tr.start), end.Sub(tr.start)})
		tr.mu.Unlock()
	}
	tracer.Store(&f)
	return tr
}

func (tr *traceOp) stop(path, head string) error {
	tracer.Store(nil)
	tr.mu.Lock()
	defer tr.mu.Unlock()
	sort.SliceStable(tr.lines, func(i, j int) bool { return tr.lines[i].start < tr.lines[j].start })
	var b strings.Builder
	fmt.Fprintf(&b, "# %s wall=%s\n", head, tr.start.Format(time.RFC3339Nano))
	for _, l := range tr.lines {
		fmt.Fprintf(&b, "%-8s off=%-9d n=%-8d start=%8.1fus end=%8.1fus took=%7.1fus\n", l.kind, l.off, l.n, float64(l.start)/1e3, float64(l.end)/1e3, float64(l.end-l.start)/1e3)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

// TestCopyBandwidth measures (GPUMESH_CUDA_BENCH=1) the card's copy rate
// between device memory and pinned host memory in 4 MiB copies, 256 MiB in
// all: device to host alone, host to device alone, and both at once on two
// streams (what a rank on the TCP lanes does while it sends and receives).
// Start it in several processes at once to see what processes sharing one
// GPU get: the ceiling of the lanes' device staging there.
func TestCopyBandwidth(t *testing.T) {
	if os.Getenv("GPUMESH_CUDA_BENCH") != "1" {
		t.Skip("set GPUMESH_CUDA_BENCH=1 to measure")
	}
	be := openBackendCfg(t, 4<<20, 4)
	d := be.devs[0].dev
	const total, piece = 256 << 20, 4 << 20
	mem, err := d.Alloc(total)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free()
	host := [2][]byte{}
	for i := range host {
		if host[i], err = d.PinnedAlloc(total); err != nil {
			t.Fatal(err)
		}
		defer d.PinnedFree(host[i])
	}
	var sts [2]*cuda.Stream
	for i := range sts {
		if sts[i], err = d.NewStream(); err != nil {
			t.Fatal(err)
		}
		defer sts[i].Close()
	}
	copyAll := func(st *cuda.Stream, toHost bool, h []byte) error {
		for off := 0; off < total; off += piece {
			var err error
			if toHost {
				err = st.CopyDtoH(h[off:off+piece], mem.Ptr()+cuda.DevPtr(off))
			} else {
				err = st.CopyHtoD(mem.Ptr()+cuda.DevPtr(off), h[off:off+piece])
			}
			if err != nil {
				return err
			}
		}
		return nil
	}
	measure := func(d2h, h2d bool) float64 {
		var ts []time.Duration
		for rep := 0; rep < 6; rep++ {
			t0 := time.Now()
			if d2h {
				if err := copyAll(sts[0], true, host[0]); err != nil {
					t.Fatal(err)
				}
			}
			if h2d {
				if err := copyAll(sts[1], false, host[1]); err != nil {
					t.Fatal(err)
				}
			}
			for _, st := range sts {
				if err := st.Synchronize(); err != nil {
					t.Fatal(err)
				}
			}
			if rep > 0 {
				ts = append(ts, time.Since(t0))
			}
		}
		sort.Slice(ts, func(i, j int) bool { return ts[i] < ts[j] })
		return float64(total) / ts[len(ts)/2].Seconds() / 1e9
	}
	d2h, h2d, both := measure(true, false), measure(false, true), measure(true, true)
	fmt.Printf("copybw pid=%d d2h=%.1fGB/s h2d=%.1fGB/s both-at-once=%.1fGB/s-each-way\n", os.Getpid(), d2h, h2d, both)
}
