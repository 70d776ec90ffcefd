package localapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/collective"
)

// Authorizer decides whether a hello may attach, and where the job's ranks
// are. It is called from connection goroutines, concurrently.
type Authorizer interface {
	// Authorize checks h (its secret, that its rank runs on this node in
	// the current generation) and returns the data-plane address of every
	// rank of the job, by global rank. A refusal wraps ErrDenied.
	Authorize(ctx context.Context, h *Hello) ([]string, error)
}

// Config configures a Server.
type Config struct {
	// SocketPath is where the SOCK_SEQPACKET socket listens (mode 0666, so
	// that tasks running as an unprivileged task user reach it; a hello is
	// accepted only with its task's secret; a stale file left by an earlier
	// agent is replaced). Required; at most
	// 107 bytes (the kernel's limit).
	SocketPath string
	// Transport carries the communicators' frames (the node's data plane).
	Transport collective.Transport
	// Collective is the configuration of every communicator (channels,
	// chunk size, the collective timeout).
	Collective collective.Config
	// Authorizer checks hellos. Required.
	Authorizer Authorizer
	// Checkpointer serves checkpoint connections (ckpt_proto.go); nil
	// refuses them.
	Checkpointer Checkpointer
	// Logger; nil discards.
	Logger hclog.Logger
	// HelloTimeout bounds the wait for a connection's hello and its
	// authorization. Default 30 s.
	HelloTimeout time.Duration
	// MaxRegions bounds the regions one connection may register. Default 4096.
	MaxRegions int
	// MaxRegionBytes bounds one region. Default 1 TiB.
	MaxRegionBytes uint64
	// MaxQueued bounds the operations one connection may have waiting per
	// queue before the agent stops reading it (back-pressure). Default 256.
	MaxQueued int
	// KeepStats is how many ended connections' statistics Snapshot keeps
	// (the oldest go first). Default 1024.
	KeepStats int
}

// Validate fills defaults and checks the configuration.
func (c *Config) Validate() error {
	if c.HelloTimeout == 0 {
		c.HelloTimeout = 30 * time.Second
	}
	if c.MaxRegions == 0 {
		c.MaxRegions = 4096
	}
	if c.MaxRegionBytes == 0 {
		c.MaxRegionBytes = 1 << 40
	}
	if c.MaxQueued == 0 {
		c.MaxQueued = 256
	}
	if c.KeepStats == 0 {
		c.KeepStats = 1024
	}
	if c.Logger == nil {
		c.Logger = hclog.NewNullLogger()
	}
	switch {
	case c.SocketPath == "":
		return fmt.Errorf("%w: socket path is required", ErrBadConfig)
	case len(c.SocketPath) > 107:
		return fmt.Errorf("%w: socket path %q is %d bytes, longer than the 107 a Unix socket allows (use a shorter data dir)", ErrBadConfig, c.SocketPath, len(c.SocketPath))
	case c.Transport == nil || c.Authorizer == nil:
		return fmt.Errorf("%w: transport and authorizer are required", ErrBadConfig)
	case c.HelloTimeout < 0 || c.MaxRegions < 0 || c.MaxQueued < 0 || c.KeepStats < 0:
		return fmt.Errorf("%w: limits must be positive", ErrBadConfig)
	}
	return c.Collective.Validate()
}

// Server serves the local protocol on a Unix socket: it authenticates rank
// processes, maps their shared memory and runs their operations on
// communicators of the node's data plane.
type Server struct {
	cfg Config
	log hclog.Logger
	ln  *net.UnixListener

	mu       sync.Mutex
	conns    map[*conn]struct{}
	attached map[groupKey]bool
	ended    []*RankStats // statistics of ended connections, oldest first
	closed   bool

	wg       sync.WaitGroup
	goCount  atomic.Int64 // goroutines of connections, for leak checks
	regCount atomic.Int64 // regions mapped now
	cudaMaps atomic.Int64 // of which CUDA IPC mappings (cuda.go)
	// CUDA IPC memory handles opened and operations on device memory,
	// since the start (cuda.go).
	cudaOpened, cudaOps atomic.Int64

	cudaOnce sync.Once
	cuda     cudaOpener
	cudaErr  error
}

type groupKey struct {
	job     string
	gen     uint64
	group   string
	grpRank int
}

// Listen creates the socket and serves it until Close.
func Listen(cfg Config) (*Server, error) {
	if !supported {
		return nil, ErrUnsupportedOS
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.SocketPath), 0o755); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(cfg.SocketPath); err == nil && fi.Mode()&os.ModeSocket != 0 {
		_ = os.Remove(cfg.SocketPath) // left by an earlier agent process
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: cfg.SocketPath, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("local API socket: %w", err)
	}
	// Tasks run as other users than the agent (--task-user): anyone may
	// connect, and only a hello with a task's secret is answered.
	if err := os.Chmod(cfg.SocketPath, 0o666); err != nil {
		ln.Close()
		return nil, err
	}
	s := &Server{cfg: cfg, log: cfg.Logger, ln: ln, conns: map[*conn]struct{}{}, attached: map[groupKey]bool{}}
	s.wg.Add(1)
	go s.accept()
	return s, nil
}

// SocketPath is where the server listens.
func (s *Server) SocketPath() string { return s.cfg.SocketPath }

func (s *Server) accept() {
	defer s.wg.Done()
	for {
		c, err := s.ln.AcceptUnix()
		if err != nil {
			if !errors.Is(err, net.ErrClosed) {
				s.log.Warn("local API accept", "error", err)
			}
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		cn := newConn(s, c)
		s.conns[cn] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			cn.serve()
		}()
	}
}

// Close stops accepting, aborts every connection's operations, unmaps
// their memory and waits for their goroutines. Safe to call twice.
func (s *Server) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	err := s.ln.Close()
	for _, c := range conns {
		c.shutdown()
	}
	s.wg.Wait()
	return err
}

// Live is what a server holds now, for leak checks: connections,
// goroutines serving them, and mapped regions (shared memory and CUDA IPC
// mappings; CUDAMappings counts the latter alone).
type Live struct {
	Conns, Goroutines, Regions int
	CUDAMappings               int
}

// Live returns what the server holds now.
func (s *Server) Live() Live {
	s.mu.Lock()
	n := len(s.conns)
	s.mu.Unlock()
	return Live{Conns: n, Goroutines: int(s.goCount.Load()), Regions: int(s.regCount.Load()), CUDAMappings: int(s.cudaMaps.Load())}
}

// RankStats are one connection's (one rank of one process group)
// operation statistics.
type RankStats struct {
	Job        string `json:"job"`
	Generation uint64 `json:"generation"`
	Group      string `json:"group"`
	Rank       int    `json:"rank"`
	GroupRank  int    `json:"group_rank"`
	Open       bool   `json:"open"`
	// Ops, Bytes (of the caller's buffers) and Errors by op kind
	// ("all_reduce", ...); LatencySeconds is the sum of request-to-reply
	// times and MaxLatencySeconds the longest.
	Ops               map[string]uint64  `json:"ops"`
	Bytes             map[string]uint64  `json:"bytes"`
	LatencySeconds    map[string]float64 `json:"latency_seconds"`
	MaxLatencySeconds map[string]float64 `json:"max_latency_seconds"`
	Errors            uint64             `json:"errors"`
}

// Snapshot returns the statistics of open connections and of the last
// Config.KeepStats ended ones.
func (s *Server) Snapshot() []RankStats {
	s.mu.Lock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	out := make([]RankStats, 0, len(conns)+len(s.ended))
	for _, st := range s.ended {
		out = append(out, *st)
	}
	s.mu.Unlock()
	for _, c := range conns {
		if st, ok := c.stats(); ok {
			out = append(out, st)
		}
	}
	return out
}

func (s *Server) attach(k groupKey) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.attached[k] || s.closed {
		return false
	}
	s.attached[k] = true
	return true
}

// ended records a connection's end.
func (s *Server) ended_(c *conn, k *groupKey) {
	st, ok := c.stats()
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	if k != nil {
		delete(s.attached, *k)
	}
	if ok {
		st.Open = false
		s.ended = append(s.ended, &st)
		if len(s.ended) > s.cfg.KeepStats {
			s.ended = s.ended[len(s.ended)-s.cfg.KeepStats:]
		}
	}
}

// errorStatus is the reply status of a failed operation.
func errorStatus(err error) uint8 {
	switch {
	case errors.Is(err, collective.ErrMismatch):
		return StatusMismatch
	case errors.Is(err, collective.ErrBadArgument), errors.Is(err, collective.ErrBadDType), errors.Is(err, collective.ErrBadOp), errors.Is(err, ErrBadRegion):
		return StatusBadRequest
	}
	return StatusFailed
}

// recvPacket reads one packet and the descriptors sent with it.
func recvPacket(c *net.UnixConn, buf, oob []byte) ([]byte, []int, error) {
	n, oobn, flags, _, err := c.ReadMsgUnix(buf, oob)
	if err != nil {
		return nil, nil, err
	}
	return checkPacket(buf, oob, n, oobn, flags)
}

var errEOF = errors.New("connection closed by the client")

// Environment variables through which an exec rank finds its agent's local
// API (set by the agent for every exec task).
const (
	// EnvSocket is the path of the agent's socket.
	EnvSocket = "GPUMESH_LOCAL_SOCKET"
	// EnvSecret is the task's secret (hex), valid for its job, generation
	// and rank only.
	EnvSecret = "GPUMESH_LOCAL_SECRET"
)
