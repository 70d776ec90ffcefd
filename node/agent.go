package node

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/consensus"
	"github.com/gpumesh/gpumesh/deploy"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/mesh"
)

// Version is the gpumesh version, set at build time with -ldflags.
var Version = "0.1.0-dev"

// Agent is one gpumesh daemon.
type Agent struct {
	cfg    *Config
	logger hclog.Logger

	nodeID  string
	advAddr string
	rpcAddr string // advertised host:port of the gRPC API (and data plane)

	rpcLn  net.Listener
	httpLn net.Listener
	// serveLn is the serve port's listener (Config.ServeAddr), opened
	// with the others so its address is in the node's record; serveS
	// serves it. nil when off.
	serveLn net.Listener
	grpc    *grpc.Server
	httpS   *http.Server
	serveS  *serveFront // the serve port (service_serve.go); nil when off
	health  *health.Server

	mesh       membership
	discoverer Discoverer
	raft       raftServer // nil on nodes that are not server-eligible
	runner     *runner
	router     *router // service routing (service_router.go)
	conns      *connPool
	data       *dataPlane
	sec        *security        // TLS and ACL token (security.go); nil when off
	ops        *opsState        // metrics and dashboard (metrics.go)
	ec2        *deploy.AgentEC2 // identity, notices, tag discovery (ec2.go); nil off EC2
	local      *localAPI        // the PyTorch backend's socket (localapi.go); nil when off
	localOff   string           // why local is nil: given to exec tasks (EnvLocalAPIOff)

	hooks    leaderHooks
	elig     eligibilityGuard          // drain.go
	onLeader func(ctx context.Context) // runs while this agent leads; nil: nothing

	selfMu sync.Mutex
	self   *pb.Node

	ctx      context.Context
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	shutOnce sync.Once
	shutErr  error
}

// NewAgent starts an agent: its listeners, gossip, Raft (on server-eligible
// nodes), the Control API and the allocation runner. Join happens in the
// background, so NewAgent returns before the cluster has formed. It keeps a
// copy of cfg and never changes the caller's.
func NewAgent(userCfg *Config) (a *Agent, err error) {
	if err := userCfg.Validate(); err != nil {
		return nil, fmt.Errorf("agent config: %w", err)
	}
	c := *userCfg
	cfg := &c
	logger := cfg.Logger
	if logger == nil {
		logger = hclog.New(&hclog.LoggerOptions{Name: "gpumesh", Level: hclog.Info})
	}
	if err := os.MkdirAll(cfg.DataDir, 0o755); err != nil {
		return nil, fmt.Errorf("data dir: %w", err)
	}
	sec, err := newSecurity(cfg.Security, logger)
	if err != nil {
		return nil, err
	}
	a = &Agent{cfg: cfg, logger: logger, conns: newConnPool(sec.dialOptions()...), discoverer: cfg.Discoverer, sec: sec}
	a.ops = newOpsState(a)
	a.ctx, a.cancel = context.WithCancel(context.Background())
	// Undo what was started when a later step fails. The agent is kept
	// here: `return nil, err` has already cleared the named result when
	// this runs.
	started := a
	defer func() {
		if err != nil {
			_ = started.Shutdown()
		}
	}()

	if err := a.startEC2(cfg); err != nil {
		return nil, err
	}
	if a.nodeID, err = loadNodeID(cfg); err != nil {
		return nil, err
	}
	if a.advAddr, err = advertiseAddr(cfg); err != nil {
		return nil, err
	}

	if a.rpcLn, err = net.Listen("tcp", joinHostPort(cfg.BindAddr, cfg.RPCPort)); err != nil {
		return nil, fmt.Errorf("rpc listener (port %d, --rpc-port): %w", cfg.RPCPort, err)
	}
	if a.httpLn, err = net.Listen("tcp", joinHostPort(cfg.BindAddr, cfg.HTTPPort)); err != nil {
		return nil, fmt.Errorf("http listener (port %d, --http-port): %w", cfg.HTTPPort, err)
	}
	if c := sec.httpTLSConfig(); c != nil {
		a.httpLn = tls.NewListener(a.httpLn, c) // same certificate as gRPC
	}
	if cfg.ServeAddr != "" {
		addr := cfg.ServeAddr
		if host, port, _ := net.SplitHostPort(addr); host == "" {
			addr = net.JoinHostPort(cfg.BindAddr, port)
		}
		if a.serveLn, err = net.Listen("tcp", addr); err != nil {
			return nil, fmt.Errorf("serve listener (%s, --serve): %w", cfg.ServeAddr, err)
		}
	}
	a.rpcAddr = joinHostPort(a.advAddr, a.rpcLn.Addr().(*net.TCPAddr).Port)
	raftPort := cfg.RaftPort
	gossipPort := cfg.GossipPort
	if raftPort == 0 {
		if raftPort, err = freePort(cfg.BindAddr); err != nil {
			return nil, err
		}
	}
	if gossipPort == 0 {
		if gossipPort, err = freePort(cfg.BindAddr); err != nil {
			return nil, err
		}
	}
	if cfg.NodeName == "" {
		host, _ := os.Hostname()
		cfg.NodeName = DefaultNodeName(host, cfg.BindAddr, gossipPort)
	}

	a.self = &pb.Node{
		Id:           a.nodeID,
		Name:         cfg.NodeName,
		GossipAddr:   joinHostPort(a.advAddr, gossipPort),
		RpcAddr:      a.rpcAddr,
		RaftAddr:     joinHostPort(a.advAddr, raftPort),
		HttpAddr:     joinHostPort(a.advAddr, a.httpLn.Addr().(*net.TCPAddr).Port),
		ServeAddr:    a.advertisedServeAddr(),
		Gpus:         cfg.gpus(logger),
		InstanceType: cfg.InstanceType,
		Az:           cfg.AZ,
		Region:       cfg.Region,
		Lifecycle:    orUnknown(cfg.Lifecycle),
		Status:       consensus.NodeReady,
		Server:       cfg.Server,
		MaxRanks:     int32(cfg.maxRanks()),
		Version:      Version,
	}
	if !cfg.Server {
		a.self.RaftAddr = ""
	}

	if a.mesh, err = newMesh(a, gossipPort); err != nil {
		return nil, fmt.Errorf("gossip: %w", err)
	}
	if cfg.Server {
		if a.raft, err = newRaft(a, raftPort); err != nil {
			return nil, fmt.Errorf("raft: %w", err)
		}
	}

	opts := append(dataPlaneServerOptions(),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
	)
	opts = append(opts, a.sec.serverOptions()...)
	a.grpc = grpc.NewServer(opts...)
	pb.RegisterControlServer(a.grpc, &controlServer{a: a})
	a.health = health.NewServer()
	healthpb.RegisterHealthServer(a.grpc, liveHealth{Server: a.health, a: a})
	reflection.Register(a.grpc)
	if err := registerDataPlane(a); err != nil {
		return nil, err
	}
	if err := startLocalAPI(a); err != nil {
		return nil, err
	}

	a.runner = newRunner(a)
	a.router = newRouter(a.nodeID, a.self.Az, a.logger.Named("router"))
	a.httpS = &http.Server{Handler: a.httpHandler(), ReadHeaderTimeout: serveHeaderTimeout, MaxHeaderBytes: MaxHeaderBytes}
	if a.serveLn != nil {
		a.serveS = newServeFront(a.serveLn, a.router, sec.httpTLSConfig(), a.logger.Named("serve"))
		a.goFunc(func() {
			if err := a.serveS.serve(); err != nil && !errors.Is(err, errServeClosed) {
				a.logger.Error("serve port stopped", "error", err)
			}
		})
	}

	a.goFunc(func() {
		if err := a.grpc.Serve(a.rpcLn); err != nil && !errors.Is(err, grpc.ErrServerStopped) {
			a.logger.Error("rpc server stopped", "error", err)
		}
	})
	a.goFunc(func() {
		if err := a.httpS.Serve(a.httpLn); err != nil && !errors.Is(err, http.ErrServerClosed) {
			a.logger.Error("http server stopped", "error", err)
		}
	})
	a.goFunc(a.membershipLoop)
	a.goFunc(a.joinLoop)
	a.goFunc(a.roleLoop)
	if a.ec2 != nil && a.ec2.Watcher != nil {
		a.goFunc(func() { a.spotLoop(a.ec2.Events()) })
	}
	a.runner.goFunc(a.runner.run) // counted by the runner, so its own goroutines join a group that shutdown waits on
	a.updateHealth()
	a.goFunc(a.healthLoop)
	a.goFunc(a.followServices)
	a.goFunc(a.loadLoop) // service_load.go
	logger.Info("agent started", "node", cfg.NodeName, "id", a.nodeID, "rpc", a.rpcAddr,
		"gossip", a.self.GossipAddr, "raft", a.self.RaftAddr, "http", a.self.HttpAddr, "serve", a.ServeAddr(), "server", cfg.Server)
	return a, nil
}

// goFunc runs f in a goroutine that Shutdown waits for.
func (a *Agent) goFunc(f func()) {
	a.wg.Add(1)
	go func() {
		defer a.wg.Done()
		f()
	}()
}

// NodeID is the agent's stable identity.
func (a *Agent) NodeID() string { return a.nodeID }

// Name is the agent's node name.
func (a *Agent) Name() string { return a.cfg.NodeName }

// RPCAddr is where the Control API (and the data plane) listens.
func (a *Agent) RPCAddr() string { return a.rpcAddr }

// HTTPAddr is where metrics, health and the dashboard are served.
func (a *Agent) HTTPAddr() string { return a.self.HttpAddr }

// ServeAddr is the serve port's address as the node advertises it
// (Node.serve_addr), "" when it is off.
func (a *Agent) ServeAddr() string { return a.self.ServeAddr }

// advertisedServeAddr is the serve port's address for others: its
// listener's IP, or the advertise address when it listens on all of them;
// "" without a serve port.
func (a *Agent) advertisedServeAddr() string {
	if a.serveLn == nil {
		return ""
	}
	tcp := a.serveLn.Addr().(*net.TCPAddr)
	if tcp.IP == nil || tcp.IP.IsUnspecified() {
		return joinHostPort(a.advAddr, tcp.Port)
	}
	return net.JoinHostPort(tcp.IP.String(), strconv.Itoa(tcp.Port))
}

// GossipAddr is the agent's gossip address, for others to join.
func (a *Agent) GossipAddr() string { return a.self.GossipAddr }

// IsLeader reports whether this agent is the Raft leader.
func (a *Agent) IsLeader() bool { return a.raft != nil && a.raft.IsLeader() }

// Role is leader, voter, standby or client.
func (a *Agent) Role() string {
	if a.raft == nil {
		return "client"
	}
	if r := a.raft.Role(); r != "none" {
		return r
	}
	return "client"
}

func (a *Agent) selfNode() *pb.Node {
	a.selfMu.Lock()
	defer a.selfMu.Unlock()
	return proto.Clone(a.self).(*pb.Node)
}

// membershipLoop passes gossip changes to Raft (bootstrap, reconcile).
func (a *Agent) membershipLoop() {
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-a.mesh.Changed():
			if a.raft != nil {
				a.raft.MembershipChanged()
			}
		}
	}
}

// joinLoop joins the configured addresses, retrying with backoff.
func (a *Agent) joinLoop() {
	if len(a.cfg.Join) == 0 {
		return
	}
	addrs := make([]string, 0, len(a.cfg.Join))
	for _, j := range a.cfg.Join {
		if _, _, err := net.SplitHostPort(j); err != nil {
			j = joinHostPort(j, DefaultGossipPort)
		}
		addrs = append(addrs, j)
	}
	if err := a.mesh.Join(a.ctx, addrs); err != nil && a.ctx.Err() == nil {
		a.logger.Error("could not join the cluster", "addrs", addrs, "error", err)
	}
}

// pickServer returns the RPC address of an alive server-eligible member
// other than this agent, preferring the leader's view when known.
func (a *Agent) pickServer() string {
	var cands []string
	for _, m := range a.mesh.Members() {
		if m.State != consensus.MemberAlive || m.Node == nil || !m.Node.Server || m.Node.RpcAddr == a.rpcAddr {
			continue
		}
		cands = append(cands, m.Node.RpcAddr)
	}
	if len(cands) == 0 {
		return ""
	}
	var b [1]byte
	_, _ = rand.Read(b[:])
	return cands[int(b[0])%len(cands)]
}

// rpcAddrOf finds a node's RPC address from gossip, then from the state.
func (a *Agent) rpcAddrOf(nodeID string) string {
	if nodeID == a.nodeID {
		return a.rpcAddr
	}
	for _, m := range a.mesh.Members() {
		if m.Node != nil && m.Node.Id == nodeID && m.State != consensus.MemberDead && m.State != consensus.MemberLeft {
			return m.Node.RpcAddr
		}
	}
	if a.raft != nil && a.raft.HasState() {
		if n := a.raft.State().Node(nodeID); n != nil {
			return n.RpcAddr
		}
	}
	return ""
}

// Shutdown stops the agent without leaving the cluster (as a crash would,
// but cleanly). Safe to call more than once.
func (a *Agent) Shutdown() error {
	a.shutOnce.Do(func() {
		var errs []error
		if a.cancel != nil {
			a.cancel()
		}
		if a.health != nil {
			a.health.Shutdown()
		}
		a.stopLeaderHooks()
		if a.ec2 != nil {
			a.ec2.Shutdown()
		}
		if a.runner != nil {
			a.runner.shutdown()
		}
		closeLocalAPI(a)
		if a.grpc != nil {
			stopped := make(chan struct{})
			go func() { a.grpc.GracefulStop(); close(stopped) }()
			select {
			case <-stopped:
			case <-time.After(2 * time.Second):
				a.grpc.Stop()
				<-stopped
			}
		} else if a.rpcLn != nil {
			a.rpcLn.Close()
		}
		if a.httpS != nil {
			// In-flight requests on the HTTP and serve ports finish, up to
			// the deadline.
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			served := make(chan struct{})
			go func() {
				defer close(served)
				if a.serveS != nil {
					_ = a.serveS.shutdown(ctx)
				}
			}()
			_ = a.httpS.Shutdown(ctx)
			<-served
			cancel()
			a.router.closeConns()
		} else if a.httpLn != nil {
			a.httpLn.Close()
		}
		if a.serveS == nil && a.serveLn != nil {
			a.serveLn.Close() // NewAgent failed before serving it
		}
		if a.raft != nil {
			errs = append(errs, a.raft.Shutdown())
		}
		if a.mesh != nil {
			errs = append(errs, a.mesh.Shutdown())
		}
		closeDataPlane(a)
		a.conns.close()
		a.wg.Wait()
		a.shutErr = errors.Join(errs...)
	})
	return a.shutErr
}

// Leave gossips a graceful departure, then shuts down.
func (a *Agent) Leave() error {
	if a.raft != nil && a.raft.IsLeader() {
		_ = a.raft.TransferLeadership()
	}
	_ = a.mesh.Leave(2 * time.Second)
	return a.Shutdown()
}

// loadNodeID reads DataDir/node-id or creates it.
func loadNodeID(cfg *Config) (string, error) {
	if cfg.NodeID != "" {
		return cfg.NodeID, nil
	}
	p := filepath.Join(cfg.DataDir, "node-id")
	if b, err := os.ReadFile(p); err == nil {
		if id := strings.TrimSpace(string(b)); id != "" {
			return id, nil
		}
	}
	var b [8]byte
	if _, err := rand.Read(b[:]); err != nil {
		return "", err
	}
	id := hex.EncodeToString(b[:])
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, []byte(id+"\n"), 0o644); err != nil {
		return "", fmt.Errorf("node id: %w", err)
	}
	if err := os.Rename(tmp, p); err != nil {
		return "", fmt.Errorf("node id: %w", err)
	}
	return id, nil
}

func advertiseAddr(cfg *Config) (string, error) {
	if cfg.AdvertiseAddr != "" {
		return cfg.AdvertiseAddr, nil
	}
	ip := net.ParseIP(cfg.BindAddr)
	if ip != nil && !ip.IsUnspecified() {
		return cfg.BindAddr, nil
	}
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return "", fmt.Errorf("finding an address to advertise: %w (set --advertise)", err)
	}
	for _, ad := range addrs {
		if n, ok := ad.(*net.IPNet); ok && n.IP.To4() != nil && n.IP.IsPrivate() {
			return n.IP.String(), nil
		}
	}
	for _, ad := range addrs {
		if n, ok := ad.(*net.IPNet); ok && n.IP.To4() != nil && !n.IP.IsLoopback() {
			return n.IP.String(), nil
		}
	}
	return "127.0.0.1", nil
}

// DefaultNodeName is the name of an agent started without one: the host
// name, plus what tells apart several agents sharing the host: the bind
// address when it is a loopback address (agents on 127.0.0.2, 127.0.0.3,
// ... of one machine) and the gossip port when it is not the default.
// "devbox", "devbox-127.0.0.2", "devbox-127.0.0.1-8946".
func DefaultNodeName(host, bindAddr string, gossipPort int) string {
	if host == "" {
		host = "gpumesh"
	}
	suffix := ""
	if ip := net.ParseIP(bindAddr); ip != nil && ip.IsLoopback() {
		suffix += "-" + ip.String()
	}
	if gossipPort != DefaultGossipPort {
		suffix += "-" + strconv.Itoa(gossipPort)
	}
	if len(host)+len(suffix) > mesh.MaxNameLen {
		host = host[:mesh.MaxNameLen-len(suffix)]
	}
	return host + suffix
}

func freePort(host string) (int, error) {
	ln, err := net.Listen("tcp", joinHostPort(host, 0))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// connPool keeps one client connection per remote agent.
type connPool struct {
	mu    sync.Mutex
	conns map[string]*grpc.ClientConn
	opts  []grpc.DialOption // transport credentials and token (security.go)
}

func newConnPool(opts ...grpc.DialOption) *connPool {
	return &connPool{conns: map[string]*grpc.ClientConn{}, opts: opts}
}

func (p *connPool) conn(addr string) (*grpc.ClientConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.conns[addr]; ok {
		return c, nil
	}
	c, err := grpc.NewClient(addr, append([]grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(64 << 20)),
	}, p.opts...)...)
	if err != nil {
		return nil, err
	}
	p.conns[addr] = c
	return c, nil
}

func (p *connPool) client(addr string) (pb.ControlClient, error) {
	c, err := p.conn(addr)
	if err != nil {
		return nil, err
	}
	return pb.NewControlClient(c), nil
}

func (p *connPool) close() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, c := range p.conns {
		c.Close()
		delete(p.conns, k)
	}
}

// roleLoop gossips this agent's Raft duty (for display and for bootstrap
// decisions of newcomers) and starts or stops the leader hooks whenever
// consensus says it may have changed.
func (a *Agent) roleLoop() {
	if a.raft == nil {
		return
	}
	for {
		a.checkLeader()
		role := a.Role()
		if a.ctx.Err() != nil {
			// Shutting down (ctx ends before Raft does): Raft may answer
			// "none" now; keep gossiping the last real duty.
			return
		}
		a.mesh.SetRole(role)
		a.mesh.SetBootstrapped(a.raft.Bootstrapped())
		select {
		case <-a.ctx.Done():
			return
		case <-a.raft.RoleChanged():
		}
	}
}
