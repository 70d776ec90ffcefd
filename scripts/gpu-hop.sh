#!/usr/bin/env bash
# Peer hops inside a process and the TCP device path, on a GPU machine with
# two GPUs: the cudabuf GPU tests, the hop and TCP benchmarks and the NCCL
# socket baselines in the same call, then one table.
#   bash DIR/gpu-hop.sh          (DIR as made by gpu-build.sh: cudabuf.test.gz,
#                                 torch_allreduce.py and this script)
# Knobs (environment): TESTS (test regexp, default all), TCP_CONFIGS
# (CHANNELSxCHUNK_KIB list for the 2-process TCP rows; TCP_CONFIGS2 for the
# variant rows, HYBRID_CONFIGS for the 2x2 ring), TCP_VARIANTS and
# HYBRID_VARIANTS (';'-separated sets of GPUMESH_* assignments: POLL=1,
# PREFETCH=0, SPIN=0, RANGE_DEPS=1, EAGER_PEER=1; an empty set is the
# default), TEST_ENV (assignments for the test step), SKIP_PEER=1, BASELINES (default
# "nccl-sock-2x8 nccl-sock-4x4"; empty skips), SKIP_BENCH=1.
# Logs go to $OUT (or DIR/logs). NVLink multicast stays off.
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
row() { printf '%-70s %s\n' "$1" "$2" | tee -a "$table"; }
t=$dir/cudabuf.test
nvidia-smi -L | tee "$logs/gpus.txt"
echo "start $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee -a "$table"

# 1. correctness
start=$(date +%s)
# shellcheck disable=SC2086
if env ${TEST_ENV:-} timeout 200 "$t" -test.v -test.count=1 -test.run "${TESTS:-.}" >"$logs/tests.log" 2>&1; then
	row "go test cudabuf (-tags cuda) ${TESTS:-all} ${TEST_ENV:-}" "PASS ($(grep -c '^=== RUN' "$logs/tests.log") runs, $(($(date +%s) - start)) s)"
else
	row "go test cudabuf (-tags cuda) ${TESTS:-all} ${TEST_ENV:-}" "FAIL ($(grep -c -- '--- FAIL' "$logs/tests.log") failed)"
	grep -E -- '--- FAIL|panic:|peerpath|hybrid_cuda|comm_cuda' "$logs/tests.log" | head -30
fi
grep -E '^hybrid .*(ok|stats)' "$logs/tests.log" | sed 's/^/    /' | tee -a "$table"

# 2. benchmarks
if [ "${SKIP_BENCH:-0}" != 1 ]; then
	b() { echo "==== $*" >>"$logs/bench.log"; env GPUMESH_CUDA_BENCH=1 "$@" >>"$logs/bench.log" 2>&1; }
	if [ "${SKIP_PEER:-0}" != 1 ]; then
		b timeout 90 "$t" -test.run '^TestCommunicatorPeerBandwidth$' -test.v
	fi
	# TCP rows: the default options (device and host buffers), then each
	# variant (environment assignments, ';'-separated) on device buffers
	b GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-16x1024,16x2048}" timeout 120 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v
	IFS=';' read -ra vs <<<"${TCP_VARIANTS-GPUMESH_POLL=1;GPUMESH_POLL=shared}"
	for v in "${vs[@]}"; do
		# shellcheck disable=SC2086
		b $v GPUMESH_TCP_DEVICES=cuda GPUMESH_TCP_CONFIGS="${TCP_CONFIGS2:-16x1024,16x2048}" timeout 80 "$t" -test.run '^TestTCPSeparateProcesses$' -test.v
	done
	IFS=';' read -ra vs <<<"${HYBRID_VARIANTS-;GPUMESH_POLL=shared}"
	for v in "${vs[@]}"; do
		# shellcheck disable=SC2086
		b $v GPUMESH_HYBRID_CONFIGS="${HYBRID_CONFIGS:-8x4096,4x8192}" timeout 100 "$t" -test.run '^TestHybridRingSeparateProcesses$' -test.v
	done
	grep -E '^(peer|tcp|hybrid) .*busbw' "$logs/bench.log" | while read -r l; do
		row "$(echo "$l" | sed -e 's/ time=.*//' -e 's/channels=/ch=/' -e 's/transport=//')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s\( slots=[0-9]*\)\?')"
	done
fi

# 3. baselines, same call
py=$dir/torch_allreduce.py
if [ -f "$py" ]; then
	for name in ${BASELINES-nccl-sock-2x8 nccl-sock-4x4}; do
		case $name in
		nccl-sock-2x8) e="NCCL_SOCKET_NTHREADS=2 NCCL_NSOCKS_PERTHREAD=8" port=29512 ;;
		nccl-sock-4x4) e="NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4" port=29513 ;;
		*) continue ;;
		esac
		echo "==== $name" >>"$logs/baselines.log"
		env NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo $e \
			timeout 100 python3 "$py" nccl cuda 2 $port 64,256 10 >>"$logs/baselines.log" 2>&1
		sed -n "/==== $name/,\$p" "$logs/baselines.log" | grep busbw | while read -r l; do
			row "baseline $name $(echo "$l" | grep -o 'size= *[0-9]*MiB' | tr -d ' ')" "$(echo "$l" | grep -o 'busbw= *[0-9.]*GB/s' | tr -d ' ')"
		done
	done
fi
echo
echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(nvidia-smi -L | wc -l) GPU(s), $(date -u +%Y-%m-%dT%H:%MZ)) ===="
cat "$table"
