// Package reliability is gpumesh's fault suite: real agent processes (the
// built binary) under partitions, crash loops, collective faults, hostile
// input and a soak, each asserting that nothing acknowledged is lost and
// nothing is duplicated.
//
// The tests carry the build tag `reliability`, so the ordinary suite stays
// fast; scripts/reliability.sh runs a bounded version:
//
//	go test -tags reliability -race -count=1 ./test/reliability/
//
// Knobs (environment):
//
//	GPUMESH_CRASH_ROUNDS    crash-loop rounds (default 20; the full run is 100)
//	GPUMESH_SOAK_JOBS       soak jobs (default 1000; the full run is 10000)
//	GPUMESH_SOAK_CHECKPOINT soak jobs per checkpoint (default max(jobs/10, 200))
//	GPUMESH_SOAK_GC_AGE     the soak agents' --job-gc-age (default 3s; 10s from 5000 jobs)
//	GPUMESH_DELAY_CASES     emulated-network cases: delayed, no-delay or all (default)
//	GPUMESH_RELIABILITY_OUT a file that receives one JSON line per measured
//	                        figure (rounds, faults, acknowledged, found, times)
//
// The network tests run each agent in its own Linux network namespace
// (named "gmr-<test pid>-n1" and so on), joined by veth pairs to bridges in
// a hub namespace, with
// private addresses 10.99.0.0/24 that exist only inside those namespaces;
// nothing is routed to or from the host's own network. They need root and
// iproute2 (and nftables for packet loss when tc netem is missing) and skip
// with a message otherwise. A run killed before its cleanups leaves its
// namespaces behind; the next run removes those whose test process is gone
// (and stops what still runs in them), never a live run's.
//
// The delayed-network tests join the namespaces through internal/netemu
// instead of bridges: each namespace has a TUN device whose packets the
// test process forwards with delay, jitter and loss (the kernel here has
// no sch_netem). The emulator closes the TUN files (removing the devices)
// before the namespaces are deleted.
package reliability
