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
				if _, err := buf.ReadChunk(off, n); err != nil {
					return err
				}
				buf.ReleaseChunk(off, n)
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
