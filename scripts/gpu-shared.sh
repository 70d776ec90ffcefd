#!/usr/bin/env bash
# Ranks sharing the GPUs of whatever machine is lent (1 or 2 GPUs): the CUDA
# test binaries, then `gpumesh bench allreduce --device cuda --procs` with 2, 4
# and 8 processes, each beside Gloo with CUDA tensors and the same number of
# processes, in the same call. Run from anywhere:
#   bash DIR/gpu-shared.sh         (DIR as made by gpu-build.sh)
# Knobs (environment): RANKS (default "2 4 8"), SIZES (default
# 1MiB,4MiB,16MiB,32MiB,64MiB,256MiB), TESTS (cudabuf test regexp, default all;
# NOTESTS=1 skips the test binaries).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" || { echo "$0: needs gpu-lib.sh beside it (gpu-build.sh copies both)" >&2; exit 1; }
gpu_setup 44
sizes=${SIZES:-1MiB,4MiB,16MiB,32MiB,64MiB,256MiB}
mibs=$(echo "$sizes" | sed 's/MiB//g')

if [ -z "${NOTESTS:-}" ]; then
	cudabuf_tests "go test cudabuf (-tags cuda)"
	if [ -x "$dir/cuda.test" ]; then
		if timeout 200 "$dir/cuda.test" -test.v -test.count=1 >"$logs/cuda-tests.log" 2>&1; then
			row "go test cuda (-tags cuda)" "PASS ($(grep -c '^=== RUN' "$logs/cuda-tests.log") runs)"
		else
			row "go test cuda (-tags cuda)" "FAIL (see cuda-tests.log)"
		fi
	fi
fi

for n in ${RANKS:-2 4 8}; do
	echo "==== gpumesh bench allreduce --device cuda --procs --ranks $n --sizes $sizes" >>"$logs/bench.log"
	timeout 240 "$dir/gpumesh" bench allreduce --device cuda --procs --ranks "$n" --sizes "$sizes" --iters 10 >"$logs/cli.txt" 2>&1
	cat "$logs/cli.txt" >>"$logs/bench.log"
	# rows: SIZE ... BUSBW ... WRONG ... RAW TCP ...
	grep -E '^ *[0-9.]+[KMG]iB' "$logs/cli.txt" | while read -r l; do
		row "gpumesh $n procs $(echo "$l" | awk '{print $1}')" "$l"
	done
	if [ -f "$py" ]; then
		baseline "gloo-cuda-$n" 240 "gloo cuda $n $((29600 + n)) $mibs 5" GLOO_SOCKET_IFNAME=lo
	fi
done
rm -f "$logs/cli.txt"
summary "shared GPUs"
