//go:build cuda

package cuda

import (
	"context"
	"encoding/binary"
	"errors"
	"math"
	"testing"
	"time"
)

func openRT(t *testing.T) *Runtime {
	t.Helper()
	if !Available() {
		t.Skip("no CUDA device on this host")
	}
	cfg := DefaultConfig()
	cfg.PinnedSlots = 4
	cfg.PinnedSlotBytes = 1 << 20
	rt, err := Open(cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() {
		if err := rt.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if err := rt.Close(); err != nil {
			t.Errorf("second Close: %v", err)
		}
	})
	return rt
}

// splitmix64 as in kernels.cu.
func mix(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9
	x = (x ^ (x >> 27)) * 0x94d049bb133111eb
	return x ^ (x >> 31)
}

func fillValue(seed uint64, i uint64) int64 {
	return int64(mix(seed^(i*0x100000001b3))%16) - 8
}

func TestDevicePropertiesAndKernelsLoad(t *testing.T) {
	rt := openRT(t)
	for _, d := range rt.Devices() {
		p := d.Properties()
		if p.Name == "" || p.TotalMemBytes <= 0 || p.ComputeMajor < 7 || p.Multiprocessor <= 0 {
			t.Errorf("device %d properties: %+v", d.Ordinal(), p)
		}
		free, total, err := d.MemInfo()
		if err != nil || free <= 0 || total < free {
			t.Errorf("MemInfo: %d %d %v", free, total, err)
		}
		if len(d.fns) != len(kernelNames()) {
			t.Errorf("%d kernels loaded, want %d", len(d.fns), len(kernelNames()))
		}
		t.Logf("%+v", p)
	}
}

// Fill, reduce, div on float32 and int64 against values computed here.
func TestKernelsFillReduceDiv(t *testing.T) {
	rt := openRT(t)
	d := rt.Devices()[0]
	const n = 1<<20 + 3
	s, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	for _, dt := range []DType{Float32, Int64, Float16, BFloat16} {
		a, _ := d.Alloc(int64(n * dt.Size()))
		b, _ := d.Alloc(int64(n * dt.Size()))
		if err := s.Fill(dt, a.Ptr(), n, 11, false); err != nil {
			t.Fatal(err)
		}
		if err := s.Fill(dt, b.Ptr(), n, 22, false); err != nil {
			t.Fatal(err)
		}
		if err := s.Reduce(Sum, dt, a.Ptr(), b.Ptr(), n); err != nil {
			t.Fatal(err)
		}
		if err := s.Div(dt, a.Ptr(), n, 2); err != nil {
			t.Fatal(err)
		}
		if err := s.Synchronize(); err != nil {
			t.Fatal(err)
		}
		host := make([]byte, n*dt.Size())
		if err := d.CopyDtoH(host, a.Ptr()); err != nil {
			t.Fatal(err)
		}
		for i := uint64(0); i < n; i += 997 {
			sum := fillValue(11, i) + fillValue(22, i)
			var got float64
			want := float64(sum) / 2
			switch dt {
			case Float32:
				got = float64(math.Float32frombits(binary.LittleEndian.Uint32(host[i*4:])))
			case Int64:
				got = float64(int64(binary.LittleEndian.Uint64(host[i*8:])))
				want = float64(sum / 2) // truncation toward zero
			case Float16, BFloat16:
				h := binary.LittleEndian.Uint16(host[i*2:])
				if dt == BFloat16 {
					got = float64(math.Float32frombits(uint32(h) << 16))
				} else {
					got = halfToFloat(h)
				}
			}
			if got != want {
				t.Fatalf("%v element %d: got %v, want %v", dt, i, got, want)
			}
		}
		scratch, _ := d.Alloc(8)
		if c, err := s.CountMismatch(dt, a.Ptr(), a.Ptr(), n, scratch); err != nil || c != 0 {
			t.Fatalf("CountMismatch(a, a) = %d, %v", c, err)
		}
		if c, err := s.CountMismatch(dt, a.Ptr(), b.Ptr(), n, scratch); err != nil || c == 0 {
			t.Fatalf("CountMismatch(a, b) = %d, %v; want > 0", c, err)
		}
		a.Free()
		b.Free()
		scratch.Free()
	}
	if err := s.Reduce(Op(99), Float32, 0, 0, 1); !errors.Is(err, ErrUnsupported) {
		t.Fatalf("bad op: %v", err)
	}
}

func halfToFloat(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	e := int(h>>10) & 0x1f
	m := float64(h & 0x3ff)
	if e == 0 {
		return sign * m * math.Pow(2, -24)
	}
	return sign * (1 + m/1024) * math.Pow(2, float64(e-15))
}

func TestPinnedPoolAndEvents(t *testing.T) {
	rt := openRT(t)
	d := rt.Devices()[0]
	p := rt.Pool()
	var got []*PinnedBuffer
	for i := 0; i < p.Slots(); i++ {
		b, err := p.Get(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, b)
	}
	if _, ok := p.TryGet(); ok {
		t.Fatal("TryGet on an empty pool succeeded")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
	defer cancel()
	if _, err := p.Get(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Get on an empty pool: %v", err)
	}
	// async round trip through two pinned slots, timed with events
	mem, _ := d.Alloc(int64(p.SlotBytes()))
	defer mem.Free()
	s, _ := d.NewStream()
	defer s.Close()
	start, _ := d.NewEvent(true)
	end, _ := d.NewEvent(true)
	defer start.Close()
	defer end.Close()
	src, dst := got[0].Bytes(), got[1].Bytes()
	for i := range src {
		src[i] = byte(i * 7)
	}
	s.Record(start)
	if err := s.CopyHtoD(mem.Ptr(), src); err != nil {
		t.Fatal(err)
	}
	if err := s.CopyDtoH(dst, mem.Ptr()); err != nil {
		t.Fatal(err)
	}
	s.Record(end)
	if err := end.Synchronize(); err != nil {
		t.Fatal(err)
	}
	if done, err := end.Done(); !done || err != nil {
		t.Fatalf("Done after Synchronize: %v %v", done, err)
	}
	ms, err := end.Elapsed(start)
	if err != nil || ms <= 0 {
		t.Fatalf("Elapsed: %v %v", ms, err)
	}
	for i := range dst {
		if dst[i] != byte(i*7) {
			t.Fatalf("byte %d differs after the round trip", i)
		}
	}
	for _, b := range got {
		p.Put(b)
	}
	if p.Free() != p.Slots() {
		t.Fatalf("%d free after Put, want %d", p.Free(), p.Slots())
	}
}

func TestPeerCopyBetweenDevices(t *testing.T) {
	rt := openRT(t)
	if len(rt.Devices()) < 2 {
		t.Skip("needs two GPUs")
	}
	a, b := rt.Devices()[0], rt.Devices()[1]
	ok, err := a.CanAccessPeer(b)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("peer access 0->1: %v", ok)
	if ok {
		if err := a.EnablePeerAccess(b); err != nil {
			t.Fatal(err)
		}
		if err := a.EnablePeerAccess(b); err != nil {
			t.Fatalf("enabling twice: %v", err)
		}
	}
	const n = 1 << 20
	ma, _ := a.Alloc(n * 4)
	mb, _ := b.Alloc(n * 4)
	defer ma.Free()
	defer mb.Free()
	sa, _ := a.NewStream()
	defer sa.Close()
	sb, _ := b.NewStream()
	defer sb.Close()
	sb.Fill(Int32, mb.Ptr(), n, 5, false)
	if err := sb.Synchronize(); err != nil {
		t.Fatal(err)
	}
	if err := sa.CopyPeer(ma.Ptr(), a, mb.Ptr(), b, n*4); err != nil {
		t.Fatal(err)
	}
	scratch, _ := a.Alloc(8)
	defer scratch.Free()
	// mismatch kernel on device 0 reading device 1's memory (peer access)
	if ok {
		c, err := sa.CountMismatch(Int32, ma.Ptr(), mb.Ptr(), n, scratch)
		if err != nil || c != 0 {
			t.Fatalf("after peer copy %d elements differ (%v)", c, err)
		}
	}
	// IPC handle round trip inside one process is refused by the driver
	// (same context); only check that the handle call works.
	if _, err := mb.IPCHandle(); err != nil {
		t.Fatalf("IPCHandle: %v", err)
	}
}

// Device.CopyHtoD returns with the bytes in device memory: a copy on one of
// the package's (non-blocking) streams enqueued right after it reads them,
// also while another stream keeps the copy engines busy. cuMemcpyHtoD from
// pageable memory alone returns with its DMA still queued on the legacy
// default stream, which the streams do not wait for: a GPU shared with
// other processes ran that DMA late, and device buffers uploaded this way
// were read with their old contents.
func TestCopyHtoDDoneOnReturn(t *testing.T) {
	rt := openRT(t)
	d := rt.Devices()[0]
	const busyBytes, size, tailBytes = 64 << 20, 4 << 20, 4 << 10
	busyHost, err := d.PinnedAlloc(busyBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer d.PinnedFree(busyHost)
	tail, err := d.PinnedAlloc(tailBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer d.PinnedFree(tail)
	busyDev, err := d.Alloc(busyBytes)
	if err != nil {
		t.Fatal(err)
	}
	defer busyDev.Free()
	mem, err := d.Alloc(size)
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Free()
	busy, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	rd, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer rd.Close()
	host := make([]byte, size)
	for i := 0; i < 40; i++ {
		// the copy engines busy in both directions, and the SMs
		if err := busy.CopyHtoD(busyDev.Ptr(), busyHost); err != nil {
			t.Fatal(err)
		}
		if err := busy.CopyDtoH(busyHost, busyDev.Ptr()); err != nil {
			t.Fatal(err)
		}
		if err := busy.Spin(200 * time.Microsecond); err != nil {
			t.Fatal(err)
		}
		v := byte(i + 1)
		for j := range host {
			host[j] = v
		}
		if err := d.CopyHtoD(mem.Ptr(), host); err != nil {
			t.Fatal(err)
		}
		if err := rd.CopyDtoH(tail, mem.Ptr().Add(size-tailBytes)); err != nil {
			t.Fatal(err)
		}
		if err := rd.Synchronize(); err != nil {
			t.Fatal(err)
		}
		for j, b := range tail {
			if b != v {
				t.Fatalf("round %d: byte %d of the tail read after CopyHtoD is %d, want %d (the upload had not landed)", i, size-tailBytes+j, b, v)
			}
		}
	}
	if err := busy.Synchronize(); err != nil {
		t.Fatal(err)
	}
}

// Stream.Spin delays the stream's later work by at least the duration, and
// only that stream's.
func TestStreamSpinDelaysTheStream(t *testing.T) {
	rt := openRT(t)
	d := rt.Devices()[0]
	s, err := d.NewStream()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	start, _ := d.NewEvent(true)
	end, _ := d.NewEvent(true)
	defer start.Close()
	defer end.Close()
	if err := s.Record(start); err != nil {
		t.Fatal(err)
	}
	if err := s.Spin(2 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	if err := s.Record(end); err != nil {
		t.Fatal(err)
	}
	if err := end.Synchronize(); err != nil {
		t.Fatal(err)
	}
	ms, err := end.Elapsed(start)
	if err != nil {
		t.Fatal(err)
	}
	if ms < 2 {
		t.Fatalf("a 2 ms spin took %.3f ms between its events", ms)
	}
}
