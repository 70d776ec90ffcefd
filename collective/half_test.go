package collective

import (
	"math"
	"math/rand"
	"testing"
)

func TestF16RoundTripAllBits(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := F16ToF32(h)
		if f != f { // NaN stays NaN
			if g := F16ToF32(F32ToF16(f)); g == g {
				t.Fatalf("NaN %#04x did not stay NaN", h)
			}
			continue
		}
		if back := F32ToF16(f); back != h {
			t.Fatalf("f16 %#04x -> %v -> %#04x", h, f, back)
		}
		if back := F64ToF16(float64(f)); back != h {
			t.Fatalf("f16 %#04x -> %v -> (f64) %#04x", h, f, back)
		}
	}
}

// Midpoints between neighbouring f16 values round to the even one; values
// just off the midpoint round to the nearer one.
func TestF16RoundsToNearestEven(t *testing.T) {
	for i := 0; i < 0x7bff; i++ {
		a, b := uint16(i), uint16(i+1)
		fa, fb := float64(F16ToF32(a)), float64(F16ToF32(b))
		mid := (fa + fb) / 2
		even := a
		if a&1 == 1 {
			even = b
		}
		if got := F64ToF16(mid); got != even {
			t.Fatalf("midpoint %v of %#04x,%#04x -> %#04x, want %#04x", mid, a, b, got, even)
		}
		if got := F32ToF16(float32(mid)); got != even && float64(float32(mid)) == mid {
			t.Fatalf("f32 midpoint %v -> %#04x, want %#04x", mid, got, even)
		}
		d := (fb - fa) / 1024
		if got := F64ToF16(mid - d); got != a {
			t.Fatalf("just below midpoint of %#04x,%#04x -> %#04x", a, b, got)
		}
		if got := F64ToF16(mid + d); got != b {
			t.Fatalf("just above midpoint of %#04x,%#04x -> %#04x", a, b, got)
		}
	}
	if F32ToF16(70000) != 0x7c00 || F32ToF16(-70000) != 0xfc00 {
		t.Fatal("overflow must give infinity")
	}
	if F32ToF16(1e-10) != 0 {
		t.Fatal("underflow must give zero")
	}
}

func TestBF16RoundsToNearestEven(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 200000; i++ {
		b := uint16(rng.Intn(0x7f7f))
		fa, fb := float64(BF16ToF32(b)), float64(BF16ToF32(b+1))
		mid := (fa + fb) / 2
		even := b
		if b&1 == 1 {
			even = b + 1
		}
		if got := F32ToBF16(float32(mid)); got != even {
			t.Fatalf("midpoint of %#04x -> %#04x, want %#04x", b, got, even)
		}
		if got := F64ToBF16(mid); got != even {
			t.Fatalf("f64 midpoint of %#04x -> %#04x, want %#04x", b, got, even)
		}
		if got := F32ToBF16(float32(mid + (fb-fa)/64)); got != b+1 {
			t.Fatalf("above midpoint of %#04x -> %#04x", b, got)
		}
		if got := F32ToBF16(BF16ToF32(b)); got != b {
			t.Fatalf("round trip %#04x -> %#04x", b, got)
		}
	}
	if v := BF16ToF32(F32ToBF16(float32(math.NaN()))); v == v {
		t.Fatal("NaN must stay NaN")
	}
}

// Half-precision reductions equal the float64 reference rounded once.
func TestHalfReduceMatchesReference(t *testing.T) {
	rng := rand.New(rand.NewSource(2))
	for _, dt := range []DType{Float16, BFloat16} {
		for _, op := range AllOps {
			a, b := NewHostBuffer(dt, 4096), NewHostBuffer(dt, 4096)
			for i := 0; i < 4096; i++ {
				a.Set(i, rng.NormFloat64()*100)
				b.Set(i, rng.NormFloat64()*100)
			}
			want := make([]float64, 4096)
			for i := range want {
				x, y := a.At(i), b.At(i)
				var r float64
				switch op {
				case OpSum, OpAvg:
					r = x + y
				case OpProd:
					r = x * y
				case OpMax:
					r = math.Max(x, y)
				case OpMin:
					r = math.Min(x, y)
				}
				ref := NewHostBuffer(dt, 1)
				ref.Set(0, r)
				want[i] = ref.At(0)
			}
			if err := a.ReduceChunk(0, Segments{b.Bytes()}, op); err != nil {
				t.Fatal(err)
			}
			for i := range want {
				if a.At(i) != want[i] && !(math.IsInf(want[i], 0) && math.IsInf(a.At(i), 0)) {
					t.Fatalf("%v %v element %d = %v, want %v", dt, op, i, a.At(i), want[i])
				}
			}
		}
	}
}

// Pieces that split elements and misaligned pieces reduce correctly.
func TestReduceSplitPieces(t *testing.T) {
	for _, dt := range AllDTypes {
		n := 1001
		a, b, ref := NewHostBuffer(dt, n), NewHostBuffer(dt, n), NewHostBuffer(dt, n)
		for i := 0; i < n; i++ {
			a.Set(i, float64(i%7))
			b.Set(i, float64(i%5))
			ref.Set(i, float64(i%7+i%5))
		}
		// Copy b's bytes one byte off alignment, then cut into odd pieces.
		raw := make([]byte, len(b.Bytes())+1)[1:]
		copy(raw, b.Bytes())
		var segs Segments
		for off, k := 0, 3; off < len(raw); k = k*2 + 1 {
			end := min(off+k, len(raw))
			segs = append(segs, raw[off:end])
			off = end
		}
		if err := a.ReduceChunk(0, segs, OpSum); err != nil {
			t.Fatal(err)
		}
		if string(a.Bytes()) != string(ref.Bytes()) {
			t.Fatalf("%v: split-piece reduce differs", dt)
		}
		w := NewHostBuffer(dt, n)
		if err := w.WriteChunk(0, segs); err != nil || string(w.Bytes()) != string(b.Bytes()) {
			t.Fatalf("%v: split-piece write differs (%v)", dt, err)
		}
	}
}
