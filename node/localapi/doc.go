// Package localapi is the agent's local data-plane API: rank processes of
// exec jobs on this node (the gpumesh PyTorch backend, python/gpumesh) hand
// their tensors to the agent, which runs the collectives on the node's data
// plane, so the daemons move the tensors.
//
// A process connects to a SOCK_SEQPACKET Unix socket under the agent's data
// dir (mode 0666: tasks run as their own user) and says hello with its job, generation, global rank and
// the per-task secret it found in its environment; the Authorizer (the
// node) checks the secret and that the rank runs here in the current
// generation, and returns the data-plane addresses of the job's ranks. The
// connection then owns a communicator of the node's transport for (job,
// generation, process group, group rank). Ranks on one node meet in the same
// agent: when every rank of a group is on this node, an all-reduce of host
// memory reads and writes every rank's mapped memory in place, each rank's
// worker reducing its block of all of them (collective's same-process path);
// their other collectives hand chunks over in memory, by reference; only
// ranks on other nodes are reached over the data plane's lanes.
//
// Tensor memory is shared, not serialised: the client creates a memfd,
// seals it against shrinking, and passes the descriptor with SCM_RIGHTS
// (REGISTER). Holding the descriptor proves the client owns the memory, and
// the seal means the agent's mapping cannot fault later. Operations name
// elements of registered regions; the agent runs them in place in the
// mapping (the Python client moves reused tensors' storage into such
// regions, so DDP's buckets are reduced where they are). The wire format
// is written out in proto.go.
//
// CUDA tensors travel by CUDA IPC handle (REGISTER_CUDA, proto_cuda.go and
// cuda.go): a binary built with the cuda tag opens a rank's allocation once
// (cuIpcOpenMemHandle, size checked with the driver), wraps the elements an
// operation names as device buffers of package cudabuf and runs the
// collective on them, after waiting for the rank's IPC event; ranks of one
// agent then exchange chunks by reference (a peer copy or reduce kernel).
// Without the tag the agent answers StatusUnsupported and the client stages
// its CUDA tensors through host memory.
//
// Operations are asynchronous: each is answered by one DONE when it ends.
// A group's operations run in the order the client issued them, as NCCL's
// do within a communicator (order.go): a collective starts when every
// operation issued before it has finished, a send or receive when the
// collectives issued before it have; consecutive sends and receives (no
// collective between them) run at once, in order per peer and direction,
// so a rank's send to one peer and receive from another do not wait for
// each other. Every rank must issue the group's collectives, and its
// sends and receives relative to them, in the same order. All-to-all, gather and scatter
// are collectives whose request carries a table of blocks, one per peer
// (OP_TABLE): the communicator moves every pair's block over that pair's
// link, all at once (collective.AllToAll), so a rank's sends and receives
// of one exchange never wait for each other. A failure of the data plane
// (dead peer, timeout, mismatch) fails the operation with a message and
// leaves the group unusable, as NCCL does; the client raises it. A client
// that closes its connection without saying BYE first (its process died),
// or with operations in flight, aborts the group, so its peers fail at once
// instead of waiting for the collective timeout; and a group that fails
// while its connection is open, even idle, is reported to the client unasked
// (FAILED), so its next operation raises at once.
// A client that sends garbage, a wrong secret or memory it cannot prove it
// owns gets an error; nothing it sends can crash or wedge the agent (the
// decoder is fuzzed). A client that stops reading its answers blocks an
// answer for at most the collective timeout.
//
// A connection's requests are read and its answers written with raw
// recvmsg and write on the non-blocking socket (sockIO), one of each per
// operation: the net package's entersyscall would wake the Go runtime's
// sleeping sysmon thread on each of them, a futex wake per request and
// answer on an agent that idles between operations.
// BenchmarkClientAllReduce times the agent's side of a client all_reduce.
//
// A region is unmapped only when nothing can touch it any more. Operations
// hold references on the regions they name; the reference of an operation
// is dropped when it has returned and every frame it sent was released
// (collective.FrameHold), not when it returns: chunks between ranks of this
// agent are handed over by reference, so when an operation fails (its
// client died, a peer failed, a timeout) another rank's goroutine may still
// have its frame queued or be copying out of its memory, and unmapping then
// would fault and kill the agent. The last release unmaps on whichever
// goroutine makes it (the peer's, after its copy; or its endpoint's close,
// which hands queued frames back unread), never in the read loop, and never
// waits. A dead client's memory therefore stays mapped until its peers took
// or dropped its frames: at most until their own operations fail or their
// connections end. CUDA IPC mappings follow the same rule: a peer's copy or
// reduce kernel that reads a rank's device memory is enqueued before the
// peer releases the frame, and registered as a reader of that buffer, so
// closing the mapping (after the last release) first frees the buffers,
// whose Sync waits for those readers, and only then closes the IPC handle.
//
// A rank's checkpoint module opens a second kind of connection on the same
// socket (CKPT_HELLO, authorized the same way; ckpt_proto.go): it asks for a
// file to write its part of a checkpoint into, has the agent store it,
// commits the manifest, and is handed the part to load as a descriptor of
// a checked local file (the agent's prefetched copy) that it maps. The
// storage work is the Checkpointer's (the node's, over package checkpoint).
//
// Server.Snapshot gives per-rank operation counts, bytes and latency for
// metrics and job status; Server.Live counts connections, goroutines and
// mappings for leak checks.
//
// The local API runs on Linux only (shm_linux.go, sock_linux.go); elsewhere
// the package builds, so that the gpumesh CLI does, and Listen returns
// ErrUnsupportedOS.
package localapi
