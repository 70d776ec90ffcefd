#!/usr/bin/env bash
# Per-operation cost of the PyTorch backend's client path: dist.all_reduce
# through the gpumesh backend (bench/torch/oplat.py: total, and where the
# time goes in the rank) next to Gloo in the same processes, and the
# built-in allreduce job's per-op time with the same ranks (same agents,
# default channels) as the baseline, on a `gpumesh dev` cluster of NODES
# agents (default 2) with RANKS ranks (default 2) spread over them: NODES=2
# puts one rank on each agent, NODES=1 every rank on the one agent (a GPU
# machine's layout).
#
# Variants (before/after) run side by side: each VARIANT is
# NAME=BINARY:PYTHON_DIR (the gpumesh binary and the python/ folder of the
# package it is paired with); every round runs each variant once (a fresh
# cluster each time, the order flipping every round), so that a shared
# machine's changing load falls on all alike. The summary gives per variant
# and size the median over rounds and every round, with the load average.
#
# Usage: [ROUNDS=n] [NODES=2] [RANKS=2] [SIZES_KIB=4,16384,65536] [ITERS=30] [OUT=dir] \
#          bench/torch/oplat.sh VARIANT...    e.g. new=bin/gpumesh:python
#        (from the repository root). Needs /usr/bin/python3 (or $PY) with PyTorch.
set -eu
ROOT=$(pwd) PY=${PY:-/usr/bin/python3} OUT=${OUT:-/tmp/gpumesh-oplat}
ROUNDS=${ROUNDS:-3} SIZES_KIB=${SIZES_KIB:-4,16384,65536} ITERS=${ITERS:-30}
NODES=${NODES:-2} RANKS=${RANKS:-2}
[ $# -gt 0 ] || { echo "usage: bench/torch/oplat.sh NAME=BINARY:PYTHON_DIR..." >&2; exit 2; }
rm -rf "$OUT"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RANKS
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD)  $(grep -m1 'model name' /proc/cpuinfo)"

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
sizes_yaml=${SIZES_KIB//,/KiB, }KiB

# variant NAME BIN PYDIR ROUND: one cluster, the client job, then the built-in job.
variant() {
  local name=$1 bin=$2 pydir=$3 r=$4 dev id more
  more=()
  [ "$RANKS" -gt "$(nproc)" ] && more=(--max-ranks-per-node "$RANKS")
  "$bin" dev --nodes "$NODES" "${more[@]}" --data-dir "$OUT/dev-$name-$r" >"$OUT/dev-$name-$r.log" 2>&1 &
  dev=$!
  for _ in $(seq 100); do grep -q "export GPUMESH_ADDR" "$OUT/dev-$name-$r.log" && break; sleep 0.2; done
  GPUMESH_ADDR=$(sed -n "s/.*export GPUMESH_ADDR=//p" "$OUT/dev-$name-$r.log")
  export GPUMESH_ADDR
  [ -n "$GPUMESH_ADDR" ] || { echo "$name: the dev cluster did not start (see $OUT/dev-$name-$r.log)" >&2; kill "$dev"; exit 1; }
  id=$(printf 'name: oplat\nranks: %s\nplacement: spread\nrestart: {attempts: 0}\nexec:\n  env: {PYTHONPATH: "%s"}\n  command: ["env", "MASTER_PORT=%s", "AGENT_PID=%s", "%s", "%s/bench/torch/oplat.py", "--sizes-kib", "%s", "--iters", "%s"]\n' \
        "$RANKS" "$pydir" "$(free_port)" "$dev" "$PY" "$ROOT" "$SIZES_KIB" "$ITERS" | "$bin" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$bin" job logs "$id" --rank 0 | grep -o '{.*}' | sed "s/}\$/, \"round\": $r, \"variant\": \"$name\"}/" >>"$OUT/oplat.json"
  printf 'name: ar\ntype: allreduce\nranks: %s\nplacement: spread\nallreduce: {sizes: [%s], dtype: float32, iters: %s, device: cpu}\n' "$RANKS" "$sizes_yaml" "$ITERS" |
    "$bin" job run - --wait --json | "$PY" -c '
import json, sys
name, r = sys.argv[1], int(sys.argv[2])
doc = json.load(sys.stdin)
for al in doc.get("allocations", []):
    if al.get("rank") == 0 and al.get("result"):
        for row in al["result"]["results"]:
            print(json.dumps({"backend": "builtin", "variant": name, "round": r, "size_kib": row["bytes"] >> 10, "total_us": row["time_us"]}))
' "$name" "$r" >>"$OUT/oplat.json"
  kill "$dev"; wait "$dev" 2>/dev/null || true
  rm -rf "$OUT/dev-$name-$r"
}

vs=("$@")
for r in $(seq "$ROUNDS"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
  for v in "${vs[@]}"; do
    name=${v%%=*} rest=${v#*=}
    variant "$name" "$(realpath "${rest%%:*}")" "$(realpath "${rest#*:}")" "$r"
  done
  mapfile -t vs < <(printf '%s\n' "${vs[@]}" | tac)
done
echo "end: load $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$OUT" "$@" <<'PYEOF'
import json, os, statistics, sys
out, variants = sys.argv[1], [v.split("=")[0] for v in sys.argv[2:]]
med = statistics.median
rows = [json.loads(l) for l in open(os.path.join(out, "oplat.json")) if l.strip()]
by = {}
for r in sorted(rows, key=lambda r: r["round"]):
    by.setdefault((r["variant"], r["backend"], r["size_kib"]), []).append(r)
def f(xs):
    return f"{med(xs):8.0f}  ({' '.join(f'{x:.0f}' for x in xs)})" if xs else "       -"
print(f"\nper-op time, {os.environ.get('RANKS', '2')} ranks, microseconds: median over rounds (each round's median of the iterations)")
print("issue: call to packet sent; answer: sent to answer read; finish: answer read to return;")
print("b2b: wall per op back to back; cpu: the rank's CPU per op (all threads); vcsw/ivcsw: its context switches per op;")
print("agent_cpu: the agents' process's CPU per op (back to back)")
for kib in sorted({k[2] for k in by}):
    print(f"\n{kib} KiB")
    for v in variants:
        b = [r["total_us"] for r in by.get((v, "builtin", kib), [])]
        g = by.get((v, "gpumesh", kib), [])
        print(f"  {v:8s} built-in job      {f(b)}")
        for k in ("total", "issue", "answer", "finish", "b2b", "cpu", "agent_cpu"):
            print(f"  {v:8s} gpumesh {k:9s} {f([r[k + '_us'] for r in g if k + '_us' in r])}")
        for k in ("vcsw", "ivcsw"):
            xs = [r[k] for r in g]
            if xs:
                print(f"  {v:8s} gpumesh {k:9s} {med(xs):8.1f}  ({' '.join(f'{x:.1f}' for x in xs)})")
        gl = [r["total_us"] for r in by.get((v, "gloo", kib), [])]
        print(f"  {v:8s} gloo              {f(gl)}")
        if b and g:
            q = [x / r["total_us"] for r, x in zip(g, b)]
            print(f"  {v:8s} built-in/gpumesh  {med(q):8.2f}  ({' '.join(f'{x:.2f}' for x in q)})")
PYEOF
