// Package sharding is pure, deterministic planning: placing a job's ranks on
// nodes (gang placement, pack or spread, constraints), chunking tensors for
// rings, and partitioning layers into pipeline stages. It does no I/O and reads
// no clock.
package sharding
