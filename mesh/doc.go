// Package mesh is gossip membership for gpumesh, built on hashicorp/memberlist.
// Every agent gossips a small metadata record (identity, addresses, GPUs,
// instance type, availability zone, lifecycle, status) and receives join,
// leave and update events for the others.
package mesh
