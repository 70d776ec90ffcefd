#!/usr/bin/env bash
# Ranks sharing the GPUs of whatever machine is lent (1 or 2 GPUs): the CUDA
# test binaries, then `gpumesh bench allreduce --device cuda --procs` with 2, 4
# and 8 processes, on the same-host ring (CUDA IPC) and on the TCP lanes
# (--no-same-host), each beside Gloo with CUDA tensors and the same number of
# processes, in the same call. Run from anywhere:
#   bash DIR/gpu-shared.sh         (DIR as made by gpu-build.sh)
# Knobs (environment): RANKS (default "2 4 8"), SIZES (default
# 1MiB,4MiB,16MiB,32MiB,64MiB,256MiB), TESTS (cudabuf test regexp, default all;
# NOTESTS=1 skips the test binaries), ITERS (default 10), CLI_LIMIT (seconds per
# gpumesh run, default 240), NOGLOO=1 (no Gloo baseline).
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

# gpumesh_rows N PATHNAME: rows from cli.txt (nccl-tests style: size in bytes
# first, then count, type, algorithm, time, algbw, busbw, #wrong, rawTCP, ratio)
gpumesh_rows() {
	awk -v n="$1" -v p="$2" '$1 ~ /^[0-9]+$/ && NF >= 8 {
		printf "gpumesh %s procs %dMiB %s|busbw=%sGB/s algorithm=%s wrong=%s rawTCP=%s\n", n, $1 / 1048576, p, $7, $4, $8, $9
	}' "$logs/cli.txt" | while IFS='|' read -r label value; do
		row "$label" "$value"
	done
}

for n in ${RANKS:-2 4 8}; do
	# the same-host ring (CUDA IPC) as the CLI picks it, then the TCP lanes
	for mode in same-host lanes; do
		extra=(--no-raw-tcp)
		[ "$mode" = lanes ] && extra=(--no-same-host)
		echo "==== gpumesh bench allreduce --device cuda --procs --ranks $n --sizes $sizes ${extra[*]}" >>"$logs/bench.log"
		timeout "${CLI_LIMIT:-240}" "$dir/gpumesh" bench allreduce --device cuda --procs --ranks "$n" --sizes "$sizes" --iters "${ITERS:-10}" "${extra[@]}" >"$logs/cli.txt" 2>&1
		cat "$logs/cli.txt" >>"$logs/bench.log"
		gpumesh_rows "$n" "$mode"
	done
	if [ -f "$py" ] && [ -z "${NOGLOO:-}" ]; then
		baseline "gloo-cuda-$n" 240 "gloo cuda $n $((29600 + n)) $mibs 5" GLOO_SOCKET_IFNAME=lo
	fi
done
rm -f "$logs/cli.txt"
summary "shared GPUs"
