package node

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// An exec job that keeps failing and restarting does not keep every
// generation: the leader purges its old ended allocations (consensus/gc.go)
// and every node removes their rank directories, while the job goes on
// restarting with its count intact.
func TestClusterRestartGCRemovesOldGenerations(t *testing.T) {
	dc := startCluster(t, 3, func(i int, c *Config) { c.JobGCAge = 2 * time.Second })
	c := client(t, follower(dc))
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t,
		"ranks: 3\nplacement: spread\nrestart: {attempts: 1000, delay: 1s}\nexec:\n  command: [\"sh\", \"-c\", \"exit 1\"]\n")})
	if err != nil {
		t.Fatal(err)
	}
	id := resp.Id
	genDirs := func(gen uint64) []string {
		var out []string
		for _, a := range dc.Agents {
			d := filepath.Join(mustAbs(a.cfg.DataDir), "alloc", id, strconv.FormatUint(gen, 10))
			if _, err := os.Stat(d); err == nil {
				out = append(out, d)
			}
		}
		return out
	}
	// Generation 1 left rank directories to purge: not necessarily 3, as
	// rank 0 fails at once and a node may be told to stop its rank before
	// it started it (CI at 19:03 never saw all 3 at once in 40 s).
	waitJob(t, c, id, 40*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Generation >= 1 && len(genDirs(1)) > 0 })
	final := waitJob(t, c, id, 60*time.Second, func(r *pb.GetJobResponse) bool { return r.Job.Generation >= 8 })
	poll.Until(t, 30*time.Second, func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		r, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
		if err != nil {
			return err
		}
		oldest := r.Job.Generation
		for _, al := range r.Allocations {
			oldest = min(oldest, al.Generation)
		}
		if oldest <= 2 {
			return fmt.Errorf("generation %d still in the state at generation %d (%d allocations)", oldest, r.Job.Generation, len(r.Allocations))
		}
		if left := genDirs(1); len(left) > 0 {
			return fmt.Errorf("generation 1 purged but its directories remain: %v", left)
		}
		// Per rank: the live or newest ones, the newest ended, the last
		// ended and AllocGCKeep (3) more at most.
		if len(r.Allocations) > 3*5 {
			return fmt.Errorf("%d allocations at generation %d", len(r.Allocations), r.Job.Generation)
		}
		return nil
	})
	r, err := c.GetJob(ctx, &pb.GetJobRequest{Id: id})
	if err != nil {
		t.Fatal(err)
	}
	// Every failure was counted: one restart per generation after the first.
	if r.Job.Restarts < final.Job.Restarts || r.Job.Restarts < int32(final.Job.Generation)-1 {
		t.Fatalf("restarts %d at generation %d (was %d at %d)", r.Job.Restarts, r.Job.Generation, final.Job.Restarts, final.Job.Generation)
	}
	if _, err := c.StopJob(ctx, &pb.StopJobRequest{Id: id}); err != nil {
		t.Fatal(err)
	}
}
