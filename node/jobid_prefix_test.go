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

// A job's name is a prefix of its id: `job status NAME` works while one job
// has the name; with two it names both and says what to do, and `job stop
// NAME` (which wants the whole id) names the ids it may have meant.
func TestJobIDPrefixErrorsNameTheJobs(t *testing.T) {
	dc := startCluster(t, 1, nil)
	c := client(t, dc.Agents[0])
	spec := "name: twin\nranks: 1\nexec:\n  command: [sh, -c, 'exit 0']\n"
	a := submitJob(t, c, spec)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if resp, err := c.GetJob(ctx, &pb.GetJobRequest{Id: "twin"}); err != nil || resp.Job.Id != a {
		t.Fatalf("job status twin with one job twin: %v, %v", resp, err)
	}
	b := submitJob(t, c, spec)
	_, err := c.GetJob(ctx, &pb.GetJobRequest{Id: "twin"})
	if s, _ := status.FromError(err); s.Code() != codes.InvalidArgument || !strings.Contains(s.Message(), a) ||
		!strings.Contains(s.Message(), b) || !strings.Contains(s.Message(), "give more of the id") {
		t.Fatalf("job status twin with two jobs twin: %v", err)
	}
	_, err = c.StopJob(ctx, &pb.StopJobRequest{Id: "twin"})
	if s, _ := status.FromError(err); s.Code() != codes.NotFound || !strings.Contains(s.Message(), "did you mean") ||
		!strings.Contains(s.Message(), a) || !strings.Contains(s.Message(), b) {
		t.Fatalf("job stop twin: %v", err)
	}
	_, err = c.StopJob(ctx, &pb.StopJobRequest{Id: "nosuchjob"})
	if s, _ := status.FromError(err); s.Code() != codes.NotFound || strings.Contains(s.Message(), "did you mean") {
		t.Fatalf("job stop nosuchjob: %v", err)
	}
}
