#!/usr/bin/env bash
# The PyTorch backend's benchmarks, side by side in one run on one machine:
#  1. exposed communication of a DDP step (Linear 4096x4096 x6, batch 2, one
#     thread per rank): step time with 2 ranks minus step time with 1 rank,
#     for Gloo (torchrun --standalone) and gpumesh (an exec job on a 2-agent
#     `gpumesh dev` cluster, one rank per agent);
#  2. dist.all_reduce busbw through the gpumesh backend against the built-in
#     allreduce job on the same cluster (same ranks, default channels).
#
# Usage: bench/torch/run.sh GPUMESH_BINARY [OUTDIR]     (from the repository root)
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

# job NAME RANKS ARGS...: runs SCRIPT as a gpumesh exec job, prints rank 0's stdout.
job() {
  local script=$1 ranks=$2; shift 2
  local args="" a
  for a in "$@"; do args="$args, \"$a\""; done
  local id
  # MASTER_PORT: a free port of our own (the scheduler's pick may be held by
  # another torch process on a shared machine).
  id=$(printf 'name: bench\nranks: %s\nplacement: spread\nrestart: {attempts: 0}\nexec:\n  env: {PYTHONPATH: "%s/python"}\n  command: ["env", "MASTER_PORT=%s", "%s", "%s"%s]\n' \
        "$ranks" "$ROOT" "$(free_port)" "$PY" "$ROOT/$script" "$args" | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$BIN" job logs "$id" --rank 0
}

for w in 1 2; do
  $TR --nproc_per_node $w bench/torch/ddp_step.py --backend gloo 2>/dev/null | grep -o '{.*}' >"$OUT/ddp_gloo_$w.json"
  job bench/torch/ddp_step.py $w --backend gpumesh | grep -o '{.*}' >"$OUT/ddp_gpumesh_$w.json"
done
job bench/torch/allreduce_bw.py 2 --backend gpumesh | grep -o '{.*}' >"$OUT/ar_gpumesh.json"
printf 'name: ar\ntype: allreduce\nranks: 2\nplacement: spread\nallreduce: {sizes: [16MiB, 64MiB, 256MiB], dtype: float32, iters: 10, device: cpu}\n' |
  "$BIN" job run - --wait --json >"$OUT/ar_builtin.json"
$TR --nproc_per_node 2 bench/torch/allreduce_bw.py --backend gloo 2>/dev/null | grep -o '{.*}' >"$OUT/ar_gloo.json"

"$PY" - "$OUT" <<'PYEOF'
import json, os, re, sys
out = sys.argv[1]
def one(name):
    return json.loads(open(os.path.join(out, name)).read().strip().splitlines()[-1])
print("\nDDP step (Linear 4096x4096 x6, batch 2, 1 thread per rank), median seconds")
print("backend   1 rank   2 ranks  exposed")
exp = {}
for b in ("gloo", "gpumesh"):
    s1, s2 = one(f"ddp_{b}_1.json")["step_s"], one(f"ddp_{b}_2.json")["step_s"]
    exp[b] = s2 - s1
    print(f"{b:8s} {s1:7.3f}  {s2:7.3f}  {s2 - s1:7.3f}")
print(f"gpumesh exposes {exp['gpumesh'] / exp['gloo']:.2f} of Gloo's communication (target <= 0.67)")
print("\nall_reduce busbw, 2 ranks, GB/s")
ours = {r["size_mib"]: r["busbw_gbps"] for r in map(json.loads, open(os.path.join(out, "ar_gpumesh.json")).read().split("\n") if False else [])}
ours = {}
for line in open(os.path.join(out, "ar_gpumesh.json")):
    if line.strip():
        r = json.loads(line); ours[r["size_mib"]] = r["busbw_gbps"]
gloo = {}
for line in open(os.path.join(out, "ar_gloo.json")):
    if line.strip():
        r = json.loads(line); gloo[r["size_mib"]] = r["busbw_gbps"]
builtin = {}
txt = open(os.path.join(out, "ar_builtin.json")).read()
for m in re.finditer(r'"size":\s*"(\d+)MiB".*?"busbw_gbps":\s*"([\d.]+)"', txt, re.S):
    builtin.setdefault(int(m.group(1)), float(m.group(2)))
print("size     torch->gpumesh  builtin job  ratio   gloo")
for mib in sorted(ours):
    b = builtin.get(mib, float("nan"))
    print(f"{mib:4d}MiB  {ours[mib]:13.2f}  {b:11.2f}  {ours[mib] / b:5.2f}  {gloo.get(mib, float('nan')):5.2f}")
PYEOF
