package controlplane

import (
	"fmt"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/procs"
)

// startCluster starts three agent processes on 127.0.0.2-4 that join each
// other, and returns them with a Control client for each.
func startCluster(b *testing.B, extra ...string) ([]*procs.Agent, []pb.ControlClient) {
	dir := b.TempDir()
	var as []*procs.Agent
	for i := 0; i < 3; i++ {
		args := append([]string{"--bootstrap-expect", "3", "--log-level", "warn"}, extra...)
		as = append(as, procs.NewAgent(b, dir, fmt.Sprintf("agent-%d", i+1), fmt.Sprintf("127.0.0.%d", i+2), args...))
	}
	procs.StartJoined(as)
	var clients []pb.ControlClient
	for _, a := range as {
		conn, err := grpc.NewClient(a.RPCAddr(), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { conn.Close() })
		clients = append(clients, pb.NewControlClient(conn))
	}
	return as, clients
}
