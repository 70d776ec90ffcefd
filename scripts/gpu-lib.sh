# shellcheck shell=bash
# What gpu-run.sh, gpu-hop.sh and gpu-tcp.sh share. Each sources this file from
# its own folder (gpu-build.sh copies the four side by side); it is not run on
# its own.
#
# gpu_setup WIDTH: copy this folder to a temporary one and unpack the *.gz
# binaries there, keep NVLink multicast off (NCCL_NVLS_ENABLE=0 and the PyTorch
# and NVSHMEM equivalents), empty the logs ($OUT, or logs in the copy), list the
# GPUs into gpus.txt. Sets dir (the copy), logs, table (table.txt), t (the
# cudabuf test binary), py (the PyTorch all-reduce script), ngpu; WIDTH is the
# width of the first column of the table.
# row LABEL VALUE: one table row, printed and kept.
# cudabuf_tests LABEL [VAR=VALUE...]: the cudabuf GPU tests matching $TESTS
# (default all) into tests.log, then one PASS or FAIL row; fails if they did.
# bench [VAR=VALUE...] COMMAND...: run COMMAND with GPUMESH_CUDA_BENCH=1, its
# output after a header line in bench.log.
# baselines LIMIT NAME...: the PyTorch baselines by name, each under a LIMIT
# seconds timeout, output in baselines.log, a row per size, all run by
# torch_allreduce.py (the project's bench/torch_allreduce.py, copied in by
# gpu-build.sh; nothing without it). Names: nccl-default (NCCL as it comes, 1
# to 256 MiB), nccl-sock-2x8 and nccl-sock-4x4 (NCCL on loopback sockets only, threads x
# sockets per thread), nccl-shm (NCCL without peer-to-peer), gloo-cuda (Gloo,
# CUDA tensors, loopback); other names are skipped.
# summary [EXTRA]: the summary line (GPU, count, time, EXTRA), then the table.

gpu_setup() {
	row_width=$1
	local src z
	src=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
	# binaries travel gzip-compressed; unpack them next to a copy of this folder
	dir=$(mktemp -d)
	cp "$src"/* "$dir"/
	for z in "$dir"/*.gz; do
		[ -e "$z" ] || continue
		gunzip -f "$z" && chmod +x "${z%.gz}"
	done
	t=$dir/cudabuf.test
	py=$dir/torch_allreduce.py
	logs=${OUT:-$dir/logs}
	mkdir -p "$logs"
	# rows are read back from these logs: a reused $OUT must not add old ones
	rm -f "$logs"/tests.log "$logs"/bench.log "$logs"/baselines.log "$logs"/cli.log
	export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
	table=$logs/table.txt
	: >"$table"
	nvidia-smi -L | tee "$logs/gpus.txt"
	nvidia-smi topo -m >>"$logs/gpus.txt" 2>&1 || true
	ngpu=$(nvidia-smi -L | wc -l)
	date -u +"%Y-%m-%dT%H:%MZ" >>"$logs/gpus.txt"
}

row() { printf '%-*s %s\n' "$row_width" "$1" "$2" | tee -a "$table"; }

cudabuf_tests() {
	local label=$1 start; shift
	start=$(date +%s)
	if env "$@" timeout 200 "$t" -test.v -test.count=1 -test.run "${TESTS:-.}" >"$logs/tests.log" 2>&1; then
		row "$label" "PASS ($(grep -c '^=== RUN' "$logs/tests.log") runs, $(($(date +%s) - start)) s)"
	else
		row "$label" "FAIL ($(grep -c -- '--- FAIL' "$logs/tests.log") failed)"
		return 1
	fi
}

bench() {
	echo "==== $*" >>"$logs/bench.log"
	env GPUMESH_CUDA_BENCH=1 "$@" >>"$logs/bench.log" 2>&1
}

# baseline NAME LIMIT ARGS [VAR=VALUE...]: one run of torch_allreduce.py ARGS
baseline() {
	local name=$1 limit=$2 args=$3 bl l; shift 3
	bl=$(mktemp)
	# shellcheck disable=SC2086
	env "$@" timeout "$limit" python3 "$py" $args >"$bl" 2>&1
	{ echo "==== $name $*"; cat "$bl"; } >>"$logs/baselines.log"
	grep busbw "$bl" | while read -r l; do
		row "baseline $name $(echo "$l" | grep -o 'size= *[0-9]*MiB' | tr -d ' ')" "$(echo "$l" | grep -o 'busbw= *[0-9.]*GB/s' | tr -d ' ')"
	done
	rm -f "$bl"
}

baselines() {
	local limit=$1 name
	local sock=(NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo)
	shift
	[ -f "$py" ] || return 0
	for name in "$@"; do
		case $name in
		nccl-default) baseline "$name" "$limit" "nccl cuda 2 29511 1,16,64,256 10" NCCL_DEBUG=WARN ;;
		nccl-sock-2x8) baseline "$name" "$limit" "nccl cuda 2 29512 64,256 10" "${sock[@]}" NCCL_SOCKET_NTHREADS=2 NCCL_NSOCKS_PERTHREAD=8 ;;
		nccl-sock-4x4) baseline "$name" "$limit" "nccl cuda 2 29513 64,256 10" "${sock[@]}" NCCL_SOCKET_NTHREADS=4 NCCL_NSOCKS_PERTHREAD=4 ;;
		nccl-shm) baseline "$name" "$limit" "nccl cuda 2 29514 64,256 10" NCCL_P2P_DISABLE=1 ;;
		gloo-cuda) baseline "$name" "$limit" "gloo cuda 2 29515 64,256 5" GLOO_SOCKET_IFNAME=lo ;;
		esac
	done
}

# shellcheck disable=SC2120 # EXTRA is optional
summary() {
	echo
	echo "==== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $ngpu GPU(s), $(date -u +%Y-%m-%dT%H:%MZ)${1:+, $1}) ===="
	cat "$table"
}
