package collective

import (
	"unsafe"
)

// Host reduction kernels. Go does not auto-vectorise, so the loops are
// unrolled by eight with the bounds checks hoisted; on the hot path
// (float32/float64/int sum) they run at memory speed on one core, well above
// what a TCP flow delivers.

type number interface {
	~float32 | ~float64 | ~int32 | ~int64 | ~uint8
}

func sumT[T number](d, s []T) {
	n := len(d)
	s = s[:n]
	i := 0
	for ; i+8 <= n; i += 8 {
		dd, ss := d[i:i+8:i+8], s[i:i+8:i+8] // one bounds check each per 8 elements
		dd[0] += ss[0]
		dd[1] += ss[1]
		dd[2] += ss[2]
		dd[3] += ss[3]
		dd[4] += ss[4]
		dd[5] += ss[5]
		dd[6] += ss[6]
		dd[7] += ss[7]
	}
	for ; i < n; i++ {
		d[i] += s[i]
	}
}

func prodT[T number](d, s []T) {
	n := len(d)
	s = s[:n]
	i := 0
	for ; i+8 <= n; i += 8 {
		dd, ss := d[i:i+8:i+8], s[i:i+8:i+8]
		dd[0] *= ss[0]
		dd[1] *= ss[1]
		dd[2] *= ss[2]
		dd[3] *= ss[3]
		dd[4] *= ss[4]
		dd[5] *= ss[5]
		dd[6] *= ss[6]
		dd[7] *= ss[7]
	}
	for ; i < n; i++ {
		d[i] *= s[i]
	}
}

// maxT and minT propagate NaN (x != x), like torch.maximum.
func maxT[T number](d, s []T) {
	s = s[:len(d)]
	for i := range d {
		if v := s[i]; v > d[i] || v != v {
			d[i] = v
		}
	}
}

func minT[T number](d, s []T) {
	s = s[:len(d)]
	for i := range d {
		if v := s[i]; v < d[i] || v != v {
			d[i] = v
		}
	}
}

func reduceT[T number](op Op, d, s []T) {
	switch op {
	case OpSum, OpAvg:
		sumT(d, s)
	case OpProd:
		prodT(d, s)
	case OpMax:
		maxT(d, s)
	case OpMin:
		minT(d, s)
	}
}

func divT[T number](d []T, k T) {
	for i := range d {
		d[i] /= k
	}
}

// half-precision kernels: each pairwise result is computed exactly in
// float64 and rounded once to the narrow type.
func reduceHalf(op Op, d, s []uint16, bf bool) {
	s = s[:len(d)]
	var tab *[1 << 16]float32
	if !bf {
		tab = f16Tab()
	}
	conv := func(h uint16) float64 {
		if bf {
			return float64(BF16ToF32(h))
		}
		return float64(tab[h])
	}
	round := F64ToF16
	if bf {
		round = F64ToBF16
	}
	switch op {
	case OpSum, OpAvg:
		for i := range d {
			d[i] = round(conv(d[i]) + conv(s[i]))
		}
	case OpProd:
		for i := range d {
			d[i] = round(conv(d[i]) * conv(s[i]))
		}
	case OpMax:
		for i := range d {
			a, b := conv(d[i]), conv(s[i])
			if b > a || b != b {
				d[i] = s[i]
			}
		}
	case OpMin:
		for i := range d {
			a, b := conv(d[i]), conv(s[i])
			if b < a || b != b {
				d[i] = s[i]
			}
		}
	}
}

func divHalf(d []uint16, k int, bf bool) {
	for i := range d {
		if bf {
			d[i] = F64ToBF16(float64(BF16ToF32(d[i])) / float64(k))
		} else {
			d[i] = F64ToF16(float64(F16ToF32(d[i])) / float64(k))
		}
	}
}

func castSlice[T any](b []byte) []T {
	var z T
	if len(b) == 0 {
		return nil
	}
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(b))), len(b)/int(unsafe.Sizeof(z)))
}

func aligned(b []byte, n int) bool {
	return len(b) == 0 || uintptr(unsafe.Pointer(unsafe.SliceData(b)))%uintptr(n) == 0
}

// reduceBytes computes dst = dst op src element-wise. len(dst) == len(src),
// a multiple of dt.Size(); dst is aligned to the element size; src may be
// misaligned (it is then staged through an aligned scratch).
func reduceBytes(dt DType, op Op, dst, src []byte) {
	es := dt.Size()
	if !aligned(src, es) {
		var scratch [2048]uint64
		sb := unsafe.Slice((*byte)(unsafe.Pointer(&scratch[0])), len(scratch)*8)
		for len(src) > 0 {
			n := copy(sb, src)
			reduceBytes(dt, op, dst[:n], sb[:n])
			dst, src = dst[n:], src[n:]
		}
		return
	}
	switch dt {
	case Float32:
		if op == OpSum || op == OpAvg {
			sumF32(castSlice[float32](dst), castSlice[float32](src))
			return
		}
		reduceT(op, castSlice[float32](dst), castSlice[float32](src))
	case Float64:
		if op == OpSum || op == OpAvg {
			sumF64(castSlice[float64](dst), castSlice[float64](src))
			return
		}
		reduceT(op, castSlice[float64](dst), castSlice[float64](src))
	case Int32:
		reduceT(op, castSlice[int32](dst), castSlice[int32](src))
	case Int64:
		reduceT(op, castSlice[int64](dst), castSlice[int64](src))
	case Uint8:
		reduceT(op, dst, src)
	case Float16:
		reduceHalf(op, castSlice[uint16](dst), castSlice[uint16](src), false)
	case BFloat16:
		reduceHalf(op, castSlice[uint16](dst), castSlice[uint16](src), true)
	}
}

// divBytes divides every element of dst by k (the last step of OpAvg).
func divBytes(dt DType, dst []byte, k int) {
	switch dt {
	case Float32:
		divT(castSlice[float32](dst), float32(k))
	case Float64:
		divT(castSlice[float64](dst), float64(k))
	case Int32:
		divT(castSlice[int32](dst), int32(k))
	case Int64:
		divT(castSlice[int64](dst), int64(k))
	case Uint8:
		divT(dst, uint8(k))
	case Float16:
		divHalf(castSlice[uint16](dst), k, false)
	case BFloat16:
		divHalf(castSlice[uint16](dst), k, true)
	}
}
