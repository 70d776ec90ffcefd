#!/usr/bin/env bash
# Run the CUDA test binaries, the gpumesh CUDA benchmarks and the NCCL/Gloo
# baselines on a GPU machine, then print one table. Run from anywhere:
#   bash DIR/gpu-run.sh [quick|full]      (DIR as made by gpu-build.sh)
# Logs go to $OUT (or DIR/logs). Needs 2 GPUs for the 2-rank rows.
# Knobs (environment): RING_BENCH (test regexp for the in-process and IPC ring
# benches, default both), TCP_CONFIGS (CHANNELSxCHUNK_KIB list), CLI=0 skips
# the gpumesh bench command, BASELINES (names, default all for full, nccl-default
# for quick).
# NVLink multicast stays off (NCCL_NVLS_ENABLE=0) in every run.
set -uo pipefail
src=$(cd "$(dirname "$0")" && pwd)
# binaries travel gzip-compressed; unpack them next to a copy of this folder
dir=$(mktemp -d)
cp "$src"/* "$dir"/
for z in "$dir"/*.gz; do
	[ -e "$z" ] || continue
	gunzip -f "$z" && chmod +x "${z%.gz}"
done
mode=${1:-full}
logs=${OUT:-$dir/logs}
mkdir -p "$logs"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
table=$logs/table.txt
: >"$table"
row() { printf '%-58s %s\n' "$1" "$2" | tee -a "$table"; }

nvidia-smi -L | tee "$logs/gpus.txt"
nvidia-smi topo -m >>"$logs/gpus.txt" 2>&1 || true
ngpu=$(nvidia-smi -L | wc -l)
date -u +"%Y-%m-%dT%H:%MZ" >>"$logs/gpus.txt"

# 1. correctness: the -tags cuda test binaries
for t in "$dir"/*.test; do
	[ -e "$t" ] || continue
	name=$(basename "$t" .test)
	tl=$(mktemp)
	if timeout 240 "$t" -test.v -test.count=1 >"$tl" 2>&1; then
		row "go test $name (-tags cuda)" "PASS ($(grep -c '^=== RUN' "$tl") runs)"
	else
		row "go test $name (-tags cuda)" "FAIL (see tests.log)"
		grep -E -- '--- FAIL|panic:|Error' "$tl" | head -20
	fi
	{ echo "==== $name"; cat "$tl"; } >>"$logs/tests.log"
	rm -f "$tl"
done

# 2. gpumesh benchmarks
if [ -x "$dir/cudabuf.test" ] && [ "$ngpu" -ge 2 ]; then
	GPUMESH_CUDA_BENCH=1 timeout 200 "$dir/cudabuf.test" -test.run "${RING_BENCH:-LocalRingBandwidth|IPCRingSeparateProcesses}" -test.v >"$logs/bench.log" 2>&1
	GPUMESH_CUDA_BENCH=1 GPUMESH_TCP_CONFIGS="${TCP_CONFIGS:-}" timeout 200 "$dir/cudabuf.test" -test.run 'TCPSeparateProcesses' -test.v >>"$logs/bench.log" 2>&1
	# a second TCP run with other settings (TCP2_ENV: assignments; default:
	# staging waits sleep instead of spinning)
	if [ -n "${TCP2_CONFIGS-4x1024,16x1024}" ]; then
		env GPUMESH_CUDA_BENCH=1 GPUMESH_TCP_DEVICES=cuda GPUMESH_TCP_CONFIGS="${TCP2_CONFIGS-4x1024,16x1024}" ${TCP2_ENV:-GPUMESH_SPIN=0} \
			timeout 150 "$dir/cudabuf.test" -test.run 'TCPSeparateProcesses' -test.v >>"$logs/bench.log" 2>&1
	fi
	grep -E '^(local|ipc|tcp) ' "$logs/bench.log" | grep busbw | while read -r l; do
		row "gpumesh $(echo "$l" | awk '{print $1, $2, $3, $4, $5, $6, $7}' | sed -e 's/time=.*//' -e 's/channels=/ch=/')" "$(echo "$l" | grep -o 'busbw=[0-9.]*GB/s')"
	done
	grep -E '^tcp .*correctness' "$logs/bench.log" | head -1 | sed 's/^/    /' | tee -a "$table"
fi
if [ "${CLI:-1}" = 1 ] && [ -x "$dir/gpumesh" ] && "$dir/gpumesh" bench allreduce --help 2>/dev/null | grep -q -- '--device'; then
	for args in "--procs" "--procs --channels 16" ""; do
		echo "==== gpumesh bench allreduce --device cuda --ranks 2 $args" >>"$logs/bench.log"
		timeout 150 "$dir/gpumesh" bench allreduce --device cuda --ranks 2 --sizes 1MiB,64MiB,256MiB $args >"$logs/cli.txt" 2>&1
		cat "$logs/cli.txt" >>"$logs/bench.log"
		echo "    gpumesh bench allreduce --device cuda --ranks 2 $args" | tee -a "$table"
		grep -E '^ +[0-9]|error|Error' "$logs/cli.txt" | head -12 | sed 's/^/      /' | tee -a "$table"
	done
	rm -f "$logs/cli.txt"
fi

# 3. baselines (PyTorch NCCL and Gloo), same call
py=$dir/torch_allreduce.py
if [ -f "$py" ] && [ "$ngpu" -ge 2 ]; then
	base() { # name env...
		local name=$1; shift
		local bl; bl=$(mktemp)
		env "$@" timeout 180 python3 "$py" $BASE_ARGS >"$bl" 2>&1
		{ echo "==== $name $*"; cat "$bl"; } >>"$logs/baselines.log"
		grep -E 'busbw' "$bl" | while read -r l; do
			row "baseline $name $(echo "$l" | grep -o 'size= *[0-9]*MiB' | tr -d ' ')" "$(echo "$l" | grep -o 'busbw= *[0-9.]*GB/s' | tr -d ' ')"
		done
		rm -f "$bl"
	}
	want=${BASELINES:-}
	if [ -z "$want" ]; then
		if [ "$mode" = full ]; then want="nccl-default nccl-sock-2x8 nccl-sock-4x4 nccl-shm gloo-cuda"; else want="nccl-default"; fi
	fi
	for b in $want; do
		case $b in
		nccl-default) BASE_ARGS="nccl cuda 2 29511 1,16,64,256 10" base nccl-default NCCL_DEBUG=WARN ;;
		nccl-sock-2x8) BASE_ARGS="nccl cuda 2 29512 64,256 10" base nccl-sock-2x8 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo NCCL_SOCKET_NTHREADS=2 NCCL_NSOCKS_PERTHREAD=8 ;;
		nccl-sock-4x4) BASE_ARGS="nccl cuda 2 29513 64,256 10" base nccl-sock-4x4 NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4 ;;
		nccl-shm) BASE_ARGS="nccl cuda 2 29514 64,256 10" base nccl-shm NCCL_P2P_DISABLE=1 ;;
		gloo-cuda) BASE_ARGS="gloo cuda 2 29515 64,256 5" base gloo-cuda GLOO_SOCKET_IFNAME=lo ;;
		esac
	done
fi
echo
echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $ngpu GPU(s), $(date -u +%Y-%m-%dT%H:%MZ)) ===="
cat "$table"
