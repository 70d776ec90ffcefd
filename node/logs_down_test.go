package node

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// Asking for the logs of a rank whose node is down names that node and
// says the logs come back with it, whatever gossip has noticed so far.
func TestLogsOfRankOnDownNodeNameTheNode(t *testing.T) {
	dc := startCluster(t, 3, nil)
	asked := follower(dc)
	c := client(t, asked)
	id := submitJob(t, c, "name: spread\nranks: 3\nplacement: spread\nexec:\n  command: [sh, -c, 'echo hello; sleep 60']\n")
	waitRanksRunning(t, c, id, 3)
	job := waitJob(t, c, id, 10*time.Second, func(*pb.GetJobResponse) bool { return true })
	var victim *Agent
	var rank *pb.Allocation
	for _, al := range job.Allocations {
		for _, a := range dc.Agents {
			if a.NodeID() == al.NodeId && a != asked && !a.IsLeader() {
				victim, rank = a, al
			}
		}
	}
	if victim == nil {
		t.Fatal("no rank on a node other than the asked one and the leader")
	}
	poll.Until(t, 10*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: rank.Rank})
		if err == nil {
			_, err = st.Recv()
		}
		return err
	})
	victim.Shutdown()

	check := func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: rank.Rank})
		if err == nil {
			_, err = st.Recv()
		}
		s, _ := status.FromError(err)
		if s.Code() != codes.Unavailable || !strings.Contains(s.Message(), "node "+victim.Name()) ||
			!strings.Contains(s.Message(), "come back with it") {
			t.Fatalf("logs of rank %d on the stopped node %s: %v", rank.Rank, victim.Name(), err)
		}
		found := false
		for _, d := range s.Details() {
			if info, ok := d.(*errdetails.ErrorInfo); ok && info.Reason == ReasonNodeDown && info.Metadata["node"] == victim.Name() {
				found = true
			}
		}
		if !found {
			t.Fatalf("no %s detail in %v", ReasonNodeDown, s.Details())
		}
	}
	check() // gossip may still call it alive: the dial fails
	poll.Until(t, 30*time.Second, func() error {
		for _, m := range asked.mesh.Members() {
			if m.Node != nil && m.Node.Id == victim.NodeID() && m.State == "alive" {
				return status.Error(codes.Unavailable, "still alive in gossip")
			}
		}
		return nil
	})
	check() // gossip knows it is gone: no address at all
}
