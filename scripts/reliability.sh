#!/usr/bin/env bash
# The reliability suite, bounded for CI: fuzzers for a short while each, then
# the fault tests with real agent processes (test/reliability, build tag
# `reliability`): crash loop, partitions and packet loss in network
# namespaces, partitions and all-reduce over links delayed 20-50 ms (a
# userspace link emulator on TUN devices), collective faults, hostile
# input, soak.
#
#   ./scripts/reliability.sh                      # bounded (about 3-4 minutes on 2 cores)
#   FULL=1 ./scripts/reliability.sh               # the full run (about 15 minutes): 100 crash
#                                                 # rounds, a 10,000-job soak with --job-gc-age 10s,
#                                                 # the emulated network with and without delay
#   GPUMESH_SOAK_JOBS=10000 RUN=TestSoak ./scripts/reliability.sh   # the full soak alone
#   FUZZTIME=60s ./scripts/reliability.sh         # fuzz longer
#   RUN=TestCrashLoop ./scripts/reliability.sh    # one test (fuzzers skipped)
#
# Knobs (environment; the bounded defaults in brackets): GPUMESH_CRASH_ROUNDS
# [20], GPUMESH_SOAK_JOBS [1000], GPUMESH_SOAK_CHECKPOINT [max(jobs/10, 200)],
# GPUMESH_SOAK_GC_AGE [3s; 10s from 5,000 jobs], GPUMESH_DELAY_CASES
# [delayed; "all" adds the no-delay baseline through the emulator].
#
# The namespace tests need root and iproute2 (plus nftables where the kernel
# lacks tc netem, and /dev/net/tun for the link emulator) and skip with a
# message otherwise. Figures (one JSON line
# per test) go to $GPUMESH_RELIABILITY_OUT (default: a temporary file,
# printed at the end); full agent logs of a failing test go to
# $GPUMESH_RELIABILITY_LOGS (default /tmp/gpumesh-reliability-logs).
set -euo pipefail
cd "$(dirname "$0")/.."
# go-nvml's cgo calls NVML functions that nvml.h marks deprecated: ~150 lines
# of gcc warnings on a cold build. Only CGO_CFLAGS reaches a dependency's C
# compiler (a plain `go run` cannot silence them; see README).
export CGO_CFLAGS="${CGO_CFLAGS:--O2 -g} -Wno-deprecated-declarations"

if [ -n "${FULL:-}" ]; then
	export GPUMESH_CRASH_ROUNDS="${GPUMESH_CRASH_ROUNDS:-100}"
	export GPUMESH_SOAK_JOBS="${GPUMESH_SOAK_JOBS:-10000}"
	export GPUMESH_DELAY_CASES="${GPUMESH_DELAY_CASES:-all}"
fi
export GPUMESH_CRASH_ROUNDS="${GPUMESH_CRASH_ROUNDS:-20}"
export GPUMESH_SOAK_JOBS="${GPUMESH_SOAK_JOBS:-1000}"
export GPUMESH_DELAY_CASES="${GPUMESH_DELAY_CASES:-delayed}"
fuzztime="${FUZZTIME:-10s}"
out="${GPUMESH_RELIABILITY_OUT:-$(mktemp)}"
export GPUMESH_RELIABILITY_OUT="$out"
export GPUMESH_RELIABILITY_LOGS="${GPUMESH_RELIABILITY_LOGS:-${TMPDIR:-/tmp}/gpumesh-reliability-logs}"
: >"$out"
start=$(date +%s)

if [ -z "${RUN:-}" ]; then
	echo "==> fuzzing, $fuzztime each (seed corpora in testdata/fuzz run in the ordinary suite)"
	for f in "FuzzParse ./internal/jobspec/" "FuzzDecodeMeta ./mesh/" "FuzzDecodeFrame ./collective/"; do
		set -- $f
		echo "    $1 ($2)"
		go test -run '^$' -fuzz "^$1\$" -fuzztime "$fuzztime" "$2" | tail -n 3 | sed 's/^/      /'
	done
fi

echo "==> fault tests (crash rounds $GPUMESH_CRASH_ROUNDS, soak jobs $GPUMESH_SOAK_JOBS, emulated-network cases $GPUMESH_DELAY_CASES)"
go vet -tags reliability ./test/reliability/
set +e
go test -tags reliability -race -count=1 -timeout 30m -v -run "${RUN:-.}" ./test/reliability/ 2>&1 |
	grep -E -e '^(=== RUN|--- |PASS|FAIL|ok )|SKIP|\.go:[0-9]+: ' | grep -v -e 'FIGURES'
status=${PIPESTATUS[0]}
set -e

echo "==> figures ($out)"
cat "$out"
echo "==> reliability suite: exit $status in $(( $(date +%s) - start ))s on $(uname -srm), $(nproc) cores"
exit "$status"
