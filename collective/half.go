package collective

import (
	"math"
	"sync"
)

// Float16 and bfloat16 conversions. Conversions to the narrow types round to
// nearest, ties to even, like the hardware and like NumPy/PyTorch; NaN stays
// NaN (quiet) and overflow becomes infinity.

// F16ToF32 converts IEEE 754 binary16 bits to a float32 (exact).
func F16ToF32(h uint16) float32 { return math.Float32frombits(f16bits(h)) }

func f16bits(h uint16) uint32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch exp {
	case 0x1f:
		return sign | 0x7f800000 | mant<<13
	case 0:
		if mant == 0 {
			return sign
		}
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		return sign | e<<23 | (mant&0x3ff)<<13
	}
	return sign | (exp+112)<<23 | mant<<13
}

// F32ToF16 converts a float32 to binary16 bits, rounding to nearest even.
func F32ToF16(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	fexp := b & 0x7f800000
	if fexp >= 0x47800000 { // overflow, inf or NaN
		if fexp == 0x7f800000 {
			if sig := b & 0x007fffff; sig != 0 {
				return sign | 0x7e00 | uint16(sig>>13)
			}
		}
		return sign | 0x7c00
	}
	if fexp <= 0x38000000 { // subnormal half or zero
		if fexp < 0x33000000 {
			return sign
		}
		e := fexp >> 23
		sig := 0x00800000 + (b & 0x007fffff)
		sig >>= 113 - e
		if (sig&0x3fff) != 0x1000 || b&0x7ff != 0 {
			sig += 0x1000
		}
		return sign + uint16(sig>>13)
	}
	hexp := uint16((fexp - 0x38000000) >> 13)
	sig := b & 0x007fffff
	if sig&0x3fff != 0x1000 {
		sig += 0x1000
	}
	return sign + (uint16(sig>>13) + hexp)
}

// BF16ToF32 converts bfloat16 bits to a float32 (exact).
func BF16ToF32(h uint16) float32 { return math.Float32frombits(uint32(h) << 16) }

// F32ToBF16 converts a float32 to bfloat16 bits, rounding to nearest even.
func F32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep sign, force quiet
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// f64ToF32Odd rounds x to float32 with round-to-odd, so that a second
// rounding to a type of at most 22 significant bits is the correct rounding
// of x (the classic double-rounding fix).
func f64ToF32Odd(x float64) float32 {
	f := float32(x)
	if float64(f) == x || math.IsNaN(x) || math.IsInf(float64(f), 0) {
		return f
	}
	b := math.Float32bits(f)
	if math.Abs(float64(f)) > math.Abs(x) { // rounded away from zero: step back
		b--
	}
	return math.Float32frombits(b | 1)
}

// F64ToF16 rounds a float64 to binary16 bits (nearest even, one rounding).
func F64ToF16(x float64) uint16 { return F32ToF16(f64ToF32Odd(x)) }

// F64ToBF16 rounds a float64 to bfloat16 bits (nearest even, one rounding).
func F64ToBF16(x float64) uint16 { return F32ToBF16(f64ToF32Odd(x)) }

var (
	f16TableOnce sync.Once
	f16Table     *[1 << 16]float32
)

// f16Tab returns a lookup table from binary16 bits to float32.
func f16Tab() *[1 << 16]float32 {
	f16TableOnce.Do(func() {
		t := new([1 << 16]float32)
		for i := range t {
			t[i] = F16ToF32(uint16(i))
		}
		f16Table = t
	})
	return f16Table
}
