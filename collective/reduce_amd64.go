package collective

import "golang.org/x/sys/cpu"

// Vector sums (reduce_amd64.s): AVX2 adds lane by lane, each lane the same
// IEEE add as the scalar loop, so results are bit-identical to sumT (the
// reduction order of every element is unchanged).

//go:noescape
func addF32AVX2(d, s []float32)

//go:noescape
func addF64AVX2(d, s []float64)

var haveAVX2 = cpu.X86.HasAVX2

func sumF32(d, s []float32) {
	if haveAVX2 {
		addF32AVX2(d, s[:len(d)])
		return
	}
	sumT(d, s)
}

func sumF64(d, s []float64) {
	if haveAVX2 {
		addF64AVX2(d, s[:len(d)])
		return
	}
	sumT(d, s)
}
