package collective

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"errors"
	"io"
	"math/big"
	"net"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// syncBuffer is a log sink safe for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func lanesOf(s *Server) int {
	s.svc.mu.Lock()
	defer s.svc.mu.Unlock()
	n := 0
	for _, ep := range s.svc.eps {
		ep.qmu.Lock()
		n += len(ep.lanes)
		ep.qmu.Unlock()
	}
	return n
}

// With lanes on, every data link of a 2-rank ring gets a lane at each end
// (2 ranks × 2 channels, counted at the sender and at the receiver); with
// --data-plane grpc none does. Both give the exact result.
func TestLanesCarryTheFrames(t *testing.T) {
	for _, plane := range []string{DataPlaneTCP, DataPlaneGRPC} {
		gcfg := DefaultNetConfig()
		gcfg.DataPlane = plane
		g, err := NewLoopbackGroup("job", 1, 2, testConfig(), gcfg)
		if err != nil {
			t.Fatal(err)
		}
		for _, count := range []int{1000, 300001} {
			allReduceChecked(t, g.Comms, Float32, OpSum, count, plane)
		}
		want := 0
		if plane == DataPlaneTCP {
			want = 2 * 2 // per server: 2 outbound + 2 inbound
		}
		for i, s := range g.Servers {
			if n := lanesOf(s); n != want {
				t.Errorf("%s: server %d has %d lanes, want %d", plane, i, n, want)
			}
		}
		g.Close()
	}
}

// A connection that presents the lane magic with an unknown token is
// refused with a reason and a log line; one that starts like a lane but is
// not one goes to gRPC (which drops it); gRPC keeps working on the port.
func TestLaneRefusesUnknownTokens(t *testing.T) {
	var logs syncBuffer
	gcfg := DefaultNetConfig()
	gcfg.Logger = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	s, err := Listen("127.0.0.1:0", gcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()

	c, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var tok laneToken
	_, _ = rand.Read(tok[:])
	if _, err := c.Write(append([]byte(laneMagic), tok[:]...)); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var st [3]byte
	if _, err := io.ReadFull(c, st[:]); err != nil {
		t.Fatal(err)
	}
	msg := make([]byte, binary.LittleEndian.Uint16(st[1:]))
	if _, err := io.ReadFull(c, msg); err != nil {
		t.Fatal(err)
	}
	if st[0] != laneStatusRefused || !strings.Contains(string(msg), "unknown or already used lane token") {
		t.Fatalf("status %d %q", st[0], msg)
	}
	if _, err := c.Read(st[:1]); err != io.EOF {
		t.Fatalf("refused connection not closed: %v", err)
	}
	poll.Until(t, 10*time.Second, func() bool { return strings.Contains(logs.String(), "refused a data-plane lane connection") })

	// "GMX..." is not a lane: gRPC gets it and hangs up.
	c2, err := net.Dial("tcp", s.Addr())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	_, _ = c2.Write([]byte("GMXXXXXXXXXXXXXXXXXXXXXXXXXX"))
	_ = c2.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.ReadAll(c2); errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("gRPC did not close a foreign connection: %v", err)
	}

	// The port still serves gRPC and lanes.
	other, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	comms := make([]*Communicator, 2)
	addrs := []string{s.Addr(), other.Addr()}
	for r, srv := range []*Server{s, other} {
		if comms[r], err = New(srv.Transport(), Group{Job: "j", Rank: r, Addrs: addrs}, testConfig()); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	noErrs(t, RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, 10000), OpSum)
	}))
	if lanesOf(s) == 0 {
		t.Fatal("no lanes after the refusals")
	}
}

// A token works once: the second connection presenting it is refused.
func TestLaneTokenIsOneTime(t *testing.T) {
	s, err := Listen("127.0.0.1:0", DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	ep, err := s.Transport().Open(EndpointSpec{Job: "j", Rank: 0, Addrs: []string{s.Addr(), "127.0.0.1:1"}, Channels: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer ep.Close()
	ge := ep.(*netEndpoint)
	sl := ge.slot(1, 0)
	sl.claim()
	tok, err := s.svc.offerLane(ge, sl, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	cfg := DefaultNetConfig()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	keep := func(c net.Conn) { _ = c.Close() }
	l, err := dialLane(ctx, &cfg, s.Addr(), "", tok, keep)
	if err != nil {
		t.Fatal(err)
	}
	defer l.close()
	if _, err := dialLane(ctx, &cfg, s.Addr(), "", tok, keep); err == nil || !strings.Contains(err.Error(), "already used") {
		t.Fatalf("second use of a token: %v", err)
	}
	// The accepted lane carries a frame into the slot.
	h := Header{Kind: FrameData, Coll: CollSendRecv, DType: Uint8, Count: 3, Src: 1, Length: 3}
	if err := l.writeFrame(ctx, &h, []byte{7, 8, 9}); err != nil {
		t.Fatal(err)
	}
	f, err := ep.Recv(ctx, 1, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Release()
	if got := concat(f.Payload); !bytes.Equal(got, []byte{7, 8, 9}) || f.Header.Count != 3 {
		t.Fatalf("frame %+v %v", f.Header, got)
	}
}

// The port is shared: a *grpc.Server with the data plane and a protobuf
// service serves through Service.Listener, lanes and gRPC alike.
func TestLaneSamePortAsGRPCServices(t *testing.T) {
	gcfg := DefaultNetConfig()
	svc, addr := serveWithHealth(t, gcfg, true)
	other, err := Listen("127.0.0.1:0", gcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close()
	addrs := []string{addr, other.Addr()}
	comms := make([]*Communicator, 2)
	for r, tr := range []Transport{NewNetTransport(svc), other.Transport()} {
		if comms[r], err = New(tr, Group{Job: "j", Rank: r, Addrs: addrs}, testConfig()); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	allReduceChecked(t, comms, Float64, OpSum, 40001, "shared port")
	if n := lanesOf(other); n != 4 {
		t.Fatalf("%d lanes at the other rank, want 4", n)
	}
	checkHealth(t, addr, "shared port")
}

// testTLS makes a CA and one certificate for 127.0.0.1, and returns the
// server and client sides of mutual TLS.
func testTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "node"}, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		DNSNames: []string{"node.test"}, IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}, KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	server = &tls.Config{MinVersion: tls.VersionTLS12, ClientCAs: pool, Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert}
	client = &tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, Certificates: []tls.Certificate{cert}, ServerName: "node.test"}
	return server, client
}

// tlsServer is a data-plane server whose gRPC side and lanes use the same
// mutual TLS, as a node with --tls-* flags runs it.
func tlsServer(t *testing.T, gcfg NetConfig, srv, cli *tls.Config) (*Service, string, func()) {
	t.Helper()
	gcfg.LaneServerTLS, gcfg.LaneClientTLS = srv, cli
	gcfg.DialOptions = []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(cli))}
	svc, err := NewService(gcfg)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(append(ServerOptions(gcfg), grpc.Creds(credentials.NewTLS(srv)))...)
	svc.Register(gs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(svc.Listener(lis)) }()
	return svc, lis.Addr().String(), func() { gs.Stop(); <-done }
}

// With TLS on the RPC port, lanes are wrapped in the same mutual TLS; a
// lane without TLS (or with a certificate from another CA) is refused.
func TestLaneTLS(t *testing.T) {
	srv, cli := testTLS(t)
	var logs syncBuffer
	gcfg := DefaultNetConfig()
	gcfg.Logger = hclog.New(&hclog.LoggerOptions{Output: &logs, Level: hclog.Warn})
	svcA, addrA, stopA := tlsServer(t, gcfg, srv, cli)
	defer stopA()
	svcB, addrB, stopB := tlsServer(t, gcfg, srv, cli)
	defer stopB()
	addrs := []string{addrA, addrB}
	comms := make([]*Communicator, 2)
	var err error
	for r, svc := range []*Service{svcA, svcB} {
		if comms[r], err = New(NewNetTransport(svc), Group{Job: "j", Rank: r, Addrs: addrs}, testConfig()); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	allReduceChecked(t, comms, Float32, OpAvg, 100003, "tls lanes")
	ep := comms[0].ep.(*netEndpoint)
	ep.qmu.Lock()
	lanes := append([]*laneConn(nil), ep.lanes...)
	ep.qmu.Unlock()
	if len(lanes) != 4 {
		t.Fatalf("%d lanes, want 4", len(lanes))
	}
	for _, l := range lanes {
		if _, ok := l.c.(*tls.Conn); !ok {
			t.Fatalf("lane %v is not TLS", l.c.RemoteAddr())
		}
	}

	// A plaintext lane to the TLS port is refused and logged.
	plain := DefaultNetConfig()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var tok laneToken
	if _, err := dialLane(ctx, &plain, addrA, "", tok, func(c net.Conn) { _ = c.Close() }); err == nil {
		t.Fatal("plaintext lane accepted by a TLS node")
	}
	// So is one with a certificate of another CA.
	_, otherCli := testTLS(t)
	other := DefaultNetConfig()
	other.LaneClientTLS = otherCli
	if _, err := dialLane(ctx, &other, addrA, "", tok, func(c net.Conn) { _ = c.Close() }); err == nil {
		t.Fatal("lane with a foreign certificate accepted")
	}
	poll.Until(t, 10*time.Second, func() bool { return strings.Count(logs.String(), "TLS handshake failed") >= 2 })
}

// A rank whose peer stops taking part: cancelling its context returns at
// once, even with its sends blocked on a full socket, and the no-progress
// timeout fails it too; nothing leaks (TestMain checks goroutines).
func TestLaneBlockedIOHonoursContextAndTimeout(t *testing.T) {
	for _, mode := range []string{"cancel", "timeout"} {
		cfg := testConfig()
		cfg.ChunkBytes = 1 << 20
		cfg.Timeout = 10 * time.Second
		if mode == "timeout" {
			cfg.Timeout = 400 * time.Millisecond
		}
		g, err := NewLoopbackGroup("job", 1, 2, cfg, DefaultNetConfig())
		if err != nil {
			t.Fatal(err)
		}
		// Connect the lanes with one operation both ranks run.
		noErrs(t, RunAll(g.Comms, func(c *Communicator) error {
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<20), OpSum)
		}))
		ctx, cancel := context.WithCancel(context.Background())
		errc := make(chan error, 1)
		go func() { errc <- g.Comms[0].AllReduce(ctx, NewHostBuffer(Float32, 16<<20), OpSum) }()
		// Rank 1 does not call: rank 0's receives wait and its sends fill
		// the socket buffers.
		poll.Until(t, 10*time.Second, func() bool { return g.Comms[0].active.Load() == 1 })
		start := time.Now()
		if mode == "cancel" {
			time.AfterFunc(100*time.Millisecond, cancel)
		}
		select {
		case err = <-errc:
		case <-time.After(30 * time.Second):
			t.Fatalf("%s: rank 0 still blocked after 30 s", mode)
		}
		cancel()
		switch mode {
		case "cancel":
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("cancel: %v", err)
			}
		case "timeout":
			if !errors.Is(err, ErrTimeout) {
				t.Fatalf("timeout: %v", err)
			}
		}
		if el := time.Since(start); el > 10*time.Second {
			t.Fatalf("%s: took %v", mode, el)
		}
		// Rank 1 hears about it.
		poll.Until(t, 10*time.Second, func() bool { return g.Comms[1].Err() != nil })
		g.Close()
	}
}

// An operation too small to give every channel MinChannelBytes per block
// runs on fewer channels (fewer frames and links), with the same result;
// a large one uses them all.
func TestSmallOperationsUseFewerChannels(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Channels = 4
	g, err := NewLoopbackGroup("job", 1, 2, cfg, DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, c := range g.Comms {
		c.minChan = MinChannelBytes
	}
	c0 := g.Comms[0]
	for _, tc := range []struct{ bytes, want int }{
		{0, 1}, {MinChannelBytes - 4, 1}, {MinChannelBytes, 1}, {2*MinChannelBytes + 4, 2}, {3 * MinChannelBytes, 3}, {64 * MinChannelBytes, 4},
	} {
		if got := c0.planChannels(tc.bytes); got != tc.want {
			t.Errorf("planChannels(%d) = %d, want %d", tc.bytes, got, tc.want)
		}
	}
	// Per server: one lane out and one in per channel in use.
	for _, step := range []struct {
		count int // float32 elements; a block is half of them
		lanes int
	}{{MinChannelBytes/2 + 3, 2}, {4*MinChannelBytes/2 + 5, 8}} {
		allReduceChecked(t, g.Comms, Float32, OpSum, step.count, "fewer channels")
		for i, s := range g.Servers {
			if n := lanesOf(s); n != step.lanes {
				t.Errorf("after %d elements: server %d has %d lanes, want %d", step.count, i, n, step.lanes)
			}
		}
	}
}

// Config.MinChannelBytes replaces the built-in least bytes per channel:
// with 1 MiB per channel a 4 MiB two-rank all-reduce (2 MiB blocks) runs on
// 2 of 16 channels, with the same result; out-of-range values are refused.
func TestConfigMinChannelBytes(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Channels = 16
	cfg.MinChannelBytes = 1 << 20
	g, err := NewLoopbackGroup("job", 1, 2, cfg, DefaultNetConfig())
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	if got := g.Comms[0].planChannels(2 << 20); got != 2 {
		t.Fatalf("planChannels(2 MiB) = %d with 1 MiB per channel, want 2", got)
	}
	if got := g.Comms[0].planChannels(64 << 20); got != 16 {
		t.Fatalf("planChannels(64 MiB) = %d, want all 16", got)
	}
	allReduceChecked(t, g.Comms, Float32, OpSum, 1<<20, "1 MiB per channel")
	for i, s := range g.Servers {
		if n := lanesOf(s); n != 4 {
			t.Errorf("server %d has %d lanes, want 4 (2 channels, one lane out and one in each)", i, n)
		}
	}
	for _, bad := range []int{-1, 1 << 10, MaxFrameBytes + 1} {
		c := DefaultConfig()
		c.MinChannelBytes = bad
		if err := c.Validate(); !errors.Is(err, ErrBadArgument) {
			t.Errorf("MinChannelBytes %d: err = %v, want ErrBadArgument", bad, err)
		}
	}
}
