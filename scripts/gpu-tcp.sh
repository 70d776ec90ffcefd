#!/usr/bin/env bash
# The TCP device path (issue 5's 2-process loopback target) on a GPU machine
# with two GPUs: the cudabuf GPU tests, then gpumesh over loopback TCP (two
# processes, one GPU each) beside NCCL restricted to sockets (2x8 and 4x4
# threads x sockets) and Gloo with CUDA tensors, in the same call, then one
# table.
#   bash DIR/gpu-tcp.sh   (DIR as made by gpu-build.sh: cudabuf.test.gz,
#                          gpumesh.gz, torch_allreduce.py, gpu-lib.sh and
#                          this script)
# Knobs (environment): TESTS (test regexp, default all), TCP_CONFIGS
# (CHANNELSxCHUNK_KIB list, default 16x1024,16x4096,8x4096,16x8192),
# TCP_DEVICES (default cuda,cpu), SKIP_CLI=1, BASELINES (names as in
# gpu-lib.sh, default "nccl-sock-2x8 nccl-sock-4x4 gloo-cuda"; empty skips).
# Logs go to $OUT (or logs in the temporary copy of DIR the binaries are
# unpacked in), emptied first. NVLink multicast stays off.
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" || { echo "$0: needs gpu-lib.sh beside it (gpu-build.sh copies both)" >&2; exit 1; }
gpu_setup 78
echo "start $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uptime)" | tee -a "$table"

# 1. correctness
if ! cudabuf_tests "go test cudabuf (-tags cuda) ${TESTS:-all}"; then
	grep -E -- '--- FAIL|panic:|_test.go:[0-9]+' "$logs/tests.log" | head -30 | tee -a "$table"
fi
grep -E -- '--- (PASS|FAIL): Test(RecvStager|SizedSlot|TCPSeparate)' "$logs/tests.log" | sed 's/^/    /' | tee -a "$table"

# 2. gpumesh over loopback TCP, two processes
bench GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-16x1024,16x4096,8x4096,16x8192}" GPUMESH_TCP_DEVICES="${TCP_DEVICES:-cuda,cpu}" \
	timeout 200 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v
grep -E '^tcp .*busbw' "$logs/bench.log" | while read -r l; do
	row "$(echo "$l" | sed -e 's/ time=.*//' -e 's/channels=/ch=/' -e 's/ wait=[a-z,]*//')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s') $(echo "$l" | grep -o 'direct=[0-9]* hostcopies=[0-9]*')"
done
if [ "${SKIP_CLI:-0}" != 1 ] && [ -x "$dir/gpumesh" ]; then
	for args in "--procs" "" "--shortcut off --channels 16 --chunk 1MiB"; do
		echo "==== gpumesh bench allreduce --device cuda --ranks 2 $args" >>"$logs/cli.log"
		# shellcheck disable=SC2086
		timeout 120 "$dir/gpumesh" bench allreduce --device cuda --ranks 2 --sizes 64MiB,256MiB --no-raw-tcp $args >>"$logs/cli.log" 2>&1
		sed -n "/==== gpumesh bench allreduce --device cuda --ranks 2 $args\$/,\$p" "$logs/cli.log" | grep -E '^ +[0-9]' | while read -r l; do
			# shellcheck disable=SC2086
			set -- $l
			row "cli --device cuda --ranks 2 $args size=$(($1 >> 20))MiB" "busbw=${7}GB/s wrong=${8}"
		done
	done
fi

# 3. baselines, same call
# shellcheck disable=SC2086
baselines 100 ${BASELINES-nccl-sock-2x8 nccl-sock-4x4 gloo-cuda}
summary "$(uptime)"
