package node

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

func TestParseUIDRange(t *testing.T) {
	r, err := ParseUIDRange("2000000-2000009")
	if err != nil || r != (UIDRange{First: 2000000, Last: 2000009}) {
		t.Fatalf("got %v, %v", r, err)
	}
	for in, want := range map[string]string{
		"":                      "is not FIRST-LAST",
		"70000":                 "is not FIRST-LAST",
		"a-b":                   "is not FIRST-LAST",
		"2000009-2000000":       "empty",
		"1000-2000000":          "below 65536",
		"2000000-3000000000":    "2^31",
		"2000000--1":            "is not FIRST-LAST",
		"2000000-4294967296000": "is not FIRST-LAST",
	} {
		_, err := ParseUIDRange(in)
		if !errors.Is(err, ErrUIDRange) || !strings.Contains(err.Error(), want) {
			t.Errorf("ParseUIDRange(%q) = %v, want an ErrUIDRange saying %q", in, err, want)
		}
	}
	c := DefaultConfig()
	c.DataDir = t.TempDir()
	c.TaskUIDs = UIDRange{First: 10, Last: 20}
	if err := c.Validate(); err == nil || !strings.Contains(err.Error(), "--task-uid-range") {
		t.Fatalf("Validate with a range among system IDs: %v", err)
	}
}

// A job keeps its ID; two jobs never share one, even when their hashes
// collide in a tiny range; a full range is an error that says what to do;
// an ID is free again once its job's directories are gone.
func TestUIDPoolHandsEachJobItsOwnID(t *testing.T) {
	dir := t.TempDir()
	p := newUIDPool(dir, UIDRange{First: 2_000_000, Last: 2_000_001})
	mkJob := func(job string) {
		if err := os.MkdirAll(filepath.Join(dir, "alloc", job, "1", "0"), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mkJob("a")
	mkJob("b")
	a, err1 := p.forJob("a")
	b, err2 := p.forJob("b")
	a2, err3 := p.forJob("a")
	if err := errors.Join(err1, err2, err3); err != nil {
		t.Fatal(err)
	}
	if a == b || a != a2 || a < 2_000_000 || a > 2_000_001 || b < 2_000_000 || b > 2_000_001 {
		t.Fatalf("a=%d b=%d a again=%d: want two different IDs of the range, a's stable", a, b, a2)
	}
	if _, err := p.forJob("c"); !errors.Is(err, ErrUIDRange) || !strings.Contains(err.Error(), "--task-uid-range") {
		t.Fatalf("a third job in a range of two: %v", err)
	}
	if err := os.RemoveAll(filepath.Join(dir, "alloc", "a")); err != nil {
		t.Fatal(err)
	}
	c, err := p.forJob("c")
	if err != nil || c != a {
		t.Fatalf("after a's directories are gone, c got %d (%v), want a's %d", c, err, a)
	}
}

// An agent restart reads the IDs back from the allocation directories, so a
// new job never gets the ID of a job whose tasks are still running.
func TestUIDPoolReloadsFromDisk(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("giving directories to other IDs needs root")
	}
	dir := t.TempDir()
	rg := UIDRange{First: 2_000_000, Last: 2_000_001}
	p := newUIDPool(dir, rg)
	rank := filepath.Join(dir, "alloc", "old", "3", "1")
	if err := os.MkdirAll(rank, 0o755); err != nil {
		t.Fatal(err)
	}
	old, err := p.forJob("old")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(rank, 0, int(old)); err != nil { // as prepareUserDirs does
		t.Fatal(err)
	}
	restarted := newUIDPool(dir, rg)
	if got, err := restarted.forJob("old"); err != nil || got != old {
		t.Fatalf("after a restart the running job got %d (%v), want its %d", got, err, old)
	}
	mk := filepath.Join(dir, "alloc", "new", "1", "0")
	if err := os.MkdirAll(mk, 0o755); err != nil {
		t.Fatal(err)
	}
	again := newUIDPool(dir, rg)
	if got, err := again.forJob("new"); err != nil || got == old {
		t.Fatalf("a new job after a restart got %d (%v); %d belongs to a running job", got, err, old)
	}
}

// With --task-user=dynamic every job runs as an ID of its own, shared by its
// ranks on a node; another job can read neither its files nor its
// environment (which holds the local API's secret).
func TestDynamicTaskUsersIsolateJobs(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("switching users needs root")
	}
	rg := UIDRange{First: 2_100_000, Last: 2_100_999}
	dc := startCluster(t, 1, func(i int, c *Config) {
		c.TaskUser = DynamicTaskUser
		c.TaskUIDs = rg
		c.MaxRanksPerNode = 3 // the keeper's two ranks and the snoop
	})
	for p := dc.DataDir(); p != filepath.Clean(os.TempDir()); p = filepath.Dir(p) {
		if err := os.Chmod(p, 0o711); err != nil {
			t.Fatal(err)
		}
	}
	c := client(t, dc.Agents[0])
	data := mustAbs(dc.Agents[0].cfg.DataDir)
	submit := func(spec string) string {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		resp, err := c.SubmitJob(ctx, &pb.SubmitJobRequest{Spec: mustSpec(t, spec)})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Id
	}
	// A: two ranks that keep a secret in their directory and wait.
	a := submit("name: keeper\nranks: 2\nrestart: {attempts: 0}\nexec:\n  command: [sh, -c, 'cd \"$HOME\" && id -u > uid; echo topsecret > secret; echo $$ > pid; exec sleep 120']\n")
	var pidA, uidA0, uidA1 string
	poll.Until(t, 30*time.Second, func() error {
		var err error
		read := func(rank int, name string) string {
			b, e := os.ReadFile(filepath.Join(data, "alloc", a, "1", strconv.Itoa(rank), name))
			err = errors.Join(err, e)
			return strings.TrimSpace(string(b))
		}
		pidA, uidA0, uidA1 = read(0, "pid"), read(0, "uid"), read(1, "uid")
		if err == nil && (pidA == "" || uidA0 == "" || uidA1 == "") {
			err = errors.New("files still empty")
		}
		if err != nil {
			d := filepath.Join(data, "alloc", a, "1", "0")
			logs, _ := os.ReadFile(filepath.Join(d, "logs", "stderr.0"))
			var ls []string
			_ = filepath.Walk(filepath.Join(data, "alloc"), func(p string, fi os.FileInfo, _ error) error {
				if fi != nil {
					ls = append(ls, fmt.Sprintf("%s %v %v", p, fi.Mode(), fi.Sys()))
				}
				return nil
			})
			err = fmt.Errorf("%w (stderr of rank 0: %q) %s", err, logs, strings.Join(ls, "\n"))
		}
		return err
	})
	secret := filepath.Join(data, "alloc", a, "1", "0", "secret")
	// B: tries to read them.
	b := submit("name: snoop\nranks: 1\nrestart: {attempts: 0}\nexec:\n  command: [sh, -c, 'echo uid=$(id -u) tmp=$TMPDIR; cat " + secret + " && echo READ-FILE; cat /proc/" + pidA + "/environ && echo READ-ENV; ls " + filepath.Dir(secret) + " && echo LISTED; true']\n")
	r := waitJob(t, c, b, 30*time.Second, func(r *pb.GetJobResponse) bool {
		return r.Job.Status == "complete" || r.Job.Status == "failed"
	})
	out := readLogs(t, c, b, 0, 0)
	if r.Job.Status != "complete" {
		t.Fatalf("snoop job %s: %s\n%s", r.Job.Status, r.Job.StatusReason, out)
	}
	for _, leak := range []string{"READ-FILE", "READ-ENV", "LISTED", "topsecret"} {
		if strings.Contains(out, leak) {
			t.Errorf("job %s read job %s's %s:\n%s", b, a, leak, out)
		}
	}
	uidB, _, _ := strings.Cut(strings.TrimPrefix(strings.Fields(out)[0], "uid="), " ")
	inRange := func(s string) bool {
		n, err := strconv.ParseUint(s, 10, 32)
		return err == nil && uint32(n) >= rg.First && uint32(n) <= rg.Last
	}
	if uidA0 != uidA1 || uidA0 == uidB || !inRange(uidA0) || !inRange(uidB) {
		t.Fatalf("ranks of job A ran as %s and %s, job B as %s: want A's ranks to share an ID, B another, all in %s", uidA0, uidA1, uidB, rg)
	}
	if want := "tmp=" + filepath.Join(data, "alloc", b, "1", "0"); !strings.Contains(out, want) {
		t.Errorf("snoop's TMPDIR: want %s in %q", want, out)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.StopJob(ctx, &pb.StopJobRequest{Id: a}); err != nil {
		t.Fatal(err)
	}
}
