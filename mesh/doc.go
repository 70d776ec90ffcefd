// Package mesh is gossip membership for gpumesh, built on hashicorp/memberlist.
//
// Every agent gossips a small metadata record about itself (Meta: ID, name,
// gossip/RPC/Raft/HTTP addresses, GPUs, instance type, zone, region,
// lifecycle, status, eligibility, role hint, version) and learns everyone
// else's, with join, leave, failure and update events.
//
// # Use
//
//	cfg := mesh.DefaultLANConfig()
//	cfg.NodeName, cfg.NodeID = "gpu-17", "i-0123456789abcdef0"
//	cfg.BindAddr = "10.0.3.17"
//	cfg.SecretKey, err = mesh.DecodeKey(encryptFlag) // optional
//	cfg.Meta = mesh.Meta{Addrs: mesh.Addresses{RPC: "10.0.3.17:7947"}, ...}
//	cfg.Discoverer = mesh.StaticDiscoverer(joinFlags) // or an EC2 tag discoverer
//	m, err := mesh.New(cfg)
//	defer m.Shutdown()
//	events, cancel := m.Subscribe()
//	...
//	m.UpdateMeta(func(mt *mesh.Meta) { mt.Status = mesh.StatusDraining })
//	m.Leave(5 * time.Second)
//
// Join(ctx, addrs) joins explicitly, retrying with exponential backoff until
// a peer answers; a Config.Discoverer instead starts a loop that
// re-discovers until joined (and again when the node has been alone for
// RejoinAfterAlone). The node's own address is filtered from both.
//
// # Members and states
//
// Members lists alive, suspect, dead and left nodes. memberlist's own
// Members hides the difference (it reports suspect nodes as alive, and the
// State field it hands out is never set); this package reads memberlist's
// internal node table through a layout-checked mirror (mlstate.go, guarded
// by TestMemberlistLayout) to tell suspect from alive and a graceful leave
// from a failure.
//
// # Threading
//
// memberlist calls its delegates while holding its node lock, from its
// packet, stream and timer goroutines. The Mesh's delegate only copies the
// node, updates its member table and appends the event to an unbounded
// per-subscriber queue; it never blocks and never runs user code.
// Each subscriber (Subscribe, Config.OnEvent) is served by its own
// goroutine in event order, so a slow consumer delays only itself. All
// goroutines of a Mesh stop in Shutdown, which is idempotent.
//
// # LAN defaults and why
//
// Measured with bench/mesh (results in bench/results/mesh.md, 2-core
// machine): with memberlist's LAN timings, a 50-node mesh that boots at
// once converged in a median 2.8 s but took 67-80 s in 3 of 20 trials
// (20 nodes: 1.0 s median, 32-34 s in 2 of 20), and a killed node was
// declared dead by everyone after 6.6-11.8 s. With DefaultLANConfig on
// the idle machine (bench/results/meshfd.md), 50 nodes converged in a
// median 0.32 s (max 0.34 s) and a killed node was seen dead by all in a
// median 1.53 s (max 2.32 s), with no live node ever suspected.
// Cause of the outliers: each
// node forwards a piece of news (here "node J is alive") to only
// RetransmitMult × ceil(log10(N+1)) random peers (8 at 50 nodes) and
// then drops it. When many nodes join at once, the member lists the
// targets are drawn from are still partial, so for some (observer,
// joiner) pairs no copy ever arrives; bench/mesh -diag shows them as
// scattered pairs that are still missing 2 s after the start. Nothing
// repairs such a gap but the periodic full-state push-pull, whose 30 s
// base interval memberlist doubles above 32 nodes (60 s, after a random
// first offset): hence the 30-80 s trials. Post-join syncs alone remove
// them (memberlist's timings plus syncs: max 0.7 s in 20 trials); faster
// gossip and probing alone do not (max 44 s).
//
// DefaultLANConfig changes, and their cost at 1000 nodes:
//
//   - Post-join sync (JoinSyncRounds 4, JoinSyncDelay 250 ms): after its
//     join, a node makes 4 extra push-pulls at 0.25, 0.75, 1.75 and
//     3.75 s, alternately with a peer that answered its join (a seed has
//     heard directly from every node that joined through it, so one
//     exchange catches up with the whole burst) and with a random live
//     member (for nodes that joined through other seeds). Push-pull is a
//     two-way exchange, so each one also repairs the partner. This
//     removes the outliers on its own (bench: memberlist's timings plus
//     syncs). Cost: 4 state exchanges per join, not per interval; a state
//     is about 200 B per member (the 135-byte record of an 8-GPU p5 plus
//     memberlist's framing), so at 1000 nodes about 4 × 2 × 200 KB =
//     1.6 MB per joining node, once (computed, not measured). With static
//     seeds, a mass boot doubles the seeds' join load (each node talks to
//     a seed at its join and again at its first sync). The same round
//     of syncs (with random members) runs again whenever the node's
//     incarnation grows while it has peers, that is when it refutes a
//     suspicion or a false death, or updates its metadata: a refutation
//     spreads by gossip like a join and can miss nodes the same way.
//   - Sync after a failure (FailureSyncDelay 1 s): when a node declares a
//     peer dead it makes one push-pull with a random live member (deaths
//     within the delay share one). A node that refuted a suspicion holds
//     a newer incarnation; an observer whose suspicion timer fired before
//     the refutation reached it keeps the peer dead, because the peer
//     ignores the older death message and nobody re-sends the refutation:
//     without this exchange the false death lasts until a periodic
//     push-pull. Cost: one state exchange per node per failure (about
//     400 KB per node at 1000 nodes, estimated).
//   - Several seeds: Join contacts up to JoinMaxPeers (5) of the given or
//     discovered addresses in parallel, so one dead seed neither fails
//     nor delays a join.
//   - Faster gossip (GossipInterval 100 ms, GossipNodes 4, vs 200 ms and
//     3): news drains 2.7 times faster during join bursts. A round sends
//     nothing when there is no news, so an idle mesh pays nothing; the
//     number of copies of each piece of news (RetransmitMult 4, as
//     memberlist) is unchanged, so the total bytes per event are the same
//     as memberlist's (about N × 16 × 200 B = 3.2 MB cluster-wide at 1000
//     nodes); the peak send rate per node is 4 × 1400 B per 100 ms. Still
//     faster gossip (50 ms × 6 peers) was measured and rejected: it cut
//     the last step of failure detection from about 0.2 s to 0.1 s, but
//     it sends the same packets in a third of the time, and with 50
//     nodes in one process on 2 cores shared with 2 spinning processes it
//     turned 0 false suspicions of live nodes into about 47 per trial
//     (and live nodes declared dead in 13 of 20 trials): the join burst
//     starves the probes. See bench/results/meshfd.md.
//   - Faster failure detection (ProbeInterval 200 ms, ProbeTimeout
//     100 ms, SuspicionMult 3, SuspicionMaxTimeoutMult 4, vs 1 s, 500 ms,
//     4, 6): see "Failure detection" below for where the time goes.
//     Every node probes one peer per interval whatever N is: 5 small UDP
//     exchanges per second per node (~1.5 KB/s) at any size. The least
//     suspicion time is 3 × log10(N) × 200 ms: 1.0 s at 50 nodes, 1.8 s
//     at 1000, time in which a slow-but-alive node can refute. 100 ms
//     (the direct-ping wait) and 200 ms (the probe's deadline, indirect
//     and TCP pings included) are far above in-VPC and cross-AZ round
//     trips (under 2 ms); what they must absorb is a stalled host. For
//     hosts that stall for hundreds of milliseconds raise ProbeInterval
//     and ProbeTimeout together (detection time scales with them).
//   - Periodic push-pull every 15 s (memberlist: 30 s), still stretched
//     above 32 nodes (×6 at 1000 nodes, 90 s): at 1000 nodes each node
//     sends and receives about 4 × 200 KB per 90 s, about 9 KB/s.
//   - DeadNodeReclaimTime 30 s: a node whose name was declared dead may
//     come back from another address (a restarted agent with a new IP or
//     port) after 30 s; before that, and for a live name, the conflict is
//     logged as an error naming the fix (unique --name). A node that
//     restarts on the same address refutes its death at once.
//   - GossipToTheDeadTime 15 s (30 s): dead nodes leave memberlist's
//     probe lists sooner; Members keeps reporting them for
//     TombstoneTimeout (24 h).
//
// DefaultLocalConfig is for meshes on loopback in one process (tests,
// `gpumesh dev`): 127.0.0.1, a free port, shorter intervals.
//
// # Failure detection: where the time goes
//
// From a node's crash to the last member listing it dead (N members,
// memberlist's SWIM with the Lifeguard extensions):
//
//  1. Until someone probes it. Each member probes one peer per
//     ProbeInterval, walking a shuffled list, so the crashed node is
//     probed about once per ProbeInterval mesh-wide, at a random phase:
//     on average about one ProbeInterval, rarely several.
//  2. The probe fails. The prober waits ProbeTimeout for the direct ack,
//     then asks IndirectChecks peers to ping the node and tries a TCP
//     ping; the probe fails at its deadline, ProbeInterval × (1 + the
//     prober's health score) after it was sent. The prober then
//     suspects the node and gossips "suspect". Phases 1+2 are what
//     bench/mesh reports as "kill -> first suspicion".
//  3. Suspicion. Each member that hears "suspect" starts a timer of
//     SuspicionTimeouts(N).max, shortened towards .min (exactly min once
//     SuspicionConfirmations(N) other members, here 1, have also failed
//     to probe the node and gossiped their own "suspect"). A crashed
//     node is probed again within a few intervals, so the first member's
//     timer fires at min: 1.0 s at 50 nodes. The suspected node itself,
//     if alive, refutes as soon as it hears the suspicion (a higher
//     incarnation, gossiped like a join), which cancels every timer.
//  4. Dissemination. The first member whose timer fires declares the
//     node dead and gossips "dead"; the others' timers fire at about the
//     same time (they started when "suspect" reached them). With gossip
//     every 100 ms to 4 peers the last member knows about 0.2 s later.
//
// So detection ≈ (1 to 5) × ProbeInterval + SuspicionMult × log10(N) ×
// ProbeInterval + a few GossipIntervals. Measured at 50 nodes in one
// process on an idle 2-core machine (bench/results/meshfd.md): with
// DefaultLANConfig a median of 1.53 s, 1.36-2.32 s over 20 trials
// (phase 1: 0.26-1.08 s, phase 3: 0.10-0.24 s); with the former 300 ms
// probes and 6× suspicion maximum 2.15 s, up to 3.02 s; with
// memberlist's own LAN timings 7-11 s (bench/results/mesh.md). Phase 1
// has a tail of several probe intervals: each interval every member
// probes one random peer, so the dead node is missed with probability
// about 1/e per interval.
//
// Robustness on a starved host. A probe fails if the prober, the target
// or the indirect pingers cannot run for the whole ProbeInterval. Then:
// the target is only suspected (not yet dead) and refutes when it runs
// again; Lifeguard's self-awareness (a prober whose probes fail without
// the indirect pingers' nacks judges itself slow) stretches that
// prober's interval and deadline up to AwarenessMaxMultiplier (8) ×
// ProbeInterval, so a starved node stops accusing others; a suspicion
// that nobody confirms lasts SuspicionMaxTimeoutMult (4) × min, 4 s at
// 50 nodes, before anyone declares the node dead. A false death that
// does happen is refuted by the node and repaired everywhere by the sync
// after a failure (FailureSyncDelay). bench/mesh -load N reproduces a
// machine whose cores N spinning processes compete for, and counts false
// suspicions and deaths of live nodes. Measured with 50 nodes in one
// process on 2 cores: with 2 spinning processes and nothing else
// running, no live node was suspected in 19 trials; with 4, both targets
// (converge < 2 s, detect < 3 s) still held in 24 of 24 trials, but live
// nodes were suspected about 50 times per trial and, in 16 of 24
// trials, declared dead until they refuted. 150 ms probes broke
// convergence there (2.95 s), 300 ms probes broke detection even on the
// idle machine (3.02 s); hence 200 ms.
//
// # Large meshes
//
// Config.ForSize(n) adapts a preset to a mesh of about n nodes (a pure
// function; 64 nodes or fewer are unchanged): more indirect probes before
// a suspicion, two independent confirmations for the shortest suspicion
// above 256 nodes, and fewer full-state exchanges per join. Lifeguard's
// awareness stays on (AwarenessMaxMultiplier > 1): a node whose own
// probes go unanswered, or whose indirect probes bring no nacks, stretches
// its probe interval before it accuses others. memberlist suspects a
// peer only after the direct probe, IndirectChecks indirect probes from
// other members and the TCP fallback all failed; it declares it dead
// only when the suspicion timeout (log-scaled with n, shortened by other
// members' independent confirmations) passes without a refutation.
//
// MemNetwork is an in-memory network for Config.Transport: one process
// can run a thousand real memberlist instances with per-link delay and
// loss, partitions, and byte counts (bench/mesh -transport mem).
//
// # Metadata encoding
//
// Meta.Encode writes a compact, versioned binary record (format in its doc
// comment) that must fit memberlist's 512-byte node-metadata limit;
// identical GPUs next to each other are stored once with a count, so an
// 8-GPU p5.48xlarge record is 135 bytes. Oversized or invalid records are
// refused with ErrMetaTooLarge or ErrInvalidMeta, and UpdateMeta leaves
// the old record in place. DecodeMeta is strict (unknown version, flags,
// enums, truncation, trailing bytes are errors) and never panics; it is
// fuzzed by FuzzDecodeMeta. A peer whose record cannot be decoded (for
// example a newer format version during an upgrade) is still listed, with
// Member.MetaErr set.
package mesh
