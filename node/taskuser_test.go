package node

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/driver"
)

// Exec tasks run as the agent's --task-user, or as a job's exec.user when
// the agent allows it; any other user fails the rank with a message.
func TestExecTasksRunAsTaskUser(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("switching users needs root")
	}
	nobody, err1 := driver.LookupUser("nobody")
	daemon, err2 := driver.LookupUser("daemon")
	if err1 != nil || err2 != nil {
		t.Skip("needs the users nobody and daemon")
	}
	dc := startCluster(t, 1, func(i int, c *Config) {
		c.TaskUser = "nobody"
		c.TaskUsersAllowed = []string{"daemon"}
	})
	// The tasks reach their allocation directories through the test's
	// temporary folders (0700 by default).
	for p := dc.DataDir(); p != filepath.Clean(os.TempDir()); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	c := client(t, dc.Agents[0])
	run := func(user string) *pb.GetJobResponse {
		spec := "ranks: 1\nrestart: {attempts: 0}\nexec:\n  command: [sh, -c, 'echo uid=$(id -u) home=$HOME user=$USER']\n"
		if user != "" {
			spec += "  user: " + user + "\n"
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, spec)})
		if err != nil {
			t.Fatal(err)
		}
		return waitJob(t, c, resp.Id, 30*time.Second, func(r *pb.GetJobResponse) bool {
			return r.Job.Status == "complete" || r.Job.Status == "failed"
		})
	}
	for user, want := range map[string]*driver.TaskUser{"": nobody, "daemon": daemon} {
		r := run(user)
		if r.Job.Status != "complete" {
			t.Fatalf("user %q: job %s: %s %v", user, r.Job.Status, r.Job.StatusReason, r.Allocations)
		}
		out := readLogs(t, c, r.Job.Id, 0, 0)
		if !strings.Contains(out, "uid="+strconv.Itoa(int(want.UID))+" ") || !strings.Contains(out, "user="+want.Name) ||
			!strings.Contains(out, "home="+dc.DataDir()) {
			t.Fatalf("user %q: task said %q, want uid %d, user %s and a home in the data dir", user, out, want.UID, want.Name)
		}
	}
	r := run("root")
	if r.Job.Status != "failed" || len(r.Allocations) == 0 || !strings.Contains(r.Allocations[0].Message, "--task-users-allowed") {
		t.Fatalf("a job asking for root: %s %v", r.Job.Status, r.Allocations)
	}
}
