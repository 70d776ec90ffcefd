#!/usr/bin/env bash
# all_to_all_single through the gpumesh backend (zero copy, staged) and
# Gloo, side by side in the same processes (bench/torch/alltoall_ab.py), as
# an exec job of RANKS ranks (default 2) on a `gpumesh dev` cluster of NODES
# agents (default 2: one rank per agent, their blocks over the lanes between
# the agents; NODES=1: every rank on one agent). ARGS go to alltoall_ab.py.
#
# Usage: [NODES=n RANKS=n ARGS="--sizes-mib 1,16" COMMIT=id] bench/torch/alltoall_run.sh GPUMESH_BINARY
#        (from the repository root). Needs /usr/bin/python3 (or $PY) with PyTorch.
set -eu
BIN=$(realpath "$1") ROOT=$(pwd) PY=${PY:-/usr/bin/python3} OUT=$(mktemp -d)
NODES=${NODES:-2} RANKS=${RANKS:-2} ARGS=${ARGS:-}
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  commit ${COMMIT:-$(git rev-parse --short HEAD)}  nodes $NODES  ranks $RANKS"
"$BIN" dev --nodes "$NODES" --data-dir "$OUT/dev" >"$OUT/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null; rm -rf "$OUT"' EXIT
for _ in $(seq 150); do grep -q "export GPUMESH_ADDR" "$OUT/dev.log" && break; sleep 0.2; done
export GPUMESH_ADDR=$(sed -n 's/.*export GPUMESH_ADDR=//p' "$OUT/dev.log")
port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
args=""
for a in $ARGS; do args="$args, \"$a\""; done
id=$(printf 'name: alltoall-ab\nranks: %s\nplacement: spread\nrestart: {attempts: 1}\nexec:\n  env: {PYTHONPATH: "%s/python:%s/bench/torch", MASTER_PORT: "%s"}\n  command: ["%s", "%s"%s]\n' \
      "$RANKS" "$ROOT" "$ROOT" "$port" "$PY" "$ROOT/bench/torch/alltoall_ab.py" "$args" \
      | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
"$BIN" job logs "$id" --rank 0
"$BIN" job status "$id" | grep -q "^Status *complete" || { "$BIN" job logs "$id" --rank 0 --stderr | tail -20; exit 1; }
