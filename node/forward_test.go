package node

import (
	"context"
	"strconv"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// A forwarded write that reaches the leader after its caller's deadline
// (held up in a partition, delivered by TCP once it heals) is refused and
// not committed: gRPC's own deadline is the time left, counted again from
// arrival, so only the absolute deadline the first agent sent can end it.
// One that arrives in time is served.
func TestForwardedWriteAfterCallersDeadlineIsRefused(t *testing.T) {
	dc := startCluster(t, 1, nil)
	c := client(t, dc.Leader())
	spec := mustSpec(t, "name: late\nranks: 1\nexec:\n  command: [\"true\"]\n")
	forwarded := func(id string, notAfter time.Time) error {
		md := metadata.Pairs(hopsKey, "1", notAfterKey, strconv.FormatInt(notAfter.UnixNano(), 10))
		ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), md), 10*time.Second)
		defer cancel()
		_, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Id: id, Spec: spec})
		return err
	}
	err := forwarded("late-1", time.Now().Add(-time.Second))
	if status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("a forwarded submission past its caller's deadline: got %v, want DeadlineExceeded", err)
	}
	if err := forwarded("intime-1", time.Now().Add(10*time.Second)); err != nil {
		t.Fatalf("a forwarded submission within its deadline: %v", err)
	}
	// The one in time is committed; the late one is not.
	waitJob(t, c, "intime-1", 10*time.Second, func(*pb.GetJobResponse) bool { return true })
	if _, err := c.GetJob(context.Background(), &pb.GetJobRequest{Id: "late-1"}); status.Code(err) != codes.NotFound {
		t.Fatalf("the late submission: GetJob says %v, want NotFound", err)
	}
}
