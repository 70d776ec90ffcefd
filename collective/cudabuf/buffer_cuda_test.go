//go:build cuda

package cudabuf

import (
	"bytes"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
	"github.com/gpumesh/gpumesh/cuda"
)

// openBackend opens every device with a small pool (so chunk > slot paths
// run) or skips when the host has no GPU.
func openBackend(t *testing.T) *Backend {
	t.Helper()
	return openBackendCfg(t, 256<<10, 16)
}

func openBackendCfg(t *testing.T, slotBytes, slots int) *Backend {
	t.Helper()
	if !cuda.Available() {
		t.Skip("no CUDA device on this host")
	}
	cfg := cuda.DefaultConfig()
	cfg.PinnedSlotBytes = slotBytes
	cfg.PinnedSlots = slots
	be, err := Open(cfg, WithSpinWait(os.Getenv("GPUMESH_SPIN") != "0"), WithRangeDeps(os.Getenv("GPUMESH_RANGE_DEPS") == "1"), WithPrefetch(os.Getenv("GPUMESH_PREFETCH") != "0"), WithEagerPeerDeps(os.Getenv("GPUMESH_EAGER_PEER") == "1"), WithPollWait(os.Getenv("GPUMESH_POLL") == "1"), WithSharedPoller(os.Getenv("GPUMESH_POLL") == "shared"), WithLockedEnqueue(os.Getenv("GPUMESH_LOCKED") == "1"), WithZeroCopyReduce(envInt("GPUMESH_ZEROCOPY_KIB", DefaultZeroCopyBytes>>10)<<10), WithSameHostRingOnOneDevice(os.Getenv("GPUMESH_SAME_HOST_RING") == "1"), WithIssuingThread(issuerFromEnv()))
	if err != nil {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() {
		if err := be.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	// GPUMESH_TEST_DELAY_US: every staging step's device work is delayed
	// by up to 1.5 times that (see delayStream), in this process and in
	// the test's child processes
	if us := envInt("GPUMESH_TEST_DELAY_US", 0); us > 0 {
		setStepDelay(t, time.Duration(us)*time.Microsecond)
	}
	return be
}

// setStepDelay delays every staging step's device work (delayStream) until
// the test ends.
func setStepDelay(t *testing.T, d time.Duration) {
	old := stepDelay.Swap(int64(d))
	t.Cleanup(func() { stepDelay.Store(old) })
}

// randomHost fills a host buffer with values that exercise rounding,
// wrap-around and ties (no NaN: NaN payloads are not portable).
func randomHost(r *rand.Rand, dt collective.DType, n int) *collective.HostBuffer {
	h := collective.NewHostBuffer(dt, n)
	raw := h.Bytes()
	switch dt {
	case collective.Int32, collective.Int64, collective.Uint8:
		for i := range raw {
			raw[i] = byte(r.Uint32())
		}
	default:
		for i := 0; i < n; i++ {
			var v float64
			switch r.IntN(4) {
			case 0:
				v = float64(r.IntN(17) - 8) // small integers: ties for max/min
			case 1:
				v = r.NormFloat64() * 1e3
			case 2:
				v = r.NormFloat64() * 1e-3
			default:
				v = r.NormFloat64()
			}
			h.Set(i, v)
		}
	}
	return h
}

// variant names the backend options the environment chose, for bench lines.
func variant() string {
	v := "lazydeps"
	if os.Getenv("GPUMESH_EAGER_PEER") == "1" {
		v = "eagerdeps"
	}
	if os.Getenv("GPUMESH_PREFETCH") == "0" {
		v += ",noprefetch"
	}
	switch os.Getenv("GPUMESH_POLL") {
	case "1":
		v += ",poll"
	case "shared":
		v += ",poller"
	}
	return v + issuerLabel()
}

// issuerFromEnv is the issuing thread GPUMESH_ISSUER asks for: "1" with
// the default spinning, "sleep" without spinning, else none.
func issuerFromEnv() (bool, cuda.IssuerConfig) {
	switch os.Getenv("GPUMESH_ISSUER") {
	case "1":
		return true, cuda.DefaultIssuerConfig()
	case "sleep":
		return true, cuda.IssuerConfig{}
	}
	return false, cuda.IssuerConfig{}
}

// issuerLabel names GPUMESH_ISSUER's choice (issuerFromEnv) for bench
// lines.
func issuerLabel() string {
	switch on, cfg := issuerFromEnv(); {
	case !on:
		return ""
	case cfg.Spin == 0:
		return ",issuer-sleep"
	}
	return ",issuer"
}

func split3(b []byte) collective.Segments {
	// uneven pieces that split elements: 1 byte, a middle, the rest
	if len(b) < 8 {
		return collective.Segments{b}
	}
	return collective.Segments{b[:1], b[1 : len(b)/2+3], b[len(b)/2+3:]}
}

// Every op and dtype: the device result equals the host reference bit for bit
// (the host computes in float64 and rounds once; so do the kernels).
func TestReduceChunkMatchesHostReference(t *testing.T) {
	be := openBackend(t)
	r := rand.New(rand.NewPCG(1, 2))
	const n = 300007 // odd, larger than a slot for every dtype
	const off = 7    // misaligned start: the kernel's scalar path
	for _, dt := range collective.AllDTypes {
		for _, op := range collective.AllOps {
			t.Run(fmt.Sprintf("%v/%v", dt, op), func(t *testing.T) {
				a := randomHost(r, dt, n)
				b := randomHost(r, dt, n-off)
				buf, err := be.NewBuffer(0, dt, n)
				if err != nil {
					t.Fatal(err)
				}
				defer buf.Free()
				if err := buf.Upload(a.Bytes()); err != nil {
					t.Fatal(err)
				}
				if err := buf.ReduceChunk(off, split3(b.Bytes()), op); err != nil {
					t.Fatal(err)
				}
				if err := a.ReduceChunk(off, collective.Segments{b.Bytes()}, op); err != nil {
					t.Fatal(err)
				}
				if op == collective.OpAvg {
					if err := buf.DivChunk(off, n-off, 3); err != nil {
						t.Fatal(err)
					}
					if err := a.DivChunk(off, n-off, 3); err != nil {
						t.Fatal(err)
					}
				}
				got := make([]byte, len(a.Bytes()))
				if err := buf.Download(got); err != nil {
					t.Fatal(err)
				}
				compareBytes(t, dt, got, a.Bytes())
			})
		}
	}
}

func compareBytes(t *testing.T, dt collective.DType, got, want []byte) {
	t.Helper()
	if bytes.Equal(got, want) {
		return
	}
	es := dt.Size()
	bad := 0
	for i := 0; i < len(want); i += es {
		if !bytes.Equal(got[i:i+es], want[i:i+es]) {
			if bad < 5 {
				g, _ := collective.WrapHostBytes(dt, got[i:i+es])
				w, _ := collective.WrapHostBytes(dt, want[i:i+es])
				t.Errorf("element %d: got %v (%x), want %v (%x)", i/es, g.At(0), got[i:i+es], w.At(0), want[i:i+es])
			}
			bad++
		}
	}
	t.Fatalf("%d of %d elements differ", bad, len(want)/es)
}

func TestWriteReadChunkRoundTrip(t *testing.T) {
	be := openBackend(t)
	r := rand.New(rand.NewPCG(3, 4))
	const n = 1 << 20 // 4 MiB of float32: 16 slots of 256 KiB
	src := randomHost(r, collective.Float32, n)
	buf, err := be.NewBuffer(0, collective.Float32, n)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	// write in two overlapping-free halves, the second through odd segments
	if err := buf.WriteChunk(0, collective.Segments{src.Bytes()[:n*2]}); err != nil {
		t.Fatal(err)
	}
	if err := buf.WriteChunk(n/2, split3(src.Bytes()[n*2:])); err != nil {
		t.Fatal(err)
	}
	// a read right after the writes must see them (read stream waits)
	for _, c := range []struct{ off, n int }{{0, 1000}, {12345, 60000}, {0, n}} {
		b, err := buf.ReadChunk(c.off, c.n)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, src.Bytes()[c.off*4:(c.off+c.n)*4]) {
			t.Fatalf("ReadChunk(%d, %d) differs from what was written", c.off, c.n)
		}
		buf.ReleaseChunk(c.off, c.n, b)
	}
	if err := buf.Sync(); err != nil {
		t.Fatal(err)
	}
	if free, total := be.StagingSlots(); free != total || total < be.Runtime().Pool().Slots() {
		t.Fatalf("%d of %d staging slots free after Sync (pool %d)", free, total, be.Runtime().Pool().Slots())
	}
	if _, err := buf.ReadChunk(n-1, 2); err == nil {
		t.Fatal("ReadChunk past the end succeeded")
	}
	if err := buf.WriteChunk(0, collective.Segments{make([]byte, 3)}); err == nil {
		t.Fatal("WriteChunk of a partial element succeeded")
	}
}

// Peer paths: same device and, with two GPUs, across devices.
func TestPeerReduceAndWrite(t *testing.T) {
	be := openBackend(t)
	r := rand.New(rand.NewPCG(5, 6))
	const n = 100001
	for _, pair := range [][2]int{{0, 0}, {0, 1}, {1, 0}} {
		if pair[1] >= be.NumDevices() || pair[0] >= be.NumDevices() {
			continue
		}
		for _, dt := range []collective.DType{collective.Float32, collective.BFloat16, collective.Int64} {
			a, b := randomHost(r, dt, n), randomHost(r, dt, n)
			da, err := be.NewBuffer(pair[0], dt, n)
			if err != nil {
				t.Fatal(err)
			}
			db, err := be.NewBuffer(pair[1], dt, n)
			if err != nil {
				t.Fatal(err)
			}
			if err := da.Upload(a.Bytes()); err != nil {
				t.Fatal(err)
			}
			if err := db.Upload(b.Bytes()); err != nil {
				t.Fatal(err)
			}
			if ok, err := da.PeerReduce(10, db, 20, n-30, collective.OpSum); !ok || err != nil {
				t.Fatalf("PeerReduce: %v %v", ok, err)
			}
			if ok, err := da.PeerWrite(0, db, 0, 5); !ok || err != nil {
				t.Fatalf("PeerWrite: %v %v", ok, err)
			}
			a.ReduceChunk(10, collective.Segments{b.Bytes()[20*dt.Size() : (n-10)*dt.Size()]}, collective.OpSum)
			copy(a.Bytes()[:5*dt.Size()], b.Bytes())
			got := make([]byte, n*dt.Size())
			if err := da.Download(got); err != nil {
				t.Fatal(err)
			}
			t.Logf("devices %v %v", pair, dt)
			compareBytes(t, dt, got, a.Bytes())
			da.Free()
			db.Free()
		}
	}
	// a host buffer is not a peer: fall back
	d, _ := be.NewBuffer(0, collective.Float32, 4)
	defer d.Free()
	if ok, _ := d.PeerReduce(0, collective.NewHostBuffer(collective.Float32, 4), 0, 4, collective.OpSum); ok {
		t.Fatal("PeerReduce claimed a host buffer")
	}
}

func TestDTypeAndOpMapping(t *testing.T) {
	for _, dt := range collective.AllDTypes {
		c, err := DType(dt)
		if err != nil || c.Size() != dt.Size() || c.String() != dt.String() {
			t.Errorf("%v -> %v, %v", dt, c, err)
		}
	}
	for _, op := range collective.AllOps {
		c, err := Op(op)
		if err != nil || c.String() != op.String() {
			t.Errorf("%v -> %v, %v", op, c, err)
		}
	}
	if _, err := DType(0); err == nil {
		t.Error("invalid dtype mapped")
	}
	_ = math.NaN
}
