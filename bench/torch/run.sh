#!/usr/bin/env bash
# The PyTorch backend's benchmarks, side by side in one run on one machine:
#  1. exposed communication of a DDP step (Linear 4096x4096 x6, batch 2, one
#     thread per rank): step time with 2 ranks minus step time with 1 rank,
#     for Gloo (torchrun --standalone) and gpumesh (an exec job on a 2-agent
#     `gpumesh dev` cluster, one rank per agent);
#  2. dist.all_reduce busbw through the gpumesh backend (zero copy, and with
#     GPUMESH_ZERO_COPY=0: staged through segments) against the built-in
#     allreduce job on the same cluster (same ranks, default channels) and
#     Gloo.
# Every measurement runs ROUNDS times (default 3), interleaved (one of each
# per round), so that a shared machine's changing load falls on all of
# them; the summary gives the median over rounds and each round's figure.
#
# Usage: [ROUNDS=n] bench/torch/run.sh GPUMESH_BINARY [OUTDIR]     (from the repository root)
# Needs /usr/bin/python3 with PyTorch and /usr/bin/torchrun.
set -eu
BIN=$(realpath "$1") OUT=${2:-/tmp/gpumesh-torch-bench}
ROOT=$(pwd) PY=/usr/bin/python3
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD)  $(grep -m1 'model name' /proc/cpuinfo)"
TR="/usr/bin/torchrun --standalone --redirects 1 --tee 1"

"$BIN" dev --nodes 2 --data-dir "$OUT/dev" >"$OUT/dev.log" 2>&1 &
DEV=$!
trap 'kill $DEV 2>/dev/null; wait $DEV 2>/dev/null' EXIT
for _ in $(seq 100); do grep -q "export GPUMESH_ADDR" "$OUT/dev.log" && break; sleep 0.2; done
export GPUMESH_ADDR=$(sed -n 's/.*export GPUMESH_ADDR=//p' "$OUT/dev.log")

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# job SCRIPT RANKS [ENV=V...] -- ARGS...: runs SCRIPT as a gpumesh exec job,
# prints rank 0's stdout.
job() {
  local script=$1 ranks=$2; shift 2
  local envs="" args="" a
  while [ $# -gt 0 ] && [ "$1" != -- ]; do envs="$envs, \"$1\""; shift; done
  [ $# -gt 0 ] && shift
  for a in "$@"; do args="$args, \"$a\""; done
  local id
  # MASTER_PORT: a free port of our own (the scheduler's pick may be held by
  # another torch process on a shared machine).
  id=$(printf 'name: bench\nranks: %s\nplacement: spread\nrestart: {attempts: 0}\nexec:\n  env: {PYTHONPATH: "%s/python"}\n  command: ["env", "MASTER_PORT=%s"%s, "%s", "%s"%s]\n' \
        "$ranks" "$ROOT" "$(free_port)" "$envs" "$PY" "$ROOT/$script" "$args" | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$BIN" job logs "$id" --rank 0
}

ROUNDS=${ROUNDS:-3}
for r in $(seq "$ROUNDS"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
  for w in 1 2; do
    $TR --nproc_per_node $w bench/torch/ddp_step.py --backend gloo 2>/dev/null | grep -o '{.*}' >>"$OUT/ddp_gloo_$w.json"
    job bench/torch/ddp_step.py $w -- --backend gpumesh | grep -o '{.*}' >>"$OUT/ddp_gpumesh_$w.json"
  done
  job bench/torch/allreduce_bw.py 2 -- --backend gpumesh | grep -o '{.*}' >>"$OUT/ar_gpumesh.json"
  job bench/torch/allreduce_bw.py 2 GPUMESH_ZERO_COPY=0 -- --backend gpumesh | grep -o '{.*}' >>"$OUT/ar_staged.json"
  printf 'name: ar\ntype: allreduce\nranks: 2\nplacement: spread\nallreduce: {sizes: [16MiB, 64MiB, 256MiB], dtype: float32, iters: 10, device: cpu}\n' |
    "$BIN" job run - --wait --json >>"$OUT/ar_builtin.json"
  $TR --nproc_per_node 2 bench/torch/allreduce_bw.py --backend gloo 2>/dev/null | grep -o '{.*}' >>"$OUT/ar_gloo.json"
done
echo "end: load $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$OUT" <<'PYEOF'
import json, os, re, statistics, sys
out = sys.argv[1]
def lines(name):
    return [json.loads(l) for l in open(os.path.join(out, name)) if l.strip()]
def fmt(xs):
    return f"{statistics.median(xs):7.3f} ({' '.join(f'{x:.3f}' for x in xs)})"
print("\nDDP step (Linear 4096x4096 x6, batch 2, 1 thread per rank), median seconds over rounds (each round's)")
exp = {}
for b in ("gloo", "gpumesh"):
    s1 = [r["step_s"] for r in lines(f"ddp_{b}_1.json")]
    s2 = [r["step_s"] for r in lines(f"ddp_{b}_2.json")]
    e = [y - x for x, y in zip(s1, s2)]
    exp[b] = e
    print(f"{b:8s} 1 rank {fmt(s1)}  2 ranks {fmt(s2)}  exposed {fmt(e)}")
ratios = [g / l for g, l in zip(exp["gpumesh"], exp["gloo"])]
print(f"gpumesh exposes {statistics.median(exp['gpumesh']) / statistics.median(exp['gloo']):.2f} of Gloo's communication "
      f"(medians; per round {' '.join(f'{x:.2f}' for x in ratios)}; target <= 0.67)")
print("\nall_reduce busbw, 2 ranks, GB/s, median over rounds")
def by_size(name):
    d = {}
    for r in lines(name):
        d.setdefault(r["size_mib"], []).append(r["busbw_gbps"])
    return d
ours, staged, gloo = by_size("ar_gpumesh.json"), by_size("ar_staged.json"), by_size("ar_gloo.json")
builtin = {}
txt = open(os.path.join(out, "ar_builtin.json")).read()
for m in re.finditer(r'"size":\s*"(\d+)MiB".*?"busbw_gbps":\s*"([\d.]+)"', txt, re.S):
    builtin.setdefault(int(m.group(1)), []).append(float(m.group(2)))
med = statistics.median
print("size     zero-copy  staged  builtin job  ratio (zero-copy/builtin, per round)      gloo")
for mib in sorted(ours):
    b = builtin.get(mib, [float("nan")])
    per = " ".join(f"{o / x:.2f}" for o, x in zip(ours[mib], b))
    print(f"{mib:4d}MiB  {med(ours[mib]):9.2f}  {med(staged.get(mib, [float('nan')])):6.2f}  {med(b):11.2f}  "
          f"{med(ours[mib]) / med(b):5.2f} ({per})  {med(gloo.get(mib, [float('nan')])):5.2f}")
PYEOF
