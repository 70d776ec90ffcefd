#!/usr/bin/env bash
# Run the CUDA test binaries, the gpumesh CUDA benchmarks and the NCCL/Gloo
# baselines on a GPU machine, then print one table. Run from anywhere:
#   bash DIR/gpu-run.sh [quick|full]      (DIR as made by gpu-build.sh)
# Logs go to $OUT (or logs in the temporary copy of DIR the binaries are
# unpacked in), emptied first. Needs 2 GPUs for the 2-rank rows.
# Knobs (environment): RING_BENCH (test regexp for the in-process and IPC ring
# benches, default both), TCP_CONFIGS (CHANNELSxCHUNK_KIB list), CLI=0 skips
# the gpumesh bench command, BASELINES (names, default all for full, nccl-default
# for quick).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in every run.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" || { echo "$0: needs gpu-lib.sh beside it (gpu-build.sh copies both)" >&2; exit 1; }
mode=${1:-full}
gpu_setup 58

# 1. correctness: the -tags cuda test binaries
for tb in "$dir"/*.test; do
	[ -e "$tb" ] || continue
	name=$(basename "$tb" .test)
	tl=$(mktemp)
	if timeout 240 "$tb" -test.v -test.count=1 >"$tl" 2>&1; then
		row "go test $name (-tags cuda)" "PASS ($(grep -c '^=== RUN' "$tl") runs)"
	else
		row "go test $name (-tags cuda)" "FAIL (see tests.log)"
		grep -E -- '--- FAIL|panic:|Error' "$tl" | head -20
	fi
	{ echo "==== $name"; cat "$tl"; } >>"$logs/tests.log"
	rm -f "$tl"
done

# 2. gpumesh benchmarks
if [ -x "$t" ] && [ "$ngpu" -ge 2 ]; then
	bench timeout 200 "$t" -test.run "${RING_BENCH:-LocalRingBandwidth|IPCRingSeparateProcesses}" -test.v
	bench GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-}" timeout 200 "$t" -test.run 'TCPSeparateProcesses' -test.v
	# a second TCP run with other settings (TCP2_ENV: assignments; default:
	# staging waits sleep instead of spinning)
	if [ -n "${TCP2_CONFIGS-4x1024,16x1024}" ]; then
		# shellcheck disable=SC2086
		bench GPUMESH_TCP_DEVICES=cuda GPUMESH_TCP_CONFIGS="${TCP2_CONFIGS-4x1024,16x1024}" ${TCP2_ENV:-GPUMESH_SPIN=0} \
			timeout 150 "$t" -test.run 'TCPSeparateProcesses' -test.v
	fi
	grep -E '^(local|ipc|tcp) ' "$logs/bench.log" | grep busbw | while read -r l; do
		row "gpumesh $(echo "$l" | awk '{print $1, $2, $3, $4, $5, $6, $7}' | sed -e 's/time=.*//' -e 's/channels=/ch=/')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s')"
	done
	grep -E '^tcp .*correctness' "$logs/bench.log" | head -1 | sed 's/^/    /' | tee -a "$table"
fi
if [ "${CLI:-1}" = 1 ] && [ -x "$dir/gpumesh" ] && "$dir/gpumesh" bench allreduce --help 2>/dev/null | grep -q -- '--device'; then
	for args in "--procs" "--procs --channels 16" ""; do
		echo "==== gpumesh bench allreduce --device cuda --ranks 2 $args" >>"$logs/bench.log"
		# shellcheck disable=SC2086
		timeout 150 "$dir/gpumesh" bench allreduce --device cuda --ranks 2 --sizes 1MiB,64MiB,256MiB $args >"$logs/cli.txt" 2>&1
		cat "$logs/cli.txt" >>"$logs/bench.log"
		echo "    gpumesh bench allreduce --device cuda --ranks 2 $args" | tee -a "$table"
		grep -E '^ +[0-9]|error|Error' "$logs/cli.txt" | head -12 | sed 's/^/      /' | tee -a "$table"
	done
	rm -f "$logs/cli.txt"
fi

# 3. baselines (PyTorch NCCL and Gloo), same call
if [ "$ngpu" -ge 2 ]; then
	want=${BASELINES:-}
	if [ -z "$want" ]; then
		if [ "$mode" = full ]; then want="nccl-default nccl-sock-2x8 nccl-sock-4x4 nccl-shm gloo-cuda"; else want="nccl-default"; fi
	fi
	# shellcheck disable=SC2086
	baselines 180 $want
fi
summary
