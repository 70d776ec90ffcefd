package collective

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"net"
	"strings"
)

// Same-host lanes: a lane between two Services of one host (several agents
// on one machine, as `gpumesh dev` runs them) travels over a Unix stream
// socket instead of loopback TCP. The bytes are the same (lane.go's
// protocol: magic, token, TLS where configured, frames); only the socket
// family differs. A Unix stream socket moves a byte with the same two
// copies as loopback TCP but without TCP's segmentation, acknowledgements
// and softirq work: a 2-rank all-reduce of 64 MiB costs 0.29 CPU-s per GB
// sent against 0.38-0.44 over loopback TCP on a 2-core VM
// (BenchmarkGRPCAllReduce, unix vs tcp), and on a host whose cores also run
// the training that CPU is what the data plane costs it.
//
//  1. Service.Listener also listens on an abstract Unix socket of a random
//     name ("@gpumesh-lane-" and 32 hex digits; Linux's abstract namespace
//     belongs to the network namespace, like 127.0.0.1, and needs no file to
//     clean up). It accepts lanes only: anything else is closed.
//  2. The receiver's answer to a lane request carries that name in
//     metadata "gpumesh-lane-unix" beside the token.
//  3. A sender whose own address and the receiver's name one host
//     (SameHostAddrs: equal hosts, or both loopback) and whose NetConfig has
//     UnixLanes dials the name first; if that fails before a byte is sent
//     (another network namespace, the socket gone) it dials TCP as before.
//     The token is the same either way and can be used once.

const (
	mdLaneUnix     = "gpumesh-lane-unix"
	unixLanePrefix = "@gpumesh-lane-"
)

// listenUnixLanes opens this Service's same-host lane socket, or returns
// nil (lanes then stay on TCP) when the host has none.
func (s *Service) listenUnixLanes() net.Listener {
	if !abstractUnixNames {
		return nil
	}
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return nil
	}
	name := unixLanePrefix + hex.EncodeToString(b[:])
	ln, err := net.Listen("unix", name)
	if err != nil {
		s.log.Debug("no same-host lane socket; same-host lanes use TCP", "error", err)
		return nil
	}
	s.mu.Lock()
	s.unixName = name
	s.mu.Unlock()
	return ln
}

// unixLaneName is the name offered to senders ("" when there is none).
func (s *Service) unixLaneName() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unixName
}

// UnixLanesAccepted is how many of LanesAccepted came over the same-host
// Unix socket.
func (s *Service) UnixLanesAccepted() uint64 { return s.unixLanesAccepted.Load() }

// acceptUnix serves the same-host lane socket until it is closed.
func (m *muxListener) acceptUnix(ln net.Listener) {
	defer m.wg.Done()
	_ = m.serve(ln, true) // its failure ends only the same-host socket: TCP still serves
}

// unixLaneTarget is the Unix socket name a sender at ownAddr dials for a
// lane to peerAddr, or "" for TCP: offered is the receiver's name from its
// answer, enabled the sender's NetConfig.UnixLanes.
func unixLaneTarget(enabled bool, ownAddr, peerAddr, offered string) string {
	if !enabled || !strings.HasPrefix(offered, unixLanePrefix) || len(offered) != len(unixLanePrefix)+32 {
		return ""
	}
	if !SameHostAddrs([]string{ownAddr, peerAddr}) {
		return ""
	}
	return offered
}

// dialLaneConn connects a lane's socket: the Unix socket unixName when
// given and reachable, else TCP to addr.
func dialLaneConn(ctx context.Context, addr, unixName string) (net.Conn, error) {
	var d net.Dialer
	if unixName != "" {
		if c, err := d.DialContext(ctx, "unix", unixName); err == nil {
			return c, nil
		} else if ctx.Err() != nil {
			return nil, err
		}
	}
	return d.DialContext(ctx, "tcp", addr)
}
