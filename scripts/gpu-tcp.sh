#!/usr/bin/env bash
# The TCP device path (issue 5's 2-process loopback target) on a GPU machine
# with two GPUs: the cudabuf GPU tests, then gpumesh over loopback TCP (two
# processes, one GPU each) beside NCCL restricted to sockets (2x8 and 4x4
# threads x sockets) and Gloo with CUDA tensors, in the same call, then one
# table.
#   bash DIR/gpu-tcp.sh   (DIR as made by gpu-build.sh: cudabuf.test.gz,
#                          gpumesh.gz, torch_allreduce.py and this script)
# Knobs (environment): TESTS (test regexp, default all), TCP_CONFIGS
# (CHANNELSxCHUNK_KIB list, default 16x1024,16x4096,8x4096,16x8192),
# TCP_DEVICES (default cuda,cpu), SKIP_CLI=1, BASELINES (default
# "nccl-sock-2x8 nccl-sock-4x4 gloo-cuda"; empty skips). Logs go to $OUT (or
# DIR/logs). NVLink multicast stays off.
set -uo pipefail
src=$(cd "$(dirname "$0")" && pwd)
dir=$(mktemp -d)
cp "$src"/* "$dir"/
for z in "$dir"/*.gz; do
	[ -e "$z" ] || continue
	gunzip -f "$z" && chmod +x "${z%.gz}"
done
logs=${OUT:-$dir/logs}
mkdir -p "$logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
table=$logs/table.txt
: >"$table"
row() { printf '%-78s %s\n' "$1" "$2" | tee -a "$table"; }
t=$dir/cudabuf.test
nvidia-smi -L | tee "$logs/gpus.txt"
echo "start $(date -u +%Y-%m-%dT%H:%M:%SZ) $(uptime)" | tee -a "$table"

# 1. correctness
start=$(date +%s)
if timeout 200 "$t" -test.v -test.count=1 -test.run "${TESTS:-.}" >"$logs/tests.log" 2>&1; then
	row "go test cudabuf (-tags cuda) ${TESTS:-all}" "PASS ($(grep -c '^=== RUN' "$logs/tests.log") runs, $(($(date +%s) - start)) s)"
else
	row "go test cudabuf (-tags cuda) ${TESTS:-all}" "FAIL ($(grep -c -- '--- FAIL' "$logs/tests.log") failed)"
	grep -E -- '--- FAIL|panic:|_test.go:[0-9]+' "$logs/tests.log" | head -30 | tee -a "$table"
fi
grep -E -- '--- (PASS|FAIL): Test(RecvStager|SizedSlot|TCPSeparate)' "$logs/tests.log" | sed 's/^/    /' | tee -a "$table"

# 2. gpumesh over loopback TCP, two processes
echo "==== tcp" >>"$logs/bench.log"
GPUMESH_CUDA_BENCH=1 GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-16x1024,16x4096,8x4096,16x8192}" GPUMESH_TCP_DEVICES="${TCP_DEVICES:-cuda,cpu}" \
	timeout 200 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v >>"$logs/bench.log" 2>&1
grep -E '^tcp .*busbw' "$logs/bench.log" | while read -r l; do
	row "$(echo "$l" | sed -e 's/ time=.*//' -e 's/channels=/ch=/' -e 's/ wait=[a-z,]*//')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s') $(echo "$l" | grep -o 'direct=[0-9]* hostcopies=[0-9]*')"
done
if [ "${SKIP_CLI:-0}" != 1 ] && [ -x "$dir/gpumesh" ]; then
	for args in "--procs" "" "--shortcut off --channels 16 --chunk 1MiB"; do
		echo "==== gpumesh bench allreduce --device cuda --ranks 2 $args" >>"$logs/cli.log"
		# shellcheck disable=SC2086
		timeout 120 "$dir/gpumesh" bench allreduce --device cuda --ranks 2 --sizes 64MiB,256MiB --no-raw-tcp $args >>"$logs/cli.log" 2>&1
		sed -n "/==== gpumesh bench allreduce --device cuda --ranks 2 $args\$/,\$p" "$logs/cli.log" | grep -E '^ +[0-9]' | while read -r l; do
			set -- $l
			row "cli --device cuda --ranks 2 $args size=$(($1 >> 20))MiB" "busbw=${7}GB/s wrong=${8}"
		done
	done
fi

# 3. baselines, same call
py=$dir/torch_allreduce.py
if [ -f "$py" ]; then
	for name in ${BASELINES-nccl-sock-2x8 nccl-sock-4x4 gloo-cuda}; do
		case $name in
		nccl-sock-2x8) e="NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo NCCL_SOCKET_NTHREADS=2 NCCL_NSOCKS_PERTHREAD=8" a="nccl cuda 2 29512 64,256 10" ;;
		nccl-sock-4x4) e="NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4" a="nccl cuda 2 29513 64,256 10" ;;
		gloo-cuda) e="GLOO_SOCKET_IFNAME=lo" a="gloo cuda 2 29515 64,256 5" ;;
		*) continue ;;
		esac
		echo "==== $name" >>"$logs/baselines.log"
		# shellcheck disable=SC2086
		env $e timeout 100 python3 "$py" $a >>"$logs/baselines.log" 2>&1
		sed -n "/==== $name/,\$p" "$logs/baselines.log" | grep busbw | while read -r l; do
			row "baseline $name $(echo "$l" | grep -o 'size= *[0-9]*MiB' | tr -d ' ')" "$(echo "$l" | grep -o 'busbw= *[0-9.]*GB/s' | tr -d ' ')"
		done
	done
fi
echo
echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nvidia-smi -L | wc -l) GPU(s), $(date -u +%Y-%m-%dT%H:%MZ), $(uptime)) ===="
cat "$table"
