//go:build race

package mesh_test

// massJoinSize is the mass-join test's mesh size: under the race
// detector every node costs about ten times the CPU, and 100 nodes on a
// shared 2-core machine starve each other's probes.
const massJoinSize = 32
