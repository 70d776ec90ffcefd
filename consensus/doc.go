// Package consensus holds the replicated cluster state (nodes, jobs and
// allocations) in a Raft group built on hashicorp/raft and raft-wal, decides
// when and with whom to bootstrap, reconciles the voter set, and runs the
// leader's scheduler, which calls package sharding to place work.
package consensus
