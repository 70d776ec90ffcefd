// Package netemu is a userspace link emulator for the reliability suite:
// it joins network interfaces (TUN devices in Linux network namespaces, or
// in-memory packet pipes in unit tests) through a star of one-way links
// that delay, jitter and drop IP packets, and can cut the star into
// partitions. It stands in for `tc qdisc ... netem` on kernels that lack
// sch_netem.
//
// Each attached port has one IP address; a packet read from a port is
// routed by its destination address to the port that owns it, through the
// link (from, to). A link draws each packet's fate from its own random
// stream (seeded from Config.Seed and the two port names, so a run is
// reproducible up to the order in which packets arrive):
//
//   - lost with probability Loss;
//   - else delivered after a delay drawn uniformly from
//     [Delay-Jitter, Delay+Jitter], but never before the packet ahead of
//     it on the same link (links keep order, as a wire does: TCP sees
//     delay and jitter, not reordering);
//   - dropped if QueueLen packets are already in flight on the link (tail
//     drop) or if the two ports are in different partitions, when the
//     packet is sent or when it is due.
//
// Typical use, with namespaces made by the caller (root needed):
//
//	emu, _ := netemu.New(netemu.Config{Seed: 1, Link: netemu.LinkConfig{Delay: 35 * time.Millisecond, Jitter: 15 * time.Millisecond, QueueLen: 4096}})
//	defer emu.Close()
//	tun, _ := netemu.OpenTUN("/run/netns/a", "tun0") // then: ip -n a addr add 10.99.0.11/24 dev tun0; ip -n a link set tun0 up
//	_ = emu.Attach("a", netip.MustParseAddr("10.99.0.11"), tun)
//	emu.Partition([]string{"a"}, []string{"b", "c"})
//	emu.Heal()
//
// The emulator is for tests: it runs in the test process and forwards
// every packet through Go code (a copy and a channel hop per packet), so
// it suits control traffic and modest data, not bandwidth measurements;
// it routes by IPv4 and IPv6 destination address only.
package netemu
