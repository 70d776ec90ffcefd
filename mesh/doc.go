// Package mesh is gossip membership for gpumesh, built on hashicorp/memberlist.
//
// Every agent gossips a small metadata record about itself (Meta: ID, name,
// gossip/RPC/Raft/HTTP/serve addresses, GPUs, instance type, zone, region,
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
// memberlist forwards each piece of news ("node J is alive") to only
// RetransmitMult × ceil(log10(N+1)) random peers and then drops it. When
// many nodes join at once the member lists those peers are drawn from are
// still partial, so some (observer, joiner) pairs never hear of each other;
// only the periodic full-state push-pull repairs that, and its 30 s base
// interval is doubled above 32 nodes. DefaultLANConfig therefore adds
// state exchanges where gossip is known to miss, and probes faster:
//
//   - Post-join sync (JoinSyncRounds 4, JoinSyncDelay 250 ms): after its
//     join a node makes 4 extra push-pulls by 0.25, 0.75, 1.75 and 3.75 s
//     (each wait drawn from [½, 1] of its length, so that a mass join does
//     not reach the seeds in one instant; a failed one is made at once
//     with a random member instead),
//     alternately with a peer that answered its join (a seed has heard from
//     every node that joined through it) and with a random live member.
//     Push-pull is two-way, so each also repairs the partner. The same
//     round runs again whenever the node's incarnation grows while it has
//     peers (it refuted a suspicion or a false death, or updated its
//     metadata), since a refutation spreads like a join and can miss nodes
//     the same way. Cost: 4 state exchanges per join (about 200 B per
//     member each way), not per interval.
//   - Sync after a failure (FailureSyncDelay 1 s): a node that declares a
//     peer dead makes one push-pull with a random live member (deaths
//     within the delay share one). An observer whose suspicion timer fired
//     before a refutation reached it would otherwise keep a live peer dead
//     until the next periodic push-pull: the peer ignores the older death
//     message and nobody re-sends the refutation.
//   - Several seeds: Join contacts up to JoinMaxPeers (5) of the given or
//     discovered addresses in parallel, so one dead seed neither fails nor
//     delays a join.
//   - Faster gossip (GossipInterval 100 ms, GossipNodes 4; memberlist 200
//     ms and 3): news drains faster during join bursts. A round with no
//     news sends nothing, and the number of copies of each piece of news
//     (RetransmitMult 4) is memberlist's, so the bytes per event are
//     unchanged; only the peak rate rises (4 × 1400 B per 100 ms per node).
//     Faster still starves the probes of a loaded host during join bursts
//     and turns slow nodes into false deaths.
//   - Faster failure detection (ProbeInterval 200 ms, ProbeTimeout 100 ms,
//     SuspicionMult 3, SuspicionMaxTimeoutMult 4; memberlist 1 s, 500 ms,
//     4, 6): see "Failure detection" below. Each node probes one peer per
//     interval whatever N is (5 small UDP exchanges per second). The
//     timeouts are far above in-VPC and cross-AZ round trips (under 2 ms);
//     what they must absorb is a stalled host. For hosts that stall for
//     hundreds of milliseconds raise ProbeInterval and ProbeTimeout
//     together (detection time scales with them).
//   - Periodic push-pull every 15 s (memberlist: 30 s), still stretched
//     above 32 nodes as memberlist does.
//   - DeadNodeReclaimTime 30 s: a node whose name was declared dead may
//     come back from another address (a restarted agent with a new IP or
//     port) after 30 s; before that, and for a live name, the conflict is
//     logged as an error naming the fix (unique --name). A node that
//     restarts on the same address refutes its death at once.
//   - GossipToTheDeadTime 15 s (30 s): dead nodes leave memberlist's probe
//     lists sooner; Members keeps reporting them for TombstoneTimeout
//     (24 h).
//
// bench/mesh measures convergence and failure detection for any preset,
// on an idle host or one whose cores spinning processes compete for (-load
// N); bench/results/mesh.md has the figures behind these choices.
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
//     ProbeInterval, walking a shuffled list, so the crashed node is probed
//     about once per ProbeInterval mesh-wide, at a random phase. It is
//     missed with probability about 1/e per interval, so this phase has a
//     tail of several intervals.
//  2. The probe fails. The prober waits ProbeTimeout for the direct ack,
//     then asks IndirectChecks peers to ping the node and tries a TCP ping;
//     the probe fails at its deadline, ProbeInterval × (1 + the prober's
//     health score) after it was sent. The prober then gossips "suspect".
//  3. Suspicion. Each member that hears "suspect" starts a timer of
//     SuspicionTimeouts(N).max, shortened towards .min (exactly min once
//     SuspicionConfirmations(N) other members, here 1, have also failed to
//     probe the node). A crashed node is probed again within a few
//     intervals, so the first timer fires at min = SuspicionMult ×
//     log10(N) × ProbeInterval. A suspected node that is alive refutes as
//     soon as it hears the suspicion, which cancels every timer.
//  4. Dissemination. The first member whose timer fires gossips "dead";
//     the others' timers fire at about the same time, and gossip reaches
//     the last member a few GossipIntervals later.
//
// So detection ≈ (1 to 5) × ProbeInterval + SuspicionMult × log10(N) ×
// ProbeInterval + a few GossipIntervals.
//
// On a starved host a probe fails if the prober, the target or the indirect
// pingers cannot run for a whole ProbeInterval. Then the target is only
// suspected and refutes when it runs again; Lifeguard's self-awareness (a
// prober whose probes fail without the indirect pingers' nacks judges
// itself slow) stretches that prober's interval and deadline up to
// AwarenessMaxMultiplier (8) × ProbeInterval, so a starved node stops
// accusing others; a suspicion nobody confirms lasts
// SuspicionMaxTimeoutMult × min before anyone declares the node dead; and a
// false death that does happen is refuted by the node and repaired
// everywhere by the sync after a failure.
//
// # Large meshes
//
// Config.ForSize(n) adapts a preset to a mesh of about n nodes (a pure
// function; 64 nodes or fewer are unchanged): more indirect probes before
// a suspicion, two independent confirmations for the shortest suspicion
// above 256 nodes, and fewer seeds contacted per join; the post-join
// syncs stay (a mass join of 1,000 nodes converges through them, not
// through gossip). Lifeguard's
// awareness stays on (AwarenessMaxMultiplier > 1): a node whose own
// probes go unanswered, or whose indirect probes bring no nacks, stretches
// its probe interval before it accuses others. memberlist suspects a
// peer only after the direct probe, IndirectChecks indirect probes from
// other members and the TCP fallback all failed; it declares it dead
// only when the suspicion timeout (log-scaled with n, shortened by other
// members' independent confirmations) passes without a refutation.
//
// Config.ExpectedSize (the agent's --expect-nodes) applies ForSize when
// the Mesh starts. memberlist reads its settings without locks and has no
// way to change them while it runs, so the indirect checks and the
// suspicion multiplier stay those of the expected size until the agent
// restarts; memberlist itself scales the suspicion timeout, retransmits
// and push-pull period with the live member count. The Mesh's own join
// settings (JoinMaxPeers) follow ForSize of the live member count at
// each join, so they adapt as the mesh grows.
//
// The presets turn memberlist's compression off (Config.NoCompression):
// it LZW-compresses every packet, probes and acks included, and in the
// in-memory simulation at 50 nodes it cost about 3× the gossip CPU per
// node for half the bytes (bench/results/fleet.md); a node whose cores are
// saturated needs the CPU more than a LAN needs the bytes.
//
// MemNetwork is an in-memory network for Config.Transport: one process
// can run a thousand real memberlist instances with per-link delay and
// loss, partitions, and byte counts (bench/mesh -transport mem). Every
// wait in it is a channel, a select or a timer, so it also runs inside a
// testing/synctest bubble, where a simulated node's processing takes no
// virtual time (bench/mesh's TestVirtualMesh).
//
// # Metadata encoding
//
// Meta.Encode writes a compact, versioned binary record (format in its doc
// comment) that must fit memberlist's 512-byte node-metadata limit;
// identical GPUs next to each other are stored once with a count, so an
// 8-GPU p5.48xlarge record is 135 bytes. Oversized or invalid records are
// refused with ErrMetaTooLarge or ErrInvalidMeta, and UpdateMeta leaves
// the old record in place. DecodeMeta is strict (unknown version, flags,
// enums, truncation, malformed trailing extensions are errors) and never
// panics; it is fuzzed by FuzzDecodeMeta. Fields added later (the serve
// address first) travel as keyed extensions after the original fields: a
// record without any is what earlier builds wrote and read, and a decoder
// skips the extension keys it does not know. A peer whose record cannot be decoded (for
// example a newer format version during an upgrade) is still listed, with
// Member.MetaErr set.
package mesh
