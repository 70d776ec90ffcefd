// Package controlplane holds benchmarks of the control plane measured with
// real agent processes on loopback: leader failover after SIGKILL, and job
// submissions committed per second through a follower. Run them with
//
//	go test ./bench/controlplane -run '^$' -bench . -benchtime 1x -v
//
// They print a table and report median and maximum as benchmark metrics.
package controlplane
