// Package node is the gpumesh daemon. It wires membership (mesh), consensus
// (Raft state and the leader's scheduler), the data plane (collective) and GPU
// access (cuda) into one Agent, serves the gpumesh.v1.Control gRPC API on the
// RPC port, and runs the allocations placed on this node through its drivers
// (exec, allreduce, pipeline, service). Service replicas get ports
// allocated here and are health-checked here; every agent routes
// /svc/NAME/ on its HTTP port to a healthy replica (service_router.go; plain
// requests over its own pooled HTTP/1.1 connections, service_upstream.go,
// plain answers passed on from the connection's buffer, service_answer.go),
// and with Config.ServeAddr also on a serve port whose lean HTTP/1.1 front
// end hands plain requests to the same router and everything else to
// net/http's server (service_serve.go; its address is in the node's
// record, Node.serve_addr, gossiped like the HTTP address), and
// reports its requests in flight to the leader for services scaled by load
// (service_load.go). It
// does not talk to AWS: the caller hands it
// what deploy learns (zone, instance type, lifecycle as Config fields; spot
// notices and drains through the Agent's methods).
//
// Exec ranks reach their agent's local data-plane API (package localapi, on
// a socket in the data dir; localapi.go wires it) to run PyTorch collectives
// on the node's data plane: the backend "gpumesh" of python/gpumesh.
package node
