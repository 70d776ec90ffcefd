// Package collective moves tensors between the ranks of a job: communicators
// keyed by (job, generation), ring and latency-optimal all-reduce,
// reduce-scatter, all-gather, broadcast, send/receive and barrier, over a
// gRPC streaming transport with a raw-bytes codec or an in-memory transport
// for tests.
package collective
