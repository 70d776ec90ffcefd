// Package cudabuf puts CUDA device memory behind the collective.Buffer
// interface, so the collectives (ring all-reduce and friends) run on GPU
// tensors unchanged, and adds two same-host fast paths that never touch the
// network or the host.
//
// Everything except Available is built only with the "cuda" tag.
//
// # Device buffers for the collectives (any transport)
//
// Backend (Open) owns the CUDA runtime: one retained context per GPU, the
// kernels, a pinned host pool allocated once with a device scratch twin of
// every slot, and peer access between every pair of GPUs that supports it.
// Backend.NewBuffer returns a *Buffer (a collective.Buffer, BufferCopier,
// PeerReducer and Allocator). Per chunk:
//
//	send:    device --(DtoH, read stream)--> pinned slot --> network
//	receive: network --> pinned slot --(HtoD, write stream)--> device scratch
//	         --(reduce kernel, write stream)--> device buffer
//
// (a reduce of a chunk up to DefaultZeroCopyBytes reads the pinned slot
// directly from the kernel instead: WithZeroCopyReduce).
//
// The channels of a collective enqueue their copies and kernels on the
// buffer's two streams concurrently, without holding the buffer's lock,
// which guards only the bookkeeping (prefetched copies, ranges being
// written); a read enqueues no event wait when nothing was written since
// the read stream last waited. With WithIssuingThread each staging step's
// driver calls (a read's wait, copy and record; a received chunk's copy,
// kernel and record) go as one request to one issuing thread per device
// (cuda.Issuer) instead of being made by every channel's goroutine; the
// caller still waits for its copies itself. Every staging step costs driver calls of
// several microseconds (a received chunk about 12 us, a read about 6 us on
// an H200), so the per-chunk cost, not bandwidth, bounds small and middle
// sized operations.
//
// The read stream waits on the write stream with events, so a read sees
// every earlier write; a slot goes back to the pool when the event recorded
// after its last use completes (slots grow on demand, bounded, so reads held
// by the transport cannot starve writes). Nothing on the hot path copies
// synchronously from pageable memory. Upload and Download (setup, tests)
// do, on the legacy default stream, which the buffer's non-blocking streams
// do not wait for: they return only once their copy is complete
// (cuda.Device.CopyHtoD), so work enqueued afterwards sees the bytes.
// Tests check the ordering with every staging step's device work delayed
// (stepDelay, GPUMESH_TEST_DELAY_US=µs for the cuda test binary), as on a
// GPU time-sliced with other processes.
//
// On the TCP lanes the receive has no host copy at all: the collective reads
// a frame's payload from the socket straight into a pinned slot that the
// buffer hands out (collective.RecvStager: BeginRecv, CommitRecv), and the
// send writes the slot the DtoH copy filled. Chunks larger than a pool slot
// get a sized slot (a power of two, kept for reuse, bounded), so no chunk
// size allocates pinned memory per chunk. Stats counts which path every
// chunk took (DirectRecvs, HostCopies, PeerChunks, ...).
//
// Ranks of one process (the collective's LocalTransport, or ranks sharing a
// data-plane address) send chunks by reference (SendByRef): no staging at
// all; the receiver's PeerWrite/PeerReduce is a peer copy or a reduce kernel
// that reads the peer GPU's memory directly, ordered after the sender's
// writes by an event. The read is recorded on the source buffer, whose next
// write to that range (or Sync) waits for it on the device, so the two
// buffers' streams are not chained chunk by chunk. A ring across processes
// thus uses peer moves for its hops inside a process and TCP for the rest.
// For chunks that go over the network, PrefetchChunk starts the device to
// host copy as soon as the chunk's last write is enqueued (dropped if the
// range is written again), and ReadChunk returns it. Buffer.Stats counts
// peer chunks, staged reads and writes and the time spent in them.
// Options: WithPrefetch, WithSpinWait, WithPollWait, WithSharedPoller (how
// host waits wait), WithZeroCopyReduce, WithRangeDeps, WithEagerPeerDeps,
// WithIssuingThread, WithLockedEnqueue (measurement only).
//
// # The "cuda" collective device
//
// Register (or collective.RegisterDevice(NewDevice(cfg))) makes "cuda"
// available to collective.LookupDevice, so the built-in allreduce job with
// device: cuda (or auto) and `gpumesh bench allreduce --device cuda` use
// device memory. Local rank i gets GPU i mod the GPU count. The Backend is
// opened on first use.
//
// # Same-host fast paths
//
// LocalRing: ranks in one process (one or more per GPU). Reduce-scatter hops
// are reduce kernels reading the left neighbour's GPU memory over NVLink;
// all-gather hops are cuMemcpyPeerAsync on the copy engines, on a second
// stream; chunks pipeline and every dependency between ranks is a CUDA event,
// so the host only enqueues and waits once.
//
// IPCRing: ranks in separate processes on one host, one Buffer each. The
// same algorithm, with the left neighbour's memory mapped through CUDA IPC
// and interprocess events; a small shared file per rank (under /dev/shm)
// carries the handles and the progress counters that say when an event has
// been recorded. Every wait is bounded by a timeout.
//
// The Communicator's same-host ring (Buffer implements
// collective.SameHostReducer): when every rank of a group is a process of
// this host, the Communicator agrees over the lanes, once per buffer, to
// all-reduce it without the network. Each rank publishes an IPCRing's shared
// file under a random name and offers its path, a random token (a rank that
// finds another token is on another host or /dev/shm) and its GPU's UUID.
// Ranks on different GPUs run the IPCRing. Ranks that all share one GPU run
// in rank 0's context instead (a ring would switch between the processes'
// time-sliced contexts at every step): rank 0 maps every buffer, waits for
// each rank's "input ready" counter, reduces them into its own buffer,
// copies the result back into each, synchronises and publishes "done".
// Buffer.Free closes the buffer's rings (a neighbour may map its memory);
// Stats.SameHostOps counts the all-reduces that took the path.
// WithoutSameHost and WithSameHostRingOnOneDevice change the choice.
package cudabuf
