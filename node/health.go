package node

import (
	"context"
	"time"

	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// healthEvery is how often the gRPC health statuses are recomputed.
const healthEvery = 200 * time.Millisecond

// needsLeader are the gRPC services that cannot answer without a Raft
// leader ("" is the server as a whole, what load balancers ask). Every
// other registered service (the data plane, reflection) serves regardless.
var needsLeader = map[string]bool{"": true, pb.Control_ServiceDesc.ServiceName: true}

// healthy is the one rule behind /v1/health and the gRPC health service:
// an agent is healthy when it is up and, if it holds Raft state, knows a
// leader. It also returns the leader's ID.
func (a *Agent) healthy() (ok bool, leader string) {
	if a.raft == nil {
		return true, ""
	}
	leader, _ = a.raft.Leader()
	return leader != "" || !a.raft.HasState(), leader
}

// updateHealth sets every registered service's gRPC health status.
func (a *Agent) updateHealth() {
	ok, _ := a.healthy()
	led := healthpb.HealthCheckResponse_SERVING
	if !ok {
		led = healthpb.HealthCheckResponse_NOT_SERVING
	}
	a.health.SetServingStatus("", led)
	for name := range a.grpc.GetServiceInfo() {
		if needsLeader[name] {
			a.health.SetServingStatus(name, led)
		} else {
			a.health.SetServingStatus(name, healthpb.HealthCheckResponse_SERVING)
		}
	}
}

// healthLoop keeps the gRPC health statuses in step with healthy.
func (a *Agent) healthLoop() {
	t := time.NewTicker(healthEvery)
	defer t.Stop()
	for {
		select {
		case <-a.ctx.Done():
			return
		case <-t.C:
			a.updateHealth()
		}
	}
}

// liveHealth answers Check from the agent's state at the moment of the
// call (Watch streams follow healthLoop's updates).
type liveHealth struct {
	*health.Server
	a *Agent
}

func (h liveHealth) Check(ctx context.Context, req *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	h.a.updateHealth()
	return h.Server.Check(ctx, req)
}
