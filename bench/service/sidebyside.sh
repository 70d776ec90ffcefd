#!/usr/bin/env bash
# Side by side, one core each: the replica pinned to core 0, the router to
# core 1, the load generator on the other cores (at least 3 in all). Each
# round loads the replica directly, then through each router, with the same
# load: closed-loop clients (-c) and vegeta at its top rate (-c workers).
#
# Usage: bench/service/sidebyside.sh [-r ROUNDS] [-d SECS] [-c CLIENTS]
#            [-p PROFILE_DIR] [-y SERVER_PY] LABEL=ROUTER_CMD...
#   LABEL=ROUTER_CMD  a router to compare, e.g. fast=./service (behind
#                     net/http's server, as on the agent's HTTP port),
#                     serve="./service -serve" (behind the agent's serve-port
#                     front end, gpumesh agent --serve), general="./service
#                     -general" (a build of bench/service; "router -listen ...
#                     -replica ..." is appended)
#   -y SERVER_PY      also compare with examples/service/server.py as the
#                     replica (GET /x: a short JSON answer), after the Go one
#   -R ROUNDS         rounds with SERVER_PY (default 1)
#   -m MODES          the loads to run, of "closed vegeta" (default both)
#   -p DIR            write a CPU profile of each router under load (SECS-1 s)
# The replica is bench/service's (1 KiB answers), from the first router's
# binary. Prints one line per run, then the ratios to direct.
# Build what it runs first (here; the target machine needs no Go):
#   go build -o OUT/service ./bench/service            # this tree
#   git worktree add /tmp/base main && (cd /tmp/base && go build -o OUT/service-main ./bench/service)
# then e.g. sidebyside.sh -y examples/service/server.py fast=OUT/service
#   "serve=OUT/service -serve" main=OUT/service-main "lean=OUT/service -lean",
#   and for the CPU per request on the same layout: OUT/service cpu -pin
#   -y examples/service/server.py main=OUT/service-main fast=OUT/service
#   "serve=OUT/service -serve" "lean=OUT/service -lean"
set -euo pipefail
rounds=3 pyrounds=1 secs=5 clients=16 prof="" serverpy="" modes="closed vegeta"
while getopts "r:R:d:c:p:y:m:h" opt; do
	case $opt in
	r) rounds=$OPTARG ;;
	R) pyrounds=$OPTARG ;;
	d) secs=$OPTARG ;;
	c) clients=$OPTARG ;;
	p) prof=$OPTARG ;;
	y) serverpy=$OPTARG ;;
	m) modes=$OPTARG ;;
	*) sed -n 2,29p "$0"; exit 2 ;;
	esac
done
shift $((OPTIND - 1))
[ $# -ge 1 ] || { sed -n 2,29p "$0"; exit 2; }
ncpu=$(nproc)
# The load generator runs on every core but 0 and 1 and their hyperthread
# siblings (a sibling busy with the load would slow the replica or the router
# by a varying amount); LOAD_CPUS overrides (a trial on 2 cores).
siblings() { cat "/sys/devices/system/cpu/cpu$1/topology/thread_siblings_list" 2>/dev/null || echo "$1"; }
expand() { tr ',' '\n' | awk -F- '{ for (i = $1; i <= ($2 == "" ? $1 : $2); i++) print i }'; }
taken=$( { siblings 0; siblings 1; } | expand | sort -un | tr '\n' ' ')
free=$(seq 0 $((ncpu - 1)) | grep -vxF -f <(echo "$taken" | tr ' ' '\n' | grep .) | paste -sd, -)
[ -n "$free" ] || free=2-$((ncpu - 1))
loadcpus=${LOAD_CPUS:-$free}
echo "replica core 0, router core 1 (with their siblings: $taken), load on $loadcpus" >&2
[ -n "${LOAD_CPUS:-}" ] || [ "$ncpu" -ge 3 ] || { echo "needs at least 3 cores (has $ncpu)" >&2; exit 1; }
first=${1#*=}
bin=${first%% *}
rport=19001 fport=19002
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
waitport() { for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.05; done; echo "port $1 never opened" >&2; return 1; }

# load URL MODE: one JSON line (MODE closed or vegeta).
load() {
	if [ "$2" = vegeta ]; then
		taskset -c "$loadcpus" $bin load -vegeta -c "$clients" -d "${secs}s" -url "$1"
	else
		taskset -c "$loadcpus" $bin load -c "$clients" -d "${secs}s" -url "$1"
	fi
}
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print('%.0f %.3f %.3f' % (d['req_per_s'], d['p50_ms'], d['p99_ms']))" "$1"; }

# side REPLICA_LABEL PATH: every round, direct then each router.
side() {
	local rl=$1 path=$2
	shift 2
	for r in $(seq "$rounds"); do
		for mode in $modes; do
			out=$(load "http://127.0.0.1:$rport$path" $mode)
			echo "$rl $r $mode direct $(field "$out")"
			for spec in "$@"; do
				label=${spec%%=*} cmd=${spec#*=} extra=""
				[[ $cmd == *" "* ]] && extra=${cmd#* }
				taskset -c 1 ${cmd%% *} router -listen 127.0.0.1:$fport -replica 127.0.0.1:$rport -pprof 127.0.0.1:16060 $extra >/dev/null 2>&1 &
				rp=$!
				pids+=("$rp")
				waitport $fport
				if [ -n "$prof" ] && [ ! -e "$prof/router-$label.prof" ]; then
					mkdir -p "$prof"
					# Inside the measured part of the load (after its 2 s warm-up).
					(sleep 2.3; python3 -c "import urllib.request,sys; open(sys.argv[1],'wb').write(urllib.request.urlopen('http://127.0.0.1:16060/debug/pprof/profile?seconds=%d' % max(1, int(sys.argv[2]) - 1)).read())" "$prof/router-$label.prof" "$secs") &
				fi
				out=$(load "http://127.0.0.1:$fport/svc/bench$path" $mode)
				echo "$rl $r $mode $label $(field "$out")"
				kill "$rp"
				wait "$rp" 2>/dev/null || true
			done
		done
	done
}

{
	taskset -c 0 $bin replica -listen 127.0.0.1:$rport &
	pids+=($!)
	waitport $rport
	side go /x "$@"
	kill "${pids[0]}"
	wait "${pids[0]}" 2>/dev/null || true
	if [ -n "$serverpy" ]; then
		GPUMESH_HOST=127.0.0.1 GPUMESH_PORT_HTTP=$rport SERVE_NO_TORCH=1 taskset -c 0 python3 "$serverpy" &
		pids+=($!)
		waitport $rport
		prof="" rounds=$pyrounds side python /x "$@"
	fi
} | tee /tmp/sidebyside.$$
echo
echo "replica round mode router req/s ratio-to-direct p50-added-ms p99-added-ms"
awk '$4 == "direct" { d[$1" "$2" "$3] = $5; p50[$1" "$2" "$3] = $6; p99[$1" "$2" "$3] = $7; next }
	{ k = $1" "$2" "$3; printf "%s %s %s %s %s %.2f %+.3f %+.3f\n", $1, $2, $3, $4, $5, $5 / d[k], $6 - p50[k], $7 - p99[k] }' /tmp/sidebyside.$$ | tee /tmp/sidebyside.ratios.$$
echo
echo "median ratio to direct over rounds, by replica, mode and router:"
sort -k1,1 -k3,4 -k6,6n /tmp/sidebyside.ratios.$$ | awk '{ k = $1" "$3" "$4; v[k] = v[k] " " $6; n[k]++ }
	END { for (k in v) { split(substr(v[k], 2), a, " "); m = (n[k] % 2) ? a[(n[k] + 1) / 2] : (a[n[k] / 2] + a[n[k] / 2 + 1]) / 2; printf "%s %.2f (rounds:%s)\n", k, m, v[k] } }' | sort
rm -f /tmp/sidebyside.ratios.$$
rm -f /tmp/sidebyside.$$
