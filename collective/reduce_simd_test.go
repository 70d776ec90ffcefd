package collective

import (
	"math"
	"math/rand"
	"testing"
)

// TestVectorSumsMatchScalar: the vector sums give the scalar loop's bits
// for every length 0..300 and offsets that misalign the slices, with NaN,
// infinities, signed zeros and subnormals among the values.
func TestVectorSumsMatchScalar(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	special32 := []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1)), 0, float32(math.Copysign(0, -1)), math.SmallestNonzeroFloat32, math.MaxFloat32}
	special64 := []float64{math.NaN(), math.Inf(1), math.Inf(-1), 0, math.Copysign(0, -1), math.SmallestNonzeroFloat64, math.MaxFloat64}
	for n := 0; n <= 300; n++ {
		for _, off := range []int{0, 1, 3} {
			a32, b32 := make([]float32, n+off), make([]float32, n+off)
			a64, b64 := make([]float64, n+off), make([]float64, n+off)
			for i := range a32 {
				a32[i], b32[i] = float32(rng.NormFloat64()*1e3), float32(rng.NormFloat64())
				a64[i], b64[i] = rng.NormFloat64()*1e3, rng.NormFloat64()
				if rng.Intn(10) == 0 {
					a32[i], a64[i] = special32[rng.Intn(len(special32))], special64[rng.Intn(len(special64))]
				}
			}
			w32 := append([]float32(nil), a32...)
			w64 := append([]float64(nil), a64...)
			sumT(w32[off:], b32[off:])
			sumT(w64[off:], b64[off:])
			sumF32(a32[off:], b32[off:])
			sumF64(a64[off:], b64[off:])
			for i := range a32 {
				if math.Float32bits(a32[i]) != math.Float32bits(w32[i]) {
					t.Fatalf("float32 n=%d off=%d i=%d: %x want %x", n, off, i, math.Float32bits(a32[i]), math.Float32bits(w32[i]))
				}
				if math.Float64bits(a64[i]) != math.Float64bits(w64[i]) {
					t.Fatalf("float64 n=%d off=%d i=%d: %x want %x", n, off, i, math.Float64bits(a64[i]), math.Float64bits(w64[i]))
				}
			}
		}
	}
}

// BenchmarkSumF32 compares the vector and scalar float32 sums on 256 KiB
// (a lane piece: cache-resident).
func BenchmarkSumF32(b *testing.B) {
	d, s := make([]float32, 64<<10), make([]float32, 64<<10)
	for _, c := range []struct {
		name string
		f    func(d, s []float32)
	}{{"vector", sumF32}, {"scalar", sumT[float32]}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(int64(4 * len(d)))
			for i := 0; i < b.N; i++ {
				c.f(d, s)
			}
		})
	}
}
