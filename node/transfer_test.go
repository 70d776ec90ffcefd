package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// `raft transfer-leadership --to NODE` naming the leader says so and what
// to do, instead of Raft's "cannot transfer leadership to itself".
func TestTransferLeadershipToTheLeaderSaysSo(t *testing.T) {
	dc := startCluster(t, 1, nil)
	a := dc.Agents[0]
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	_, err := client(t, a).TransferLeadership(ctx, &pb.TransferLeadershipRequest{To: a.Name()})
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), "node "+a.Name()) ||
		!strings.Contains(s.Message(), "is the leader already") {
		t.Fatalf("transfer to the leader %s: %v", a.Name(), err)
	}
}
