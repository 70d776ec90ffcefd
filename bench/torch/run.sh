#!/usr/bin/env bash
# The PyTorch backend's benchmarks, side by side in one run on one machine:
#  1. exposed communication of a DDP step (Linear 4096x4096 x6, batch 2, one
#     thread per rank): step time with 2 ranks minus step time with 1 rank,
#     for gpumesh and Gloo. bench/torch/ddp_ab.py runs both in the same
#     processes (an exec job on a `gpumesh dev` cluster; Gloo as a second
#     process group), alternating steps, with a third entry that runs the
#     same model under DDP's no_sync() (no communication): step minus that
#     step is the exposed communication measured in the same processes
#     under the same load;
#  2. dist.all_reduce busbw through the gpumesh backend (zero copy; staged
#     with GPUMESH_ZERO_COPY=0; zero copy with a reader thread handing the
#     answers over, GPUMESH_CALLER_READS=0) and Gloo, alternating in the same
#     processes (bench/torch/allreduce_ab.py, with the CPU time per operation
#     of the ranks and of the agents' process), then the built-in allreduce
#     job on the same cluster (same ranks, default channels).
# Every measurement runs ROUNDS times (default 3); the summary gives the
# median over rounds and each round's figure, with the load average.
#
# Layout: NODES agents (default 2), ranks spread over them. NODES=2 with 2
# ranks puts one rank on each agent (their hop: lanes between the agents);
# NODES=1 puts every rank on the one agent, as on a GPU machine, whose ranks
# share the node's agent (their hop: in the agent's memory; the summary
# checks that no lane was opened). DDP runs at each world size of WORLDS
# (default "1 2"; 1 must be among them for the recipe; WORLDS="" skips DDP); DDP_ARGS are passed
# to ddp_ab.py (e.g. "--steps 20"); AR_RANKS ranks (default 2) run part 2,
# AR_BACKENDS picks its paths (default all: gpumesh,gpumesh-staged,
# gpumesh-thread,gloo), AR_SIZES_MIB its sizes (default 16,64,256) and
# AR_ITERS its iterations (default 10); ALLREDUCE=0 skips it. TIMELINE=1
# adds bench/torch/ddp_timeline.py at the largest world size each round
# (where gpumesh's exposed time goes); PYDIR is the python/ folder of the
# package the ranks import (default this checkout's: give another to
# compare two versions of the client with the same scripts).
#
# Usage: [ROUNDS=n] [NODES=n WORLDS="1 2 4"] bench/torch/run.sh GPUMESH_BINARY [OUTDIR]
#        (from the repository root). Needs /usr/bin/python3 (or $PY) with PyTorch.
set -eu
BIN=$(realpath "$1") OUT=${2:-/tmp/gpumesh-torch-bench}
ROOT=$(pwd) PY=${PY:-/usr/bin/python3}
PYDIR=$(realpath "${PYDIR:-$ROOT/python}")
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD)  $(grep -m1 'model name' /proc/cpuinfo)"

NODES=${NODES:-2} WORLDS=${WORLDS-"1 2"} DDP_ARGS=${DDP_ARGS:-} ALLREDUCE=${ALLREDUCE:-1}
AR_RANKS=${AR_RANKS:-2} AR_BACKENDS=${AR_BACKENDS:-gpumesh,gpumesh-staged,gpumesh-thread,gloo}
AR_SIZES_MIB=${AR_SIZES_MIB:-16,64,256} AR_ITERS=${AR_ITERS:-10}
echo "layout: $NODES agent(s), DDP world sizes $WORLDS, all_reduce with $AR_RANKS ranks"
# An agent runs as many ranks as the machine has cores unless told more
# (the flag is passed only then, so that older binaries still run).
most=$(printf '%s\n' $WORLDS "$AR_RANKS" | sort -n | tail -1)
more=()
[ "$most" -gt "$(nproc)" ] && more=(--max-ranks-per-node "$most")
"$BIN" dev --nodes "$NODES" "${more[@]}" --data-dir "$OUT/dev" >"$OUT/dev.log" 2>&1 &
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
  # AGENT_PID: the agents' process (`gpumesh dev` runs them all), whose CPU
  # time allreduce_ab.py reads.
  id=$(printf 'name: bench\nranks: %s\nplacement: spread\nrestart: {attempts: 0}\nexec:\n  env: {PYTHONPATH: "%s"}\n  command: ["env", "MASTER_PORT=%s", "AGENT_PID=%s"%s, "%s", "%s"%s]\n' \
        "$ranks" "$PYDIR" "$(free_port)" "$DEV" "$envs" "$PY" "$ROOT/$script" "$args" | "$BIN" job run - --wait --json | sed -n 's/.*"id": *"\([^"]*\)".*/\1/p' | head -1 | cut -d. -f1)
  "$BIN" job logs "$id" --rank 0
}

ROUNDS=${ROUNDS:-3}
for r in $(seq "$ROUNDS"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
  for w in $WORLDS; do
    # shellcheck disable=SC2086
    job bench/torch/ddp_ab.py "$w" -- $DDP_ARGS | grep -o '{.*}' >>"$OUT/ddp_$w.json"
  done
  if [ "${TIMELINE:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    job bench/torch/ddp_timeline.py "$(echo $WORLDS | tr ' ' '\n' | sort -n | tail -1)" -- $DDP_ARGS | grep -o '{.*}' >>"$OUT/timeline.json"
  fi
  [ "$ALLREDUCE" = 0 ] && continue
  job bench/torch/allreduce_ab.py "$AR_RANKS" -- --sizes-mib "$AR_SIZES_MIB" --iters "$AR_ITERS" --backends "$AR_BACKENDS" | grep -o '{.*}' >>"$OUT/ar.json"
  printf 'name: ar\ntype: allreduce\nranks: %s\nplacement: spread\nallreduce: {sizes: [%s], dtype: float32, iters: %s, device: cpu}\n' \
    "$AR_RANKS" "$(echo "$AR_SIZES_MIB" | sed 's/,/MiB, /g')MiB" "$AR_ITERS" |
    "$BIN" job run - --wait --json >>"$OUT/ar_builtin.json"
done
echo "end: load $(cut -d' ' -f1-3 /proc/loadavg)"
# Lanes the agents accepted (their /metrics): 0 means every hop between the
# ranks stayed in an agent's memory.
lanes=0
for url in $(sed -n 's/.* http \(http[^ ]*\).*/\1/p' "$OUT/dev.log"); do
  l=$("$PY" -c 'import sys, urllib.request
for line in urllib.request.urlopen(sys.argv[1] + "/metrics", timeout=10).read().decode().splitlines():
    if line.startswith("gpumesh_collective_lanes_accepted_total"):
        print(int(float(line.split()[-1])))' "$url" || echo 0)
  lanes=$((lanes + ${l:-0}))
done
echo "data-plane lanes the $NODES agent(s) accepted: $lanes$([ "$lanes" = 0 ] && echo ' (every hop between ranks in an agent'"'"'s memory)')"

"$PY" - "$OUT" <<'PYEOF'
import json, os, statistics, sys
out = sys.argv[1]
med = statistics.median
def lines(name):
    return [json.loads(l) for l in open(os.path.join(out, name)) if l.strip()]
def fmt(xs):
    return f"{med(xs):6.3f} ({' '.join(f'{x:.3f}' for x in xs)})"
print("\nDDP step (Linear 4096x4096 x6, batch 2, 1 thread per rank), seconds: median over rounds (each round's median)")
rows = [r for f in sorted(os.listdir(out)) if f.startswith("ddp_") for r in lines(f)]
step = {}
for r in rows:
    step.setdefault((r["backend"], r["world"]), []).append(r["step_s"])
worlds = sorted({w for _, w in step})
for w in worlds:
    print(f"{w} rank(s): " + "  ".join(f"{b} {fmt(step[(b, w)])}" for b in ("gloo", "gpumesh", "none") if (b, w) in step))
for w in [w for w in worlds if w > 1]:
    if 1 in worlds:
        exp = {b: [y - x for x, y in zip(step[(b, 1)], step[(b, w)])] for b in ("gloo", "gpumesh")}
        ratios = [g / l for g, l in zip(exp["gpumesh"], exp["gloo"])]
        print(f"\n{w} ranks - 1 rank: gloo exposed {fmt(exp['gloo'])}  gpumesh exposed {fmt(exp['gpumesh'])}")
        print(f"gpumesh exposes {med(exp['gpumesh']) / med(exp['gloo']):.2f} of Gloo's communication "
              f"(medians; per round {' '.join(f'{x:.2f}' for x in ratios)})")
    # The same, measured inside the w-rank runs: step minus the step of the
    # same model under no_sync() (no communication), interleaved in the same
    # processes.
    inner = {b: [y - x for x, y in zip(step[("none", w)], step[(b, w)])] for b in ("gloo", "gpumesh")}
    ri = [g / l for g, l in zip(inner["gpumesh"], inner["gloo"])]
    print(f"{w} ranks, step - no_sync step (same processes): gloo {fmt(inner['gloo'])}  gpumesh {fmt(inner['gpumesh'])}")
    print(f"gpumesh exposes {med(inner['gpumesh']) / med(inner['gloo']):.2f} of Gloo's communication by this measure "
          f"(per round {' '.join(f'{x:.2f}' for x in ri)})")
if os.path.exists(os.path.join(out, "timeline.json")):
    print("\nwhere gpumesh's exposed time goes (bench/torch/ddp_timeline.py, ms; one line per round):")
    for r in lines("timeline.json"):
        if r["bench"] == "ddp_timeline_summary":
            print(json.dumps(r))
if not os.path.exists(os.path.join(out, "ar.json")):
    sys.exit(0)
bw, cpu = {}, {}
for r in lines("ar.json"):
    bw.setdefault((r["backend"], r["size_mib"]), []).append(r["busbw_gbps"])
    cpu.setdefault((r["backend"], r["size_mib"]), []).append((r.get("cpu_ranks_us", float("nan")), r.get("cpu_agent_us", float("nan"))))
ranks = lines("ar.json")[0]["ranks"]
# The built-in job's results: rank 0's rows of each run.
txt, pos, dec = open(os.path.join(out, "ar_builtin.json")).read(), 0, json.JSONDecoder()
while pos < len(txt.rstrip()):
    while txt[pos].isspace():
        pos += 1
    doc, pos = dec.raw_decode(txt, pos)
    for al in doc.get("allocations", []):
        if al.get("rank") == 0 and al.get("result"):
            for row in al["result"]["results"]:
                bw.setdefault(("builtin", row["bytes"] >> 20), []).append(row["busbw_gbps"])
nan = [float("nan")]
print(f"\nall_reduce busbw, {ranks} ranks, GB/s: median over rounds (ratio zero-copy/builtin: of medians, and per round)")
print("(reader thread: zero copy with GPUMESH_CALLER_READS=0, a reader thread hands each answer to the caller)")
print("size     zero-copy  staged  reader thread  builtin job  ratio                  gloo")
for mib in sorted({k[1] for k in bw if k[0] != "builtin"}):
    z, st, th, b, g = (bw.get((k, mib), nan) for k in ("gpumesh", "gpumesh-staged", "gpumesh-thread", "builtin", "gloo"))
    per = " ".join(f"{x / y:.2f}" for x, y in zip(z, b))
    print(f"{mib:4d}MiB  {med(z):9.2f}  {med(st):6.2f}  {med(th):13.2f}  {med(b):11.2f}  {med(z) / med(b):5.2f} ({per})  {med(g):5.2f}")
print(f"\nCPU per all_reduce, ms (median over rounds): the {ranks} ranks' processes + the agents' process")
print("size     zero-copy ranks+agent   staged ranks+agent   gloo ranks+agent")
for mib in sorted({k[1] for k in cpu}):
    cols = []
    for k in ("gpumesh", "gpumesh-staged", "gloo"):
        xs = cpu.get((k, mib), [(float("nan"), float("nan"))])
        cols.append(f"{med([x[0] for x in xs]) / 1e3:7.2f} + {med([x[1] for x in xs]) / 1e3:7.2f}")
    print(f"{mib:4d}MiB  {cols[0]:>22}  {cols[1]:>19}  {cols[2]:>17}")
PYEOF
