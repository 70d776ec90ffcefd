package collective

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/gpumesh/gpumesh/internal/poll"
)

func TestNetAllReduceCorrect(t *testing.T) { forEachDataPlane(t, testNetAllReduceCorrect) }

func testNetAllReduceCorrect(t *testing.T, planeCfg NetConfig) {
	cfg := testConfig()
	g, err := NewLoopbackGroup("job", 1, 3, cfg, planeCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	for _, dt := range []DType{Float32, BFloat16, Int64, Uint8} {
		for _, op := range []Op{OpSum, OpAvg, OpMax} {
			for _, count := range []int{0, 1, 17, 100003} {
				allReduceChecked(t, g.Comms, dt, op, count, fmt.Sprintf("grpc %v %v %d", dt, op, count))
			}
		}
	}
	// Broadcast, send/recv and barrier over gRPC too.
	b := []*HostBuffer{NewHostBuffer(Float32, 70001), NewHostBuffer(Float32, 70001), NewHostBuffer(Float32, 70001)}
	fill(b[1], OpSum, 1)
	noErrs(t, RunAll(g.Comms, func(c *Communicator) error {
		if err := c.Broadcast(context.Background(), b[c.Rank()], 1); err != nil {
			return err
		}
		var err error
		switch c.Rank() {
		case 0:
			err = c.Send(context.Background(), b[0], 2)
		case 2:
			err = c.Recv(context.Background(), b[2], 0)
		}
		if err != nil {
			return err
		}
		return c.Barrier(context.Background())
	}))
	for r := range b {
		for i := 0; i < b[r].Len(); i++ {
			if b[r].At(i) != value(Float32, OpSum, 1, i) {
				t.Fatalf("rank %d element %d wrong after broadcast", r, i)
			}
		}
	}
}

func TestNetMismatchNamesIt(t *testing.T) { forEachDataPlane(t, testNetMismatchNamesIt) }

func testNetMismatchNamesIt(t *testing.T, planeCfg NetConfig) {
	g, err := NewLoopbackGroup("job", 1, 2, testConfig(), planeCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	errs := RunAll(g.Comms, func(c *Communicator) error {
		count := 1000
		if c.Rank() == 0 {
			count = 999
		}
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, count), OpSum)
	})
	for r, err := range errs {
		if !errors.Is(err, ErrMismatch) || !strings.Contains(err.Error(), "count=999") || !strings.Contains(err.Error(), "count=1000") {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
}

func TestNetDeadPeerFailsSurvivors(t *testing.T) {
	forEachDataPlane(t, testNetDeadPeerFailsSurvivors)
}

func testNetDeadPeerFailsSurvivors(t *testing.T, planeCfg NetConfig) {
	cfg := testConfig()
	cfg.Timeout = 5 * time.Second
	g, err := NewLoopbackGroup("job", 1, 3, cfg, planeCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer g.Close()
	// A first operation connects everyone.
	noErrs(t, RunAll(g.Comms, func(c *Communicator) error { return c.Barrier(context.Background()) }))
	errs := make(chan error, 2)
	for _, r := range []int{0, 2} {
		go func() {
			errs <- g.Comms[r].AllReduce(context.Background(), NewHostBuffer(Float32, 1<<20), OpSum)
		}()
	}
	poll.Until(t, 10*time.Second, func() bool { return g.Comms[0].active.Load() == 1 && g.Comms[2].active.Load() == 1 })
	// Rank 1's node goes away: its server and links are cut.
	g.Servers[1].Close()
	_ = g.Comms[1].ep.Close()
	start := time.Now()
	for i := 0; i < 2; i++ {
		if err := <-errs; !errors.Is(err, ErrPeerFailed) && !errors.Is(err, ErrTimeout) {
			t.Fatalf("survivor got %v", err)
		}
	}
	if el := time.Since(start); el > cfg.Timeout+5*time.Second {
		t.Fatalf("survivors took %v", el)
	}
}

func TestNetUnreachablePeer(t *testing.T) { forEachDataPlane(t, testNetUnreachablePeer) }

func testNetUnreachablePeer(t *testing.T, planeCfg NetConfig) {
	cfg := testConfig()
	cfg.Timeout = 500 * time.Millisecond
	s, err := Listen("127.0.0.1:0", planeCfg)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	// A port nobody listens on.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	_ = l.Close()
	c, err := New(s.Transport(), Group{Job: "j", Rank: 0, Addrs: []string{s.Addr(), dead}}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	err = c.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<16), OpSum)
	if !errors.Is(err, ErrTimeout) && !errors.Is(err, ErrPeerFailed) {
		t.Fatalf("got %v", err)
	}
}

func TestNetStaleGenerationRefused(t *testing.T) {
	forEachDataPlane(t, testNetStaleGenerationRefused)
}

func testNetStaleGenerationRefused(t *testing.T, planeCfg NetConfig) {
	cfg := testConfig()
	cfg.Timeout = 5 * time.Second
	srvs := listenServers(t, 2, planeCfg)
	a, b := srvs[0], srvs[1]
	addrs := []string{a.Addr(), b.Addr()}
	// Node b already serves generation 5 of the job; a rank of generation 4
	// must be refused.
	newer, err := New(b.Transport(), Group{Job: "j", Generation: 5, Rank: 1, Addrs: addrs}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer newer.Close()
	if _, err := New(b.Transport(), Group{Job: "j", Generation: 4, Rank: 0, Addrs: addrs}, cfg); !errors.Is(err, ErrStaleGeneration) {
		t.Fatalf("opening an old generation locally: %v", err)
	}
	old, err := New(a.Transport(), Group{Job: "j", Generation: 4, Rank: 0, Addrs: addrs}, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	err = old.AllReduce(context.Background(), NewHostBuffer(Float32, 1<<16), OpSum)
	if !errors.Is(err, ErrStaleGeneration) {
		t.Fatalf("old generation traffic: %v, want ErrStaleGeneration", err)
	}
}

// The data plane shares a *grpc.Server with protobuf services.
func TestNetSharesServerWithProtobuf(t *testing.T) {
	svc, addr := serveWithHealth(t, DefaultNetConfig(), false)
	tr := NewNetTransport(svc)
	addrs := []string{addr, addr} // two ranks served by one node
	comms := make([]*Communicator, 2)
	for r := range comms {
		var err error
		comms[r], err = New(tr, Group{Job: "j", Rank: r, Addrs: addrs}, testConfig())
		if err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	allReduceChecked(t, comms, Float32, OpSum, 5000, "shared server")
	checkHealth(t, addr, "shared server")
}

// serveWithHealth serves a data-plane Service and the gRPC health service
// from one *grpc.Server on a loopback port (through Service.Listener, so
// that lanes share the port, when lanes is set) until the test ends.
func serveWithHealth(t *testing.T, gcfg NetConfig, lanes bool) (*Service, string) {
	t.Helper()
	svc, err := NewService(gcfg)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(ServerOptions(gcfg)...)
	svc.Register(gs)
	healthpb.RegisterHealthServer(gs, health.NewServer())
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serve := lis
	if lanes {
		serve = svc.Listener(lis)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = gs.Serve(serve) }()
	t.Cleanup(func() { gs.Stop(); <-done })
	return svc, lis.Addr().String()
}

// checkHealth asks addr's gRPC health service and wants SERVING.
func checkHealth(t *testing.T, addr, what string) {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, err := healthpb.NewHealthClient(cc).Check(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health on the %s: %v %v", what, resp, err)
	}
}

// Ranks 0 and 1 live in one process (one server, same address) and exchange
// in memory; rank 2 is on another node and talks gRPC. With NoLocalShortcut
// the same group runs over TCP only.
func TestNetMixedLocalAndRemoteRanks(t *testing.T) {
	forEachDataPlane(t, testNetMixedLocalAndRemoteRanks)
}

func testNetMixedLocalAndRemoteRanks(t *testing.T, planeCfg NetConfig) {
	for _, noLocal := range []bool{false, true} {
		gcfg := planeCfg
		gcfg.NoLocalShortcut = noLocal
		srvs := listenServers(t, 2, gcfg)
		a, b := srvs[0], srvs[1]
		addrs := []string{a.Addr(), a.Addr(), b.Addr()}
		servers := []*Server{a, a, b}
		comms := make([]*Communicator, 3)
		var err error
		for r := range comms {
			if comms[r], err = New(servers[r].Transport(), Group{Job: "j", Rank: r, Addrs: addrs}, testConfig()); err != nil {
				t.Fatal(err)
			}
		}
		ep := comms[0].ep.(*netEndpoint)
		if ep.local[1] == noLocal || ep.local[2] {
			t.Fatalf("noLocal=%v: local peers %v", noLocal, ep.local)
		}
		for _, count := range []int{7, 50001} {
			allReduceChecked(t, comms, Float64, OpSum, count, fmt.Sprintf("mixed noLocal=%v", noLocal))
		}
		// A mismatch still reaches every rank, local or remote.
		errs := RunAll(comms, func(c *Communicator) error {
			n := 100
			if c.Rank() == 1 {
				n = 101
			}
			return c.AllReduce(context.Background(), NewHostBuffer(Float32, n), OpSum)
		})
		for r, err := range errs {
			if !errors.Is(err, ErrMismatch) {
				t.Fatalf("noLocal=%v rank %d: %v", noLocal, r, err)
			}
		}
		CloseAll(comms)
		a.Close()
		b.Close()
	}
}

func TestNetChannelConfigMismatch(t *testing.T) { forEachDataPlane(t, testNetChannelConfigMismatch) }

func testNetChannelConfigMismatch(t *testing.T, planeCfg NetConfig) {
	srvs := listenServers(t, 2, planeCfg)
	addrs := []string{srvs[0].Addr(), srvs[1].Addr()}
	comms := make([]*Communicator, 2)
	var err error
	for r, s := range srvs {
		cfg := testConfig()
		cfg.Timeout = 3 * time.Second
		cfg.Channels = 2 + 2*r
		if comms[r], err = New(s.Transport(), Group{Job: "j", Rank: r, Addrs: addrs}, cfg); err != nil {
			t.Fatal(err)
		}
	}
	defer CloseAll(comms)
	errs := RunAll(comms, func(c *Communicator) error {
		return c.AllReduce(context.Background(), NewHostBuffer(Float32, 100000), OpSum)
	})
	for r, err := range errs {
		if err == nil || !strings.Contains(err.Error(), "channels") {
			t.Fatalf("rank %d: %v", r, err)
		}
	}
}

// listenServers starts n data-plane servers with gcfg on loopback ports;
// they close when the test ends.
func listenServers(t *testing.T, n int, gcfg NetConfig) []*Server {
	t.Helper()
	srvs := make([]*Server, n)
	for i := range srvs {
		s, err := Listen("127.0.0.1:0", gcfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(s.Close)
		srvs[i] = s
	}
	return srvs
}

// forEachDataPlane runs f with lanes (the default) and with frames on the
// gRPC streams.
func forEachDataPlane(t *testing.T, f func(t *testing.T, gcfg NetConfig)) {
	for _, plane := range []string{DataPlaneTCP, DataPlaneGRPC} {
		t.Run(plane, func(t *testing.T) {
			gcfg := DefaultNetConfig()
			gcfg.DataPlane = plane
			f(t, gcfg)
		})
	}
}
