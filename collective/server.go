package collective

import (
	"fmt"
	"net"
	"sync"

	"google.golang.org/grpc"
)

// Server is a standalone data-plane server (benchmarks, tests, and
// processes that serve no other gRPC service).
type Server struct {
	gs   *grpc.Server
	lis  net.Listener
	svc  *Service
	wg   sync.WaitGroup
	tr   *NetTransport
	once sync.Once
}

// Listen starts a data-plane server on addr ("127.0.0.1:0" for a free port).
func Listen(addr string, cfg NetConfig) (*Server, error) {
	svc, err := NewService(cfg)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("collective: listen on %s: %w", addr, err)
	}
	if cfg.DataPlane == DataPlaneTCP {
		lis = svc.Listener(lis) // lanes share the port
	}
	gs := grpc.NewServer(ServerOptions(cfg)...)
	svc.Register(gs)
	s := &Server{gs: gs, lis: lis, svc: svc, tr: NewNetTransport(svc)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = gs.Serve(lis)
	}()
	return s, nil
}

// Addr is the listening address ("host:port").
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Service returns the server's data-plane service.
func (s *Server) Service() *Service { return s.svc }

// Transport returns a transport whose inbound side is this server.
func (s *Server) Transport() *NetTransport { return s.tr }

// Close stops the server: open streams and the lanes of its endpoints are
// cut, as if the node went away. Safe to call twice.
func (s *Server) Close() {
	s.once.Do(func() {
		s.gs.Stop()
		s.wg.Wait()
		s.svc.mu.Lock()
		eps := make([]*netEndpoint, 0, len(s.svc.eps))
		for _, ep := range s.svc.eps {
			eps = append(eps, ep)
		}
		s.svc.mu.Unlock()
		for _, ep := range eps {
			ep.shutLanes()
		}
	})
}
