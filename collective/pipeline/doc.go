// Package pipeline runs pipeline-parallel work: a model split into stages
// on different ranks, micro-batches flowing forward as activations and
// backward as gradients between neighbouring stages.
//
// Three layers, each usable alone:
//
//   - Schedules (pure): StageActions returns one stage's ordered actions
//     (forward, backward, send/receive of activations and gradients per
//     micro-batch) for GPipe, 1F1B or inference; InterleavedStageActions
//     gives interleaved 1F1B (v model chunks per stage, a ring link from
//     the last stage back to the first). Simulate executes all stages'
//     lists with bounded sends and blocking receives; it proves a schedule
//     free of deadlock and measures its bubble.
//   - Runtime: RunStage drives a StageModel through a schedule over two
//     Links (previous and next stage). Sends go through a bounded
//     asynchronous queue (back-pressure beyond StageConfig.InFlight), and a
//     receiver goroutine reads ahead so the next micro-batch is already
//     there when its action starts. Every transfer is tagged (job,
//     generation, step, micro-batch, direction) and checked on receipt.
//     Links: NewMemPipeline (in memory, with fault hooks) and ConnectTCP
//     (loopback or network, handshake checks job, generation and stage).
//   - The built-in job: RunJob trains a multi-layer perceptron split across
//     the stages by sharding.PartitionLayers with SGD (or runs it forward
//     only), with losses and final weights equal to RunReference, the
//     single-process run of the same spec. The layer math goes through the
//     Device interface: CPU, and in the `cuda` build CUDADevice (our own
//     kernels in kernels/mlp.cu, embedded as PTX; no cuBLAS), passed as
//     RunConfig.Device. CUDADevice is an AsyncDevice: a stage's outputs and
//     input gradients leave as staged messages (a device-to-host copy into
//     pinned memory behind an event, waited for by the endpoint's sender
//     goroutine, never by the stage's), the loss gradient is computed on
//     the device, and the stage's busy time is the device's (timing events
//     around each Forward and Backward), so the stage's goroutine enqueues
//     work and waits only for its receives (and, on the last stage, once a
//     step for the loss). Received messages come the other way: the
//     stage's links (TCPLink, CollectiveLink) read them into pinned memory
//     the CUDADevice lends (a free list per size), and the stage's upload
//     from it is queued behind an event without a wait; a buffer goes back
//     with Message.Release and is handed out again only once that upload
//     is done; the first stage's inputs and the last stage's targets are
//     copied into such memory and uploaded the same way.
//     RunConfig.SyncMessages keeps the old synchronous path. Pinned
//     receives are opt-in (RunConfig.PinnedRecv) until they have run on
//     a GPU.
//
// A stage of a pipeline job, as the node runs it:
//
//	links, err := pipeline.ConnectTCP(ctx, pipeline.TCPConfig{
//		JobID: id, Generation: gen, Stage: rank, Stages: world, Addrs: stageAddrs})
//	rep, err := pipeline.RunJob(ctx, pipeline.RunConfig{
//		JobID: id, Generation: gen, Stage: rank, Stages: world, Links: links, Logger: log}, spec)
//	// rep is JSON-serialisable; the last stage's carries the losses.
package pipeline
