#!/usr/bin/env bash
# Peer hops inside a process and the TCP device path, on a GPU machine with
# two GPUs: the cudabuf GPU tests, the hop and TCP benchmarks and the NCCL
# socket baselines in the same call, then one table.
#   bash DIR/gpu-hop.sh          (DIR as made by gpu-build.sh: cudabuf.test.gz,
#                                 torch_allreduce.py, gpu-lib.sh and this script)
# Knobs (environment): TESTS (test regexp, default all), TCP_CONFIGS
# (CHANNELSxCHUNK_KIB list for the 2-process TCP rows; TCP_CONFIGS2 for the
# variant rows, HYBRID_CONFIGS for the 2x2 ring), TCP_VARIANTS and
# HYBRID_VARIANTS (';'-separated sets of GPUMESH_* assignments: POLL=1,
# PREFETCH=0, SPIN=0, RANGE_DEPS=1, EAGER_PEER=1; an empty set is the
# default), TEST_ENV (assignments for the test step), SKIP_PEER=1, BASELINES (names
# as in gpu-lib.sh, default "nccl-sock-2x8 nccl-sock-4x4"; empty skips),
# SKIP_BENCH=1.
# Logs go to $OUT (or logs in the temporary copy of DIR the binaries are
# unpacked in), emptied first. NVLink multicast stays off.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" || { echo "$0: needs gpu-lib.sh beside it (gpu-build.sh copies both)" >&2; exit 1; }
gpu_setup 70
echo "start $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$table"

# 1. correctness
# shellcheck disable=SC2086
if ! cudabuf_tests "go test cudabuf (-tags cuda) ${TESTS:-all} ${TEST_ENV:-}" ${TEST_ENV:-}; then
	grep -E -- '--- FAIL|panic:|peerpath|hybrid_cuda|comm_cuda' "$logs/tests.log" | head -30
fi
grep -E '^hybrid .*(ok|stats)' "$logs/tests.log" | sed 's/^/    /' | tee -a "$table"

# 2. benchmarks
if [ "${SKIP_BENCH:-0}" != 1 ]; then
	if [ "${SKIP_PEER:-0}" != 1 ]; then
		bench timeout 90 "$t" -test.run '^TestCommunicatorPeerBandwidth$' -test.v
	fi
	# TCP rows: the default options (device and host buffers), then each
	# variant (environment assignments, ';'-separated) on device buffers
	bench GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-16x1024,16x2048}" timeout 120 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v
	IFS=';' read -ra vs <<<"${TCP_VARIANTS-GPUMESH_POLL=1;GPUMESH_POLL=shared}"
	for v in "${vs[@]}"; do
		# shellcheck disable=SC2086
		bench $v GPUMESH_TCP_DEVICES=cuda GPUMESH_TCP_CONFIGS="${TCP_CONFIGS2:-16x1024,16x2048}" timeout 80 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v
	done
	IFS=';' read -ra vs <<<"${HYBRID_VARIANTS-;GPUMESH_POLL=shared}"
	for v in "${vs[@]}"; do
		# shellcheck disable=SC2086
		bench $v GPUMESH_HYBRID_CONFIGS="${HYBRID_CONFIGS:-8x4096,4x8192}" timeout 100 "$t" -test.run '^TestHybridRingSeparateProcesses$' -test.v
	done
	grep -E '^(peer|tcp|hybrid) .*busbw' "$logs/bench.log" | while read -r l; do
		row "$(echo "$l" | sed -e 's/ time=.*//' -e 's/channels=/ch=/' -e 's/transport=//')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s\( slots=[0-9]*\)\?')"
	done
fi

# 3. baselines, same call
# shellcheck disable=SC2086
baselines 100 ${BASELINES-nccl-sock-2x8 nccl-sock-4x4}
summary
