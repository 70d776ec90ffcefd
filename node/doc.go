// Package node is the gpumesh daemon. It wires membership (mesh), consensus
// (Raft state and the leader's scheduler), the data plane (collective) and GPU
// access (cuda) into one Agent, serves the gpumesh.v1.Control gRPC API on the
// RPC port, and runs the allocations placed on this node through its drivers
// (exec, allreduce, pipeline). It does not talk to AWS: the caller hands it
// what deploy learns (zone, instance type, lifecycle as Config fields; spot
// notices and drains through the Agent's methods).
package node
