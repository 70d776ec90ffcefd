// Package collective moves tensors between the ranks of a job: communicators
// keyed by (job, generation), ring and latency-optimal all-reduce,
// reduce-scatter, all-gather, broadcast, send/receive, barrier, and
// all-to-all, gather and scatter (every pair's block over the pair's own
// link, all pairs at once: alltoall.go), over
// NetTransport (links set up over gRPC streams, bytes on plain TCP lanes) or
// an in-process transport for ranks of one process and for tests.
//
// # Using it (node daemon)
//
// One Service per process receives the data plane of every communicator of
// that process; it is registered on the node's gRPC server (the RPC port)
// next to the protobuf control service. The server must be built with
// ServerOptions (flow-control windows, buffer sizes, message size):
//
//	gcfg := collective.DefaultNetConfig()
//	svc, _ := collective.NewService(gcfg)
//	gs := grpc.NewServer(append(collective.ServerOptions(gcfg), otherOpts...)...)
//	svc.Register(gs)                          // shares gs with gpumesh.v1.Control
//	tr := collective.NewNetTransport(svc)     // one per process
//
// For each rank of a job placed on the node (several per node: one per GPU):
//
//	cfg := collective.DefaultConfig()
//	cfg.Timeout = collectiveTimeout           // --collective-timeout, default 30s
//	comm, err := collective.New(tr, collective.Group{
//		Job: jobID, Generation: gen, Rank: rank,
//		Addrs: rankAddrs,                     // "host:rpcport" of the node of each rank
//	}, cfg)
//	defer comm.Close()
//	rep, err := collective.RunAllReduceJob(ctx, comm, spec, logger) // built-in job
//
// The port is shared with the data plane's TCP lanes by wrapping the
// listener: gs.Serve(svc.Listener(lis)). With NetConfig.DataPlane "tcp"
// (the default) each data link's gRPC stream is only its control path: the
// receiver answers it with a one-time token, the sender opens a plain TCP
// connection to the same port presenting it (inside TLS when
// LaneServerTLS/LaneClientTLS are set, as a node with TLS does), and the
// frames (same 83-byte header) travel there, written with one writev from
// the caller's buffer and read straight into the destination (StreamReceiver)
// or through cache-sized pieces that are reduced as they arrive (host
// buffers), or into the buffer's staging memory (RecvStager: device
// buffers' pinned slots). This avoids gRPC-Go's 16 KiB HTTP/2 framing and
// its copies. Lanes between Services of one host (several agents on one
// machine) ride a Unix stream socket instead of loopback TCP, at about half
// the CPU per byte (NetConfig.UnixLanes, lane_unix.go). DataPlane "grpc",
// or a receiver whose port is not wrapped,
// keeps frames on the streams (streamcodec.go). See lane.go for the lane
// protocol and service.go for the Link service; a stream that ends with an
// error carries its class in its status (netstatus.go).
//
// A stream's metadata names its job, generation, sending and receiving rank
// and channel, so one server serves any number of communicators; streams
// for a generation older than the newest one the node has opened for that
// job are refused (ErrStaleGeneration on the sender). Listen starts a
// standalone server (benchmarks, tests).
//
// # Semantics
//
// Every rank calls the collectives in the same order, one at a time (Send
// and Recv may overlap each other, not a collective). Every frame carries
// the operation's header (group, generation, sequence number, operation,
// dtype, count, op, root, layout); a receiver that sees a different header
// fails with a *MismatchError ("collective: rank 1 called AllReduce(float32,
// count=1000) but rank 0 called AllReduce(float32, count=999)"). Any failure
// aborts the communicator and is sent to every peer, which fail with a
// *RemoteError of the same class (errors.Is(err, ErrMismatch) holds on every
// rank). A dead peer fails the survivors at once when its TCP connections
// break, and within Config.Timeout (no progress) when it only goes silent.
// Cancelling an operation's context aborts the communicator (the peers
// cannot know how far it got). After a failure, build a new communicator
// (next generation).
//
// Algorithms: buffers of at most Config.SmallBytes use recursive doubling
// (log2 n rounds, whole buffer per message); larger ones the ring
// (reduce-scatter then all-gather; every rank sends 2(n-1)/n of the buffer),
// split into Config.Channels parallel rings, each on its own connection
// (TCP lane, or HTTP/2 connection), pipelined in chunks of
// Config.ChunkBytes; an operation too small to give every channel
// MinChannelBytes per block uses fewer channels. A channel moves its chunks in wavefront order (chunk k
// of step s at k+s), so a reduced chunk goes on to the next rank while it
// is still in the CPU cache rather than after the rest of its step. The step
// schedules
// (RingAllReduceStep, ChunkPlan, RecursiveDoubling) are pure functions. The
// reduction order of every element is fixed by (n, config), so float results
// are bit-identical on every rank and across runs.
//
// # Buffers and devices (CUDA backend)
//
// The algorithms only call the chunk operations of the Buffer interface
// (ReadChunk/ReleaseChunk to send, WriteChunk/ReduceChunk for received
// Segments, DivChunk for OpAvg, Sync). HostBuffer implements it over Go
// memory with zero-copy sends. A device implementation (in its own package)
// may run WriteChunk/ReduceChunk asynchronously on per-channel streams as long
// as operations on overlapping ranges keep their order and Sync waits for
// all; ReadChunk stages into pinned memory and ReleaseChunk (handed the
// bytes that read returned, since one range may be read for several peers at
// once) recycles it, so D2H, network, H2D and the reduce kernel overlap
// across chunks and channels.
// Optional interfaces: BufferCopier (device-to-device copies), Allocator
// (scratch buffers), PeerReducer (ranks of one process: the LocalTransport
// hands the receiver the sender's Buffer and offset, so two GPUs of one
// process exchange by peer copy instead of TCP), RefSender (such a buffer's
// chunks to a rank of this process travel as a PeerRef only, without
// ReadChunk: endpoints say which peers are in memory through RefEndpoint;
// a receiver that cannot reach the sender's memory reads the chunk from the
// sender's buffer itself), ChunkPrefetcher (the pipeline starts the read of a
// chunk it will forward over the network as soon as the receive it depends on
// is applied). So a ring whose ranks span processes moves its hops inside a
// process device to device and the others over TCP. SameHostReducer: where
// every rank is a separate process of one host, AllReduce agrees once per
// buffer, over the transport, to run the buffer's own same-host ring (CUDA
// IPC; samehost.go), and falls back to the network together when any rank
// cannot (Config.NoSameHost turns it off; LastAllReduceAlgorithm says which
// path ran; ForgetBuffer releases a buffer's ring). Where every rank is in
// this process (the ranks of one agent) and the buffers are HostBuffers,
// AllReduce skips the ring: each rank reduces its block of every rank's
// buffer in place, on several goroutines (sameprocess.go; NoSameProcess
// turns it off). The device registers
// itself with RegisterDevice so the allreduce job and `gpumesh bench
// allreduce --device cuda` can allocate its buffers.
//
// # Transports
//
// Transport/Endpoint is the seam between algorithms and wires: NetTransport
// (nodes), LocalTransport (ranks of one process; also the test double, with
// SetFault to drop or delay frames and Kill to kill a rank). Within
// NetTransport, ranks whose Addrs entry equals this rank's (the same node
// process) skip TCP: frames are handed over in memory by reference, with the
// sender's Buffer in InFrame.Peer for PeerReducer (set
// NetConfig.NoLocalShortcut to force TCP). NewLocalGroup
// and NewLoopbackGroup build whole groups for tests and benchmarks.
//
// A frame references its sender's memory until its SendDone, and an
// operation that fails returns without waiting for that: a rank of this
// process may still have the frame queued or be copying out of it. Go
// memory stays valid; a caller that unmaps a buffer's memory when its
// operation returns (the node's local API) runs the operation with
// WithFrameHold and unmaps once every frame it sent was released
// (FrameHold).
package collective
