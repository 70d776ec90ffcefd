package node

import (
	"fmt"

	"google.golang.org/grpc"

	"github.com/gpumesh/gpumesh/collective"
)

// dataPlane is this agent's share of the collectives: one service on the
// RPC port that carries every local rank's streams (and, with --data-plane
// tcp, their TCP lanes on the same port), and the transport local ranks
// use to reach their peers.
type dataPlane struct {
	cfg collective.NetConfig
	svc *collective.Service
	tr  collective.Transport // counted for /metrics (metrics.go)
}

// dataPlaneServerOptions tunes the shared gRPC server for tensor streams.
func dataPlaneServerOptions() []grpc.ServerOption {
	return collective.ServerOptions(collective.DefaultNetConfig())
}

func registerDataPlane(a *Agent) error {
	cfg := collective.DefaultNetConfig()
	cfg.Logger = a.logger.Named("dataplane")
	cfg.DialOptions = a.sec.dialOptions()
	cfg.LaneSocketBuffer = a.cfg.LaneSocketBuffer
	if a.cfg.DataPlane == collective.DataPlaneGRPC {
		cfg.DataPlane = collective.DataPlaneGRPC
	}
	if a.sec != nil && a.sec.server != nil {
		// Lanes get the same mutual TLS as the RPC port, so they are no
		// weaker than the gRPC streams they replace; the one-time token
		// ties each to a stream the gRPC server accepted.
		cfg.LaneServerTLS, cfg.LaneClientTLS = a.sec.server, a.sec.client
	}
	svc, err := collective.NewService(cfg)
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	svc.Register(a.grpc)
	if cfg.DataPlane == collective.DataPlaneTCP {
		// One port: the listener hands lane connections to the service
		// and everything else (HTTP/2, TLS) to gRPC.
		a.rpcLn = svc.Listener(a.rpcLn)
	}
	a.data = &dataPlane{cfg: cfg, svc: svc, tr: collective.CountingTransport(collective.NewNetTransport(svc), a.ops.counters)}
	return nil
}

// closeDataPlane closes the RPC listener (again: gRPC closes what it
// serves; this also covers an agent that failed before serving), which
// ends the lane listener's goroutines.
func closeDataPlane(a *Agent) {
	if a.rpcLn != nil {
		_ = a.rpcLn.Close()
	}
}

// collectiveConfig is the communicator configuration of this node.
func (a *Agent) collectiveConfig(channels int) collective.Config {
	c := collective.DefaultConfig()
	c.Timeout = a.cfg.CollectiveTimeout
	if channels > 0 {
		c.Channels = channels
	}
	return c
}
