package main

import (
	"strings"
	"testing"
)

// --cuda-issuer needs the cuda build; a bad spin is refused with the flag's
// name. Neither starts a benchmark.
func TestBenchAllReduceCUDAIssuerFlags(t *testing.T) {
	if setCUDAIssuer == nil {
		_, err := runCLI(t, "bench", "allreduce", "--device", "cuda", "--cuda-issuer")
		if err == nil || !strings.Contains(err.Error(), "--cuda-issuer") || !strings.Contains(err.Error(), "-tags cuda") {
			t.Fatalf("--cuda-issuer in a build without CUDA: %v", err)
		}
		return
	}
	_, err := runCLI(t, "bench", "allreduce", "--device", "cuda", "--cuda-issuer", "--cuda-issuer-spin", "-1us")
	if err == nil || !strings.Contains(err.Error(), "--cuda-issuer-spin") {
		t.Fatalf("negative --cuda-issuer-spin: %v", err)
	}
}
