#!/usr/bin/env bash
# The reliability suite, bounded for CI: fuzzers for a short while each, then
# the fault tests with real agent processes (test/reliability, build tag
# `reliability`): crash loop, partitions and packet loss in network
# namespaces, collective faults, hostile input, soak.
#
#   ./scripts/reliability.sh                      # bounded (about 6 minutes on 2 cores)
#   GPUMESH_CRASH_ROUNDS=100 GPUMESH_SOAK_JOBS=10000 ./scripts/reliability.sh   # the full run
#   FUZZTIME=60s ./scripts/reliability.sh         # fuzz longer
#   RUN=TestCrashLoop ./scripts/reliability.sh    # one test (fuzzers skipped)
#
# The namespace tests need root and iproute2 (plus nftables where the kernel
# lacks tc netem) and skip with a message otherwise. Figures (one JSON line
# per test) go to $GPUMESH_RELIABILITY_OUT (default: a temporary file,
# printed at the end); full agent logs of a failing test go to
# $GPUMESH_RELIABILITY_LOGS (default /tmp/gpumesh-reliability-logs).
set -euo pipefail
cd "$(dirname "$0")/.."

export GPUMESH_CRASH_ROUNDS="${GPUMESH_CRASH_ROUNDS:-20}"
export GPUMESH_SOAK_JOBS="${GPUMESH_SOAK_JOBS:-1000}"
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

echo "==> fault tests (crash rounds $GPUMESH_CRASH_ROUNDS, soak jobs $GPUMESH_SOAK_JOBS)"
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
