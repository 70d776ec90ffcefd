// Package consensus holds the replicated cluster state (nodes, jobs and
// allocations) in a Raft group built on hashicorp/raft with raft-wal as log
// and stable store, decides when and with whom to bootstrap, reconciles the
// voter set with raft-autopilot, and runs the leader's scheduler, which
// calls package sharding to place work.
//
// # Using it
//
//	cfg := consensus.DefaultConfig()
//	cfg.NodeID, cfg.NodeName = id, name
//	cfg.DataDir = dataDir                      // Raft state in DataDir/raft
//	cfg.RaftBindAddr = "10.0.0.5:7948"
//	cfg.Membership = gossipView                // implements Members()
//	cfg.Logger = logger
//	srv, err := consensus.NewServer(cfg)
//	...
//	mesh.OnChange(srv.MembershipChanged)       // nudge on every gossip event
//	id, index, err := srv.RegisterJob(ctx, spec) // leader only; else *NotLeaderError
//	job := srv.State().Job(id)                 // local, possibly stale read
//	srv.Shutdown()
//
// # Roles
//
// Every server-eligible node runs a Server. With BootstrapExpect N, once N
// server-eligible alive members are in the gossip view and the view has been
// stable for BootstrapSettle, each of them computes the same ordered set
// (BootstrapSet: on-demand before spot, then by node ID) and bootstraps Raft
// with it if it is in it. A node that has Raft state, or that sees a member
// gossiping Bootstrapped, never bootstraps: the leader adds it. The leader
// keeps MaxVoters voters (Promoter: healthy, non-draining, on-demand before
// spot, distinct AZs, sticky), Standbys non-voters, and leaves every other
// node out of Raft (a client). Dead voters are removed by autopilot and
// replaced by a standby; a draining voter is demoted once its replacement
// votes; a draining leader transfers leadership.
//
// # State and writes
//
// Every change is one Raft log entry (fsmpb.Command); the FSM applies it
// deterministically (ids and times travel in the command). The log and
// snapshots hold fsmpb's own Node, Job, Allocation and JobSpec, twins of the
// API's with the same field numbers, converted where entries are written
// and read (convert.go); the StateStore and this package's API use the
// API's (controlpb). Writes return
// once the entry is committed and applied on the leader, or when the
// caller's context ends (the entry may then still commit). StateStore objects
// are shared and immutable: never modify them, clone first.
//
// Watchers wait on the StateStore: WaitIndex wakes on every applied
// entry; WaitNode only when one node's view changes (its record, an
// allocation on it, a job with an allocation on it) and WaitServices only
// when a service job or its allocations change, so that a server holding
// a watch stream per node of a large fleet wakes one or a few of them per
// entry, not all.
//
// # Scheduler
//
// The scheduler is a function: Evaluator.Evaluate(job, allocations, now)
// on a ClusterView returns a Decision (a plan to commit, a time to look
// again), with no clock, lock, timer or I/O inside; see Evaluate for the
// job life it implements and Cause for the typed reasons a generation
// ends (only CauseTaskFailed counts against the restart policy). PlanJob, the
// dry run behind job plan, places a spec through the same Evaluator view
// without committing anything. While leading, the server's
// schedLoop owns time and I/O: it wakes on FSM events (job registered,
// allocation ended, node joined, left or drained, a follower caught up)
// and on the earliest wake-up a decision asked for, evaluates the affected
// jobs in batches and commits their plans as one ApplyPlans entry. A
// silent node's ranks are lost only after Config.NodeLossGrace, and
// nothing is placed on a Raft follower that is behind (replTracker).
// The node runtime must report every allocation it stops
// (client_status "stopped"), including ones it never started, because a
// job is placed again only once the ranks of its previous generation have
// stopped; ranks that report nothing within the job's kill_timeout plus
// Config.StopReportGrace are marked lost so a silent node cannot block it.
// A spec without a restart policy gets DefaultRestartAttempts and
// DefaultRestartDelay; a drained, dead or departed node ends a generation
// without counting a restart. A drain and ineligibility stick in the state
// (whatever gossip says later) until SetNodeEligibility(eligible) ends them.
// Each generation's rank 0 gets a MASTER_PORT in MasterPortMin..MasterPortMax
// that no live job uses on the same host (nodes of one machine share them),
// searched from a start derived from the job ID and generation. The node
// checks the port is free before starting rank 0 of an exec job (and any
// service replica, each its own world of one); one held
// by a process outside gpumesh is reported as a start failure
// (StartMasterPortBusy), which ends the generation without a restart
// (CauseMasterPortBusy) and keeps that port out of the job's next pick on
// that host (read from the job's own ended allocations); a second
// one in a row counts as the job's failure. A rank whose agent finds
// another job's newest checkpoint under the job's checkpoint.uri is
// reported as StartCheckpointOtherJob, which fails the job at once (every
// generation would fail the same way) with the agent's message.
// A running service (type service) is
// evaluated per replica instead (evalService): a replica that ends, or
// whose node drains or is lost, is replaced alone, and a drained one is
// stopped once its replacement reports healthy (Allocation.health, the
// Health* values); a health change is an FSM event too. UpdateService (the
// UpdateJob command) gives a running service a new spec and sets its
// spec_generation: replicas of older generations are then replaced the same
// way, one slot at a time (a rolling update with max unavailable 0). A new
// spec that differs only in the replica count (ScaleOnly) is proposed with
// keep_generation: spec_generation stays and no replica is replaced. A
// service scaled by load (service.max_replicas) runs the replica count
// stored in the job's world_size, which the scheduler moves between
// min_replicas and max_replicas from the routers' load (serviceReplicas,
// service_scale.go): reports that ReportLoad keeps in the leader's memory
// (LoadTable), read through the LoadView interface. A new or replacement
// replica avoids the nodes of its siblings when another node can take it
// (sharding.Job.Avoid). A slot whose replicas keep failing backs off
// (service_backoff.go): the wait doubles from restart.delay up to
// restart.max_delay with each failure in a row, derived from the slot's
// allocations (slot_failures, healthy_time) so a new leader keeps it;
// ServiceBackoffs tells the CLI and the metrics the same; from CrashLoopAt
// failures in a row the slot is said to crash-loop. A replica whose node
// found its MASTER_PORT busy is replaced without counting as a failure, on
// another port (busyPorts, as for rank 0 of a job).
//
// # Garbage collection
//
// The leader purges, every Config.JobGCInterval and through the log
// (gc.go), jobs that ended more than Config.JobGCAge ago with all their
// allocations (PurgeJobs), and the ended allocations of live jobs that
// no reader needs any more (PurgeAllocations): a service that crash-loops,
// is updated or moved, or an exec job that restarts, would otherwise add
// allocations for as long as it lives. Of a live job, each rank (a
// service's replica slot) keeps every allocation that has not ended and
// every one of the job's current generation (evalRunning, settle,
// evalPending's wait for the previous generation to stop, MASTER_PORT
// reservations: these read only those); its newest ended allocation and
// the one that ended last (slotHistories: slot_failures, healthy_time and
// the last end, from which the crash-loop back-off and the restart delay
// are derived, so no count resets when older ones go); and its newest
// Config.AllocGCKeep ended ones for people (job status, its checkpoint
// line, metrics), of which those that ended more than JobGCAge ago go
// too. Restart counting lives in the job (restarts), not in its
// allocations. The FSM removes an allocation only when it has ended, was
// told to stop and is of a generation before its job's current one, so
// every replica drops the same ones; the rule is monotonic, so a purge
// decided on a slightly old state is still right when applied.
//
// # Testing
//
// TestCluster, FakeMembership and TestConfig build in-process
// clusters on 127.0.0.1 with short timeouts; tests wait on them with
// internal/poll.
package consensus
