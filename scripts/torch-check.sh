#!/usr/bin/env bash
# Runs the PyTorch backend's checks on whatever PyTorch the machine has
# (the GPU machines have 2.x; CI and the dev machine run them through
# `go test ./node -run Torch` with Debian's 1.13): a 2-agent `gpumesh dev`
# cluster, then python/tests/check_collectives.py, check_zerocopy.py and
# check_composed.py as 3-rank and 2-rank exec jobs, check_order.py with 3
# ranks, check_idle_failure.py with 2 ranks, and
# examples/ddp/train.py with CUDA tensors staged through host memory when a
# GPU is present.
#
# Usage: scripts/torch-check.sh GPUMESH_BINARY [PYTHON]     (from the repository root)
set -eu
BIN=$(realpath "$1") PY=${2:-$(command -v python3)} ROOT=$(pwd) OUT=$(mktemp -d)
"$PY" -c 'import torch, sys; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
"$BIN" dev --nodes 2 --data-dir "$OUT/dev" >"$OUT/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 150); do grep -q "export GPUMESH_ADDR" "$OUT/dev.log" && break; sleep 0.2; done
export GPUMESH_ADDR=$(sed -n 's/.*export GPUMESH_ADDR=//p' "$OUT/dev.log")
fail=0
run() { # ranks script args...
  local ranks=$1 script=$2; shift 2
  local args="" a id
  for a in "$@"; do args="$args, \"$a\""; done
  id=$(printf 'name: check\nranks: %s\nrestart: {attempts: 1}\nexec:\n  env: {PYTHONPATH: "%s/python"}\n  command: ["%s", "%s"%s]\n' \
        "$ranks" "$ROOT" "$PY" "$ROOT/$script" "$args" | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$BIN" job status "$id" | sed -n '1,12p'
  for r in $(seq 0 $((ranks - 1))); do
    "$BIN" job logs "$id" --rank "$r" 2>/dev/null | tail -3  # stdout (stderr: the next line)
    "$BIN" job logs "$id" --rank "$r" --stderr | tail -15
  done
  "$BIN" job status "$id" | grep -q "^Status *complete" || fail=1
}
run 3 python/tests/check_collectives.py
run 2 python/tests/check_collectives.py
run 3 python/tests/check_zerocopy.py
run 2 python/tests/check_zerocopy.py
run 3 python/tests/check_composed.py
run 2 python/tests/check_composed.py
run 3 python/tests/check_order.py
run 2 python/tests/check_idle_failure.py
run 2 examples/ddp/train.py --backend gpumesh --steps 20
[ "$fail" = 0 ] && echo "TORCH CHECK OK" || { echo "TORCH CHECK FAILED"; exit 1; }
