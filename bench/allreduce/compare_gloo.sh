#!/usr/bin/env bash
# Runs `gpumesh bench allreduce --procs` (CPU tensors, one process per rank)
# and the PyTorch Gloo baseline (torch_allreduce.py gloo cpu) in the same
# session on the same machine, then prints one table.
#
# Usage: compare_gloo.sh GPUMESH_BINARY [OUTDIR]
# The Gloo rows come from bench/torch_allreduce.py (the copy beside this
# folder, or $TORCH_ALLREDUCE).
# Environment: CHANNELS (default "4 8 16"), OURS_FLAGS (extra flags for ours,
# e.g. "--read-buffer 0 --write-buffer 0 --worker-gomaxprocs 8").
set -u
BIN=$1 OUT=${2:-/tmp/compare_gloo}
PY=${TORCH_ALLREDUCE:-$(cd "$(dirname "$0")/.." && pwd)/torch_allreduce.py}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
echo "cpus: $(nproc)  $(date -u +%FT%TZ)  $(grep -m1 'model name' /proc/cpuinfo)"
SIZES=64MiB,256MiB
ITERS=10
for n in 2 4; do
  for ch in ${CHANNELS:-4 8 16}; do
    "$BIN" bench allreduce --ranks "$n" --procs --channels "$ch" --sizes "$SIZES" --iters "$ITERS" ${OURS_FLAGS:-} --json >"$OUT/ours_n${n}_c${ch}.json" 2>"$OUT/ours_n${n}_c${ch}.err" || cat "$OUT/ours_n${n}_c${ch}.err"
  done
  timeout 120 python3 "$PY" gloo cpu "$n" $((29500 + n)) 64,256 "$ITERS" >"$OUT/gloo_n${n}.txt" 2>&1 || tail -5 "$OUT/gloo_n${n}.txt"
done
python3 - "$OUT" <<'PYEOF'
import glob, json, os, re, sys
out = sys.argv[1]
gloo = {}
for f in glob.glob(os.path.join(out, "gloo_n*.txt")):
    n = int(re.search(r"gloo_n(\d+)", f).group(1))
    for line in open(f):
        m = re.search(r"size=\s*(\d+)MiB.*busbw=\s*([\d.]+)GB/s", line)
        if m:
            gloo[(n, int(m.group(1)) << 20)] = float(m.group(2))
rows = []
for f in sorted(glob.glob(os.path.join(out, "ours_n*_c*.json"))):
    try:
        r = json.load(open(f))
    except Exception as e:
        print("unreadable", f, e); continue
    for row in r["rows"]:
        g = gloo.get((r["ranks"], row["bytes"]))
        rows.append((r["ranks"], r["channels"], row["bytes"] >> 20, row["busbw_gbps"], row.get("raw_tcp_busbw_gbps", 0), g, row["wrong"]))
print("%5s %8s %8s %12s %12s %12s %9s %7s" % ("ranks", "channels", "size", "ours busbw", "rawTCP", "gloo busbw", "ours/gloo", "#wrong"))
for n, ch, mib, bus, raw, g, wrong in rows:
    ratio = "%.2f" % (bus / g) if g else "-"
    print("%5d %8d %6dMiB %12.2f %12.2f %12s %9s %7d" % (n, ch, mib, bus, raw, "%.2f" % g if g else "-", ratio, wrong))
PYEOF
