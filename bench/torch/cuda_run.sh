#!/usr/bin/env bash
# CUDA tensors through the PyTorch backend on a GPU machine: a 1-node
# `gpumesh dev` cluster (so the job's 2 ranks share one agent, and on a
# 1-GPU machine one GPU), then
#  1. python/tests/check_cuda.py as a 2-rank exec job (every collective and
#     dtype on CUDA tensors, DDP against Gloo, hostile registrations);
#  2. bench/torch/cuda_ab.py as a 2-rank exec job: DDP steps/s of the
#     issue's model and all_reduce busbw of CUDA tensors, gpumesh (CUDA IPC)
#     vs staged vs Gloo in the same processes; a summary table at the end.
#
# Usage: bench/torch/cuda_run.sh GPUMESH_BINARY (built with -tags cuda) [OUTDIR [CUDA_AB_ARGS...]]
#        (from the repository root; PY= the Python with PyTorch and CUDA)
set -eu
BIN=$(realpath "$1") OUT=${2:-/tmp/gpumesh-torch-cuda}
shift $(($# >= 2 ? 2 : 1))  # the rest goes to cuda_ab.py
ROOT=$(pwd) PY=${PY:-$(command -v python3)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "gpus", torch.cuda.device_count(), torch.cuda.get_device_name(0))'
"$BIN" dev --nodes 1 --data-dir "$OUT/dev" >"$OUT/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null' EXIT
for _ in $(seq 150); do grep -q "export GPUMESH_ADDR" "$OUT/dev.log" && break; sleep 0.2; done
export GPUMESH_ADDR=$(sed -n 's/.*export GPUMESH_ADDR=//p' "$OUT/dev.log")
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
fail=0
# job SCRIPT RANKS ARGS...: runs SCRIPT as an exec job, prints every rank's
# output; a job that does not complete fails the run. All ranks share one
# GPU (gpus_per_rank: 1, ranks_per_gpu: RANKS): the agent gives each of them
# CUDA_VISIBLE_DEVICES of that GPU (GPU 0 of a 1-GPU machine).
job() {
  local script=$1 ranks=$2; shift 2
  local args="" a id
  for a in "$@"; do args="$args, \"$a\""; done
  id=$(printf 'name: cuda\nranks: %s\ngpus_per_rank: 1\nranks_per_gpu: %s\nrestart: {attempts: 0}\nexec:\n  env: {PYTHONPATH: "%s/python"}\n  command: ["env", "MASTER_PORT=%s", "%s", "%s"%s]\n' \
        "$ranks" "$ranks" "$ROOT" "$(free_port)" "$PY" "$ROOT/$script" "$args" | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$BIN" job status "$id" | sed -n '/^GEN/,/^$/p'  # the GPU of each rank, shared
  for r in $(seq 0 $((ranks - 1))); do
    "$BIN" job logs "$id" --rank "$r" 2>/dev/null  # stdout (stderr: the next line)
    "$BIN" job logs "$id" --rank "$r" --stderr | tail -20
  done
  "$BIN" job status "$id" | grep -q "^Status *complete" || { echo "job $script FAILED"; "$BIN" job status "$id" | head -20; fail=1; }
}
job python/tests/check_cuda.py 2
job bench/torch/cuda_ab.py 2 "$@" >"$OUT/ab.log"; cat "$OUT/ab.log"
"$PY" - "$OUT/ab.log" <<'PYEOF'
import json, sys
rows = [json.loads(l[l.index("{"):]) for l in open(sys.argv[1]) if l.lstrip().startswith("{") or l.startswith("{")]
ddp = {r["backend"]: r for r in rows if r.get("bench") == "ddp_cuda"}
if ddp:
    print("\nDDP, Linear 4096x4096 x6 (~100M float32 params), batch 2, 2 ranks sharing the GPU: steps/s (median step)")
    for b, r in ddp.items():
        print(f"  {b:15s} {r['steps_per_s']:7.2f} steps/s  ({r['step_s'] * 1000:8.1f} ms)")
    if "gloo" in ddp:
        print(f"  gpumesh / Gloo CUDA: {ddp['gpumesh']['steps_per_s'] / ddp['gloo']['steps_per_s']:.2f}x (target >= 4)")
bw = {(r["backend"], r["size_mib"]): r["busbw_gbps"] for r in rows if r.get("bench") == "allreduce_cuda"}
if bw:
    print("\nall_reduce busbw of CUDA tensors, 2 ranks, GB/s")
    print("  size    gpumesh   staged     gloo   gpumesh/gloo")
    for mib in sorted({k[1] for k in bw}):
        g, s, l = bw[("gpumesh", mib)], bw[("gpumesh-staged", mib)], bw[("gloo", mib)]
        print(f"  {mib:4d}MiB {g:8.2f} {s:8.2f} {l:8.2f}   {g / l:6.1f}x")
PYEOF
[ "$fail" = 0 ] && echo "CUDA RUN OK" || { echo "CUDA RUN FAILED"; exit 1; }
