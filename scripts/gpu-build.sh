#!/usr/bin/env bash
# Build the CUDA (-tags cuda) gpumesh binary and the -tags cuda test binaries
# into one folder that can be carried to a GPU machine and run there with
# gpu-run.sh, gpu-hop.sh, gpu-tcp.sh, gpu-shared.sh or gpu-pipeline.sh (copied in as well, beside the
# gpu-lib.sh they source).
#
# The NCCL/Gloo baseline script, bench/torch_allreduce.py, is copied in too.
#
# Usage: scripts/gpu-build.sh [-o OUTDIR] [-t TORCH_ALLREDUCE_PY]
#   -o OUTDIR   where to put everything (default: .gpu/cuda under the repo root,
#               or $GPU_OUT)
#   -t FILE     a different baseline script to copy in instead of
#               bench/torch_allreduce.py (or $TORCH_ALLREDUCE)
# Needs: Go, the CUDA headers (cuda.h) and libcuda.so (the driver's stub is
# enough to link), nvcc only when kernels.cu changed (go generate ./cuda/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${GPU_OUT:-$root/.gpu/cuda}
torch=${TORCH_ALLREDUCE:-$root/bench/torch_allreduce.py}
while getopts "o:t:h" opt; do
	case $opt in
	o) out=$OPTARG ;;
	t) torch=$OPTARG ;;
	*) sed -n 2,15p "$0"; exit 2 ;;
	esac
done
mkdir -p "$out"
cd "$root"
export CGO_ENABLED=1
# go-nvml's cgo calls NVML functions that nvml.h marks deprecated: ~150 lines
# of gcc warnings on a cold build. Only CGO_CFLAGS reaches a dependency's C
# compiler (a plain `go run` cannot silence them; see README).
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g} -Wno-deprecated-declarations"
echo "building into $out"
# The binary must register the CUDA backend (collective device "cuda"). Until
# the command package does (a -tags cuda file calling cudabuf.Register), add
# that call through a build overlay, without touching the tree.
overlay=()
if ! grep -rqs 'cudabuf' cmd/gpumesh/*.go; then
	tmp=$(mktemp -d)
	cat >"$tmp/cuda_register.go" <<'GO'
//go:build cuda

package main

import "github.com/gpumesh/gpumesh/collective/cudabuf"

func init() { cudabuf.Register() }
GO
	printf '{"Replace":{"%s":"%s"}}' "$root/cmd/gpumesh/zz_cuda_register_overlay.go" "$tmp/cuda_register.go" >"$tmp/overlay.json"
	overlay=(-overlay "$tmp/overlay.json")
	echo "NOTE: cmd/gpumesh does not register the CUDA backend; registering it through a build overlay" >&2
fi
if ! go build -tags cuda -trimpath -ldflags='-s -w' "${overlay[@]}" -o "$out/gpumesh" ./cmd/gpumesh; then
	echo "WARNING: the gpumesh binary did not build; building the test binaries anyway" >&2
	rm -f "$out/gpumesh"
fi
# one test binary per package that has tests under the cuda tag
for pkg in $(go list -tags cuda ./... ); do
	name=$(basename "$pkg")
	if [ -n "$(go list -tags cuda -f '{{if or .TestGoFiles .XTestGoFiles}}yes{{end}}' "$pkg")" ]; then
		case $pkg in
		*/cuda | */cudabuf | */pipeline) go test -c -tags cuda -trimpath -ldflags='-s -w' -o "$out/$name.test" "$pkg" ;;
		esac
	fi
done
# at most 64 MiB travels to the GPU machine: ship the binaries compressed
# (the run scripts unpack them)
for b in "$out"/gpumesh "$out"/*.test; do
	[ -e "$b" ] || continue
	ldd "$b" | awk '{print $1}' | grep -v -E 'linux-vdso|ld-linux|libc.so|libm.so|libpthread|libdl|libresolv|librt' | tr '\n' ' ' | sed "s|^|$(basename "$b") needs: |"; echo
	gzip -f -6 "$b"
done
# the run scripts source gpu-lib.sh from their own folder
cp scripts/gpu-lib.sh scripts/gpu-run.sh scripts/gpu-hop.sh scripts/gpu-tcp.sh scripts/gpu-shared.sh scripts/gpu-pipeline.sh "$out"/
cp "$torch" "$out/torch_allreduce.py"
ls -la "$out"
du -sh "$out"
