package node

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// A service replaces its replicas one at a time, each in a generation of
// its own: the logs of a replica, without a generation, are its newest
// replica's, whether or not it is in the job's newest generation.
func TestServiceLogsOfEveryReplica(t *testing.T) {
	dc := startCluster(t, 2, nil)
	c := client(t, dc.Agents[0])
	mark := filepath.Join(t.TempDir(), "failed-once")
	id := submitJob(t, c, fmt.Sprintf(`
name: logs
type: service
replicas: 2
restart: {delay: 1s}
exec:
  command: [sh, -c, 'if [ "$RANK" = 1 ] && [ ! -e %[1]s ]; then echo replica 1 fails; touch %[1]s; exit 1; fi; echo replica $RANK runs; exec sleep 60']
service:
  check: {type: tcp, interval: 1s, grace: 60s}
`, mark))
	// Replica 1's first run fails and is replaced in a later generation
	// than replica 0's.
	poll.Until(t, 60*time.Second, func() error {
		job := waitJob(t, c, id, 10*time.Second, func(*pb.GetJobResponse) bool { return true })
		for _, al := range job.Allocations {
			if al.Rank == 1 && al.Generation > 1 && al.ClientStatus == "running" {
				return nil
			}
		}
		return fmt.Errorf("replica 1 not replaced yet")
	})
	logs := func(rank int32) (string, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		st, err := c.Logs(ctx, &pb.LogsRequest{JobId: id, Rank: rank})
		if err != nil {
			return "", err
		}
		var b strings.Builder
		for {
			ch, err := st.Recv()
			if err == io.EOF {
				return b.String(), nil
			}
			if err != nil {
				return b.String(), err
			}
			b.Write(ch.Data)
		}
	}
	for rank, want := range []string{"replica 0 runs", "replica 1 runs"} {
		poll.Until(t, 20*time.Second, func() error {
			out, err := logs(int32(rank))
			if err != nil {
				return fmt.Errorf("logs of replica %d: %w", rank, err)
			}
			if !strings.Contains(out, want) {
				return fmt.Errorf("logs of replica %d: %q, want %q", rank, out, want)
			}
			return nil
		})
	}
}
