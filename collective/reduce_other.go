//go:build !amd64

package collective

func sumF32(d, s []float32) { sumT(d, s) }
func sumF64(d, s []float64) { sumT(d, s) }
