#!/usr/bin/env bash
# The GPU pipeline and the lanes' per-operation costs on whatever machine is
# lent (1 GPU is enough): the pipeline CUDA tests, then
# `gpumesh bench pipeline --compute mlp --device cuda` (2 stages, m = 8, 16
# layers split by measured cost) with staged device messages, with
# --sync-messages (the synchronous path) and, when the folder holds a
# gpumesh-base binary (another build, e.g. main's, copied in as
# gpumesh-base or gpumesh-base.gz), with that build, all in the same call;
# then the card's pinned copy rate (one process, then two at once) and
# 2-process all-reduce over the TCP lanes (--no-same-host) at the default
# and a larger --min-channel. Run from anywhere:
#   bash DIR/gpu-pipeline.sh         (DIR as made by gpu-build.sh)
# Knobs (environment): ROUNDS (pipeline rounds, default 2), LAYERS (default
# 16), NOLANES=1 (skip the copy-rate and lanes part), MINCHAN (default
# 512KiB).
set -uo pipefail
. "$(dirname "$0")/gpu-lib.sh" || { echo "$0: needs gpu-lib.sh beside it (gpu-build.sh copies both)" >&2; exit 1; }
gpu_setup 40

if timeout 200 "$dir/pipeline.test" -test.v -test.count=1 -test.run CUDA >"$logs/pipeline-tests.log" 2>&1; then
	row "go test pipeline (-tags cuda) CUDA" "PASS ($(grep -c '^=== RUN' "$logs/pipeline-tests.log") runs)"
else
	row "go test pipeline (-tags cuda) CUDA" "FAIL (see pipeline-tests.log)"
fi

p=(bench pipeline --stages 2 --microbatches 8 --compute mlp --device cuda --bandwidth-mib 0 --layers "${LAYERS:-16}" --balance measured)
pipe() { # LABEL BINARY ARGS...
	local label=$1 bin=$2 one
	shift 2
	one=$(mktemp)
	timeout 120 "$dir/$bin" "${p[@]}" "$@" >"$one" 2>&1
	{ echo "==== $label: $bin ${p[*]} $*"; cat "$one"; } >>"$logs/pipeline.log"
	row "$label" "$(awk '/^samples\/s/ {s=$2} /^bubble \(measured/ {b=$3} /^bubble \(theory/ {t=$NF} /^bubble per stage/ {ps=$4" "$5} END {printf "%s samples/s, bubble %s (theory %s; stages %s)", s, b, t, ps}' "$one")"
	rm -f "$one"
}
for r in $(seq "${ROUNDS:-2}"); do
	[ -x "$dir/gpumesh-base" ] && pipe "pipeline base r$r" gpumesh-base
	pipe "pipeline sync messages r$r" gpumesh --sync-messages
	pipe "pipeline staged r$r" gpumesh
done
"$dir/gpumesh" "${p[@]}" --trace --json >"$logs/pipeline-trace.json" 2>/dev/null

if [ -z "${NOLANES:-}" ]; then
	out=$(mktemp)
	GPUMESH_CUDA_BENCH=1 timeout 100 "$t" -test.run 'TestCopyBandwidth$' -test.v >"$out" 2>&1
	row "pinned copy rate, 1 process" "$(grep -o 'd2h=.*' "$out")"
	GPUMESH_CUDA_BENCH=1 timeout 100 "$t" -test.run 'TestCopyBandwidth$' -test.v >"$out.2" 2>&1 &
	GPUMESH_CUDA_BENCH=1 timeout 100 "$t" -test.run 'TestCopyBandwidth$' -test.v >"$out" 2>&1
	wait
	row "pinned copy rate, 2 processes (each)" "$(grep -ho 'd2h=.*' "$out" "$out.2" | tr '\n' ' ')"
	rm -f "$out" "$out.2"
	for mc in 0 "${MINCHAN:-512KiB}"; do
		timeout 200 "$dir/gpumesh" bench allreduce --device cuda --procs --ranks 2 --no-same-host --sizes 1MiB,4MiB,16MiB,64MiB,256MiB --iters 10 --min-channel "$mc" >"$logs/cli.txt" 2>&1
		cat "$logs/cli.txt" >>"$logs/bench.log"
		awk -v mc="$mc" '$1 ~ /^[0-9]+$/ && NF >= 8 { printf "lanes 2 procs %dMiB min-channel %s|busbw=%sGB/s rawTCP=%s ratio=%s\n", $1 / 1048576, mc, $7, $9, $10 }' "$logs/cli.txt" |
			while IFS='|' read -r label value; do row "$label" "$value"; done
	done
	rm -f "$logs/cli.txt"
fi
summary "pipeline and lanes"
