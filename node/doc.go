// Package node is the gpumesh daemon. It wires membership (mesh), consensus
// (Raft state and the leader's scheduler), the data plane (collective), GPU
// access (cuda) and cloud integration (deploy) into one Agent, serves the
// gpumesh.v1.Control gRPC API on the RPC port, and runs the allocations placed
// on this node through its drivers (exec, allreduce, pipeline).
package node
