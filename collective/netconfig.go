package collective

import (
	"crypto/tls"
	"fmt"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/experimental"
)

// Data-plane modes (NetConfig.DataPlane, --data-plane).
const (
	// DataPlaneTCP moves frames over TCP lanes set up through gRPC streams
	// (the default).
	DataPlaneTCP = "tcp"
	// DataPlaneGRPC moves frames over the gRPC streams themselves.
	DataPlaneGRPC = "grpc"
)

// NetConfig tunes NetTransport and its Service: the gRPC streams that set
// up every link (and carry its frames with DataPlaneGRPC) and the TCP lanes
// that carry the frames by default.
type NetConfig struct {
	// WindowBytes is the initial HTTP/2 flow-control window of each stream
	// and connection (it also turns off gRPC's BDP probing). Default 16 MiB.
	WindowBytes int32
	// ReadBufferBytes and WriteBufferBytes size each connection's socket
	// read buffer and write batching buffer. Default 256 KiB each.
	ReadBufferBytes  int
	WriteBufferBytes int
	// RankWait is how long an inbound stream waits for its receiving rank to
	// open its endpoint (ranks start at slightly different times).
	// Default 30 s.
	RankWait time.Duration
	// NoLocalShortcut makes ranks of this process (same address) talk over
	// TCP like remote ones instead of handing frames over in memory.
	NoLocalShortcut bool
	// CloseWait bounds how long closing an endpoint waits for peers to read
	// what it sent (they normally close at the same time). Default 2 s.
	CloseWait time.Duration
	// DialOptions are appended to the data plane's own (for example
	// transport credentials, which default to insecure).
	DialOptions []grpc.DialOption
	// DataPlane is DataPlaneTCP (frames on TCP lanes beside the gRPC
	// streams; see lane.go) or DataPlaneGRPC (frames on the gRPC streams).
	// Lanes are used only where the receiving Service serves them (its
	// port is wrapped by Service.Listener); otherwise a link stays on its
	// stream. Default DataPlaneTCP.
	DataPlane string
	// LaneSocketBuffer sets SO_SNDBUF/SO_RCVBUF of each lane in bytes
	// (the kernel doubles the figure and caps it at net.core.rmem_max and
	// wmem_max); 0 leaves them to the kernel's autotuning, which grows them
	// up to net.ipv4.tcp_rmem/tcp_wmem's maximum (4 to 32 MiB). Default
	// 512 KiB: enough for a flow's bandwidth-delay product inside a
	// placement group or availability zone, and it keeps the bytes in
	// flight in the CPU cache: autotuned, every flow's buffers grow to
	// several MiB and dozens of flows on one host no longer fit the cache
	// (bench/results/dataplane.md). Use 0 across regions or other long
	// paths.
	LaneSocketBuffer int
	// UnixLanes carries lanes between Services of one host (several
	// agents on one machine, both addresses loopback or the same host) over
	// a Unix stream socket instead of TCP: the same protocol at about half
	// the CPU per byte (lane_unix.go). A receiver with it offers its
	// socket; a sender with it uses an offered one. Default true.
	UnixLanes bool
	// LaneHandshakeTimeout bounds a lane's connection handshake (and how
	// long an accepted connection may take to say whether it is gRPC or a
	// lane). Default 10 s.
	LaneHandshakeTimeout time.Duration
	// LaneServerTLS and LaneClientTLS wrap lanes in TLS (both or neither).
	// Give the same configs as the node's gRPC credentials: a node whose
	// RPC port uses mutual TLS must set them (or use DataPlaneGRPC), or
	// its lanes would travel in plaintext.
	LaneServerTLS, LaneClientTLS *tls.Config
	// Logger receives structured logs; nil means none.
	Logger hclog.Logger
}

// DefaultNetConfig returns defaults tuned on loopback and 2 to 32 cores.
func DefaultNetConfig() NetConfig {
	return NetConfig{
		WindowBytes:      16 << 20,
		ReadBufferBytes:  256 << 10,
		WriteBufferBytes: 256 << 10,
		RankWait:         30 * time.Second,
		CloseWait:        2 * time.Second,
		DataPlane:        DataPlaneTCP,
		LaneSocketBuffer: 512 << 10,
		UnixLanes:        true,

		LaneHandshakeTimeout: 10 * time.Second,
	}
}

// Validate checks the configuration.
func (c NetConfig) Validate() error {
	switch {
	case c.WindowBytes < 64<<10:
		return fmt.Errorf("%w: data-plane config: window must be >= 64KiB, got %d", ErrBadArgument, c.WindowBytes)
	case c.ReadBufferBytes < 0 || c.WriteBufferBytes < 0:
		return fmt.Errorf("%w: data-plane config: buffer sizes must be >= 0", ErrBadArgument)
	case c.RankWait <= 0:
		return fmt.Errorf("%w: data-plane config: rank wait must be > 0, got %v", ErrBadArgument, c.RankWait)
	case c.CloseWait < 0:
		return fmt.Errorf("%w: data-plane config: close wait must be >= 0, got %v", ErrBadArgument, c.CloseWait)
	case c.DataPlane != DataPlaneTCP && c.DataPlane != DataPlaneGRPC:
		return fmt.Errorf("%w: data-plane config: data plane must be %q or %q, got %q", ErrBadArgument, DataPlaneTCP, DataPlaneGRPC, c.DataPlane)
	case c.LaneSocketBuffer < 0:
		return fmt.Errorf("%w: data-plane config: lane socket buffer must be >= 0 (0: kernel autotuning), got %d", ErrBadArgument, c.LaneSocketBuffer)
	case c.LaneHandshakeTimeout <= 0:
		return fmt.Errorf("%w: data-plane config: lane handshake timeout must be > 0, got %v", ErrBadArgument, c.LaneHandshakeTimeout)
	case (c.LaneServerTLS == nil) != (c.LaneClientTLS == nil):
		return fmt.Errorf("%w: data-plane config: give both lane TLS configs (server and client) or neither", ErrBadArgument)
	}
	return nil
}

// ServerOptions are the grpc.ServerOptions the data plane needs (windows,
// buffers, message size). A node that serves other services on the same
// *grpc.Server passes them to grpc.NewServer.
func ServerOptions(c NetConfig) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(c.WindowBytes),
		grpc.InitialConnWindowSize(c.WindowBytes),
		grpc.ReadBufferSize(c.ReadBufferBytes),
		grpc.WriteBufferSize(c.WriteBufferBytes),
		grpc.MaxRecvMsgSize(MaxFrameBytes + HeaderSize + 1024),
		experimental.BufferPool(sharedDirtyPool),
	}
}

func (c NetConfig) dialOptions() []grpc.DialOption {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(c.WindowBytes),
		grpc.WithInitialConnWindowSize(c.WindowBytes),
		grpc.WithReadBufferSize(c.ReadBufferBytes),
		grpc.WithWriteBufferSize(c.WriteBufferBytes),
		grpc.WithDisableRetry(),
		experimental.WithBufferPool(sharedDirtyPool),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
		// No replay buffer: gRPC would otherwise hold the first 256 KiB of a
		// stream for transparent retries, delaying SendDone.
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(MaxFrameBytes+HeaderSize+1024), grpc.CallContentSubtype(CodecName), grpc.MaxRetryRPCBufferSize(0)),
	}
	return append(opts, c.DialOptions...)
}
