// Package cudabuf puts CUDA device memory behind the collective.Buffer
// interface, so the collectives (ring all-reduce and friends) run on GPU
// tensors unchanged.
//
// Data path per chunk (built with the "cuda" tag):
//
//	send:    device --(DtoH, read stream)--> pinned slot --> network
//	receive: network --> pinned slot --(HtoD, write stream)--> device scratch
//	         --(reduce kernel, write stream)--> device buffer
//
// Pinned slots and their device scratch twins come from a pool allocated
// once per Backend. The read stream waits on the write stream with events,
// so a read sees every earlier write; a slot goes back to the pool when the
// event recorded after its last use completes. Nothing on the hot path copies
// synchronously from pageable memory.
//
// Ranks in one process (one Buffer per GPU) skip the host entirely: the
// collective's PeerReducer hook reaches PeerWrite/PeerReduce, which read the
// peer's memory directly over NVLink/PCIe (peer access is enabled between
// every pair that supports it) with cuMemcpyPeerAsync or a reduce kernel.
//
// Without the "cuda" tag the package holds only this documentation and
// Available reports false.
package cudabuf
