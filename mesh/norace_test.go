//go:build !race

package mesh_test

// massJoinSize is the mass-join test's mesh size (32 under -race).
const massJoinSize = 100
