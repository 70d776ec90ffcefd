#!/usr/bin/env bash
# DDP exposed communication (bench/torch/run.sh, part 1: the issue's model,
# step with N ranks minus step with 1 rank, gpumesh and Gloo in the same
# processes) for two or more versions of the Python client side by side:
# each VARIANT is NAME=PYTHON_DIR (the python/ folder the ranks import; the
# agent binary and the scripts are the same for all) or NAME=BINARY:PYTHON_DIR
# (that variant's own agent binary). NODES agents (default WORLD: one rank
# per agent; NODES=1: every rank on the one agent, as on a GPU machine).
# Every round runs each
# variant once (run.sh with ROUNDS=1 and its own cluster), the order
# flipping every round. The summary gives per variant the median over rounds
# of gpumesh's and Gloo's exposed communication and of their ratio, and
# every round's figures; TIMELINE=1 also runs bench/torch/ddp_timeline.py
# once per variant and round (where the exposed time goes).
#
# Usage: [ROUNDS=3] [WORLD=2] [NODES=$WORLD] [DDP_ARGS="--steps 8"] [OUT=dir] \
#          bench/torch/ddp_ab.sh GPUMESH_BINARY VARIANT...   e.g. new=python old=/tmp/gpumesh-old:python
#        (from the repository root). Needs /usr/bin/python3 (or $PY) with PyTorch.
set -eu
BIN=$(realpath "$1"); shift
[ $# -gt 0 ] || { echo "usage: bench/torch/ddp_ab.sh GPUMESH_BINARY NAME=[BINARY:]PYTHON_DIR..." >&2; exit 2; }
ROOT=$(pwd) PY=${PY:-/usr/bin/python3} OUT=${OUT:-/tmp/gpumesh-ddp-ab}
ROUNDS=${ROUNDS:-3} WORLD=${WORLD:-2} DDP_ARGS=${DDP_ARGS:-} TIMELINE=${TIMELINE:-0}
NODES=${NODES:-$WORLD}
rm -rf "$OUT"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PY
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  commit $(git rev-parse --short HEAD)  $(grep -m1 'model name' /proc/cpuinfo)"

vs=("$@")
for r in $(seq "$ROUNDS"); do
  echo "round $r: load $(cut -d' ' -f1-3 /proc/loadavg)"
  for v in "${vs[@]}"; do
    name=${v%%=*} rest=${v#*=} bin=$BIN
    case $rest in *:*) bin=$(realpath "${rest%%:*}") rest=${rest#*:} ;; esac
    dir=$(realpath "$rest")
    PYDIR=$dir ROUNDS=1 ALLREDUCE=0 TIMELINE=$TIMELINE NODES=$NODES WORLDS="1 $WORLD" DDP_ARGS=$DDP_ARGS \
      bash "$ROOT/bench/torch/run.sh" "$bin" "$OUT/$name-$r" >"$OUT/$name-$r.txt" 2>&1 ||
      echo "$name round $r failed (see $OUT/$name-$r.txt)"
  done
  mapfile -t vs < <(printf '%s\n' "${vs[@]}" | tac)
done
echo "end: load $(cut -d' ' -f1-3 /proc/loadavg)"

"$PY" - "$OUT" "$ROUNDS" "$WORLD" "$@" <<'PYEOF'
import json, os, statistics, sys
out, rounds, world = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
names = [v.split("=")[0] for v in sys.argv[4:]]
med = statistics.median
def step(d, w, b):
    for l in open(os.path.join(d, f"ddp_{w}.json")):
        r = json.loads(l)
        if r["backend"] == b:
            return r["step_s"]
print(f"\nDDP exposed communication, seconds: median over rounds (every round); recipe: {world} ranks minus 1 rank;")
print(f"in-process: {world}-rank step minus the same processes' no_sync step")
f = lambda xs: f"{med(xs):.3f} ({' '.join(f'{x:.3f}' for x in xs)})"
for n in names:
    g, l, q, gi, li, qi = [], [], [], [], [], []
    for r in range(1, rounds + 1):
        d = os.path.join(out, f"{n}-{r}")
        try:
            eg = step(d, world, "gpumesh") - step(d, 1, "gpumesh")
            el = step(d, world, "gloo") - step(d, 1, "gloo")
            ig = step(d, world, "gpumesh") - step(d, world, "none")
            il = step(d, world, "gloo") - step(d, world, "none")
        except (OSError, TypeError):
            print(f"  {n} round {r}: no result (see {d}.txt)")
            continue
        g.append(eg), l.append(el), q.append(eg / el)
        gi.append(ig), li.append(il), qi.append(ig / il)
    if g:
        print(f"  {n:8s} recipe     gpumesh {f(g)}  gloo {f(l)}  gpumesh/gloo {f(q)}")
        print(f"  {n:8s} in-process gpumesh {f(gi)}  gloo {f(li)}  gpumesh/gloo {f(qi)}")
    for r in range(1, rounds + 1):
        p = os.path.join(out, f"{n}-{r}", "timeline.json")
        if os.path.exists(p):
            for line in open(p):
                if "ddp_timeline_summary" in line:
                    t = json.loads(line)
                    print(f"  {n:8s} round {r} timeline: exposed after the computation {t['exposed_after_compute_ms']:.1f} ms "
                          f"(steps {t['rounds_ms']}), queued ahead of the last bucket {t['queued_ahead_ms'] or 0:.1f}, "
                          f"after its answer {t['after_last_answer_ms'] or 0:.1f}")
PYEOF
