package node

import (
	"fmt"

	"google.golang.org/grpc"

	"github.com/gpumesh/gpumesh/collective"
)

// dataPlane is this agent's share of the collectives: one service on the
// RPC port that carries every local rank's streams, and the transport
// local ranks use to reach their peers.
type dataPlane struct {
	cfg collective.GRPCConfig
	svc *collective.Service
	tr  collective.Transport // counted for /metrics (metrics.go)
}

// dataPlaneServerOptions tunes the shared gRPC server for tensor streams.
func dataPlaneServerOptions() []grpc.ServerOption {
	return collective.ServerOptions(collective.DefaultGRPCConfig())
}

func registerDataPlane(a *Agent) error {
	cfg := collective.DefaultGRPCConfig()
	cfg.Logger = a.logger.Named("dataplane")
	cfg.DialOptions = a.sec.dialOptions()
	svc, err := collective.NewService(cfg)
	if err != nil {
		return fmt.Errorf("data plane: %w", err)
	}
	svc.Register(a.grpc)
	a.data = &dataPlane{cfg: cfg, svc: svc, tr: collective.CountingTransport(collective.NewGRPCTransport(svc), dataPlaneCounters(a))}
	return nil
}

func closeDataPlane(a *Agent) {}

// collectiveConfig is the communicator configuration of this node.
func (a *Agent) collectiveConfig(channels int) collective.Config {
	c := collective.DefaultConfig()
	c.Timeout = a.cfg.CollectiveTimeout
	if channels > 0 {
		c.Channels = channels
	}
	return c
}
