package node

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/localapi"
)

// The agent's prefetch fetches the part a rank will load (its own shard
// when the world size matches, else rank 0's) and Open hands that copy to
// the rank; a part it did not prefetch is fetched when asked for; without
// a checkpoint it records found=false.
func TestPrefetchCheckpointFetchesThePartARankLoads(t *testing.T) {
	srv := s3test.NewServer(t, "ckpt")
	env := []string{"GPUMESH_S3_ENDPOINT=" + srv.URL, "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_REGION=us-east-1"}
	spec := &pb.JobSpec{Checkpoint: &pb.CheckpointSpec{Uri: "s3://ckpt/job"}}
	ctx := context.Background()
	svc := &ckptService{log: hclog.NewNullLogger(), tasks: map[localapi.RankID]*ckptTask{}}

	empty := svc.add(localapi.RankID{Job: "j", Generation: 1, Rank: 0}, spec, env, t.TempDir())
	if rec := empty.prefetch(ctx, 0, 2); rec.Found || rec.Error != "" {
		t.Fatalf("empty store: %+v", rec)
	}

	c, err := checkpoint.New(srv.Store(t, "ckpt", "job", 0), checkpoint.Config{})
	if err != nil {
		t.Fatal(err)
	}
	shards := [][]byte{bytes.Repeat([]byte("a"), 3<<20), bytes.Repeat([]byte("b"), 1000)}
	m := checkpoint.Manifest{Step: 42, WorldSize: 2}
	for r, b := range shards {
		p, err := c.PutPart(ctx, 42, r, bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		m.Parts = append(m.Parts, p)
	}
	if err := c.Commit(ctx, m); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ rank, world, part int }{{1, 2, 1}, {0, 2, 0}, {2, 3, 0}} {
		id := localapi.RankID{Job: "j", Generation: 2, Rank: tc.rank}
		task := svc.add(id, spec, env, t.TempDir())
		rec := task.prefetch(ctx, tc.rank, tc.world)
		if !rec.Found || rec.Step != 42 || rec.Part != tc.part || rec.Error != "" {
			t.Fatalf("rank %d of %d: %+v", tc.rank, tc.world, rec)
		}
		for _, ask := range []int{-1, 1 - tc.part} {
			o, err := svc.Open(ctx, id, -1, ask, tc.world)
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(o.File)
			o.File.Close()
			want := tc.part
			if ask >= 0 {
				want = ask
			}
			if err != nil || o.Part != want || !bytes.Equal(got, shards[want]) || o.Prefetched != (ask < 0) {
				t.Fatalf("rank %d of %d asking for part %d: got part %d (prefetched %v, %v), want part %d", tc.rank, tc.world, ask, o.Part, o.Prefetched, err, want)
			}
		}
		svc.remove(id, task)
	}

	// A store it cannot reach is recorded, not fatal.
	bad := &pb.JobSpec{Checkpoint: &pb.CheckpointSpec{Uri: "s3://missing-bucket/x"}}
	if rec := svc.add(localapi.RankID{Job: "k", Generation: 1}, bad, env, t.TempDir()).prefetch(ctx, 0, 1); rec.Found || rec.Error == "" {
		t.Fatalf("missing bucket: %+v", rec)
	}
}

func TestReadCheckpointProgress(t *testing.T) {
	dir := t.TempDir()
	if readCheckpointProgress(dir) != nil || readCheckpointProgress("") != nil {
		t.Fatal("progress without a file")
	}
	if err := os.WriteFile(filepath.Join(dir, checkpointProgressFile), []byte(`{"resumed_step": 9, "last_step": 13}`), 0o644); err != nil {
		t.Fatal(err)
	}
	p := readCheckpointProgress(dir)
	if p["resumed_step"] != float64(9) || p["last_step"] != float64(13) {
		t.Fatalf("progress %v", p)
	}
	if err := os.WriteFile(filepath.Join(dir, checkpointProgressFile), []byte(`{torn`), 0o644); err != nil {
		t.Fatal(err)
	}
	if readCheckpointProgress(dir) != nil {
		t.Fatal("a torn file gave progress")
	}
}

// A rank checks, before it reads or writes anything, that the newest
// checkpoint under its job's URI is its own: one of an earlier submission
// of the same name resumes; one of another job is refused (prefetch,
// latest, open, create and commit), unless checkpoint.resume_from names
// that job; one that names no job (an old manifest) resumes with a
// warning. Through a directory and S3.
func TestCheckpointOfAnotherJobIsRefused(t *testing.T) {
	srv := s3test.NewServer(t, "ckpt")
	s3env := []string{"GPUMESH_S3_ENDPOINT=" + srv.URL, "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_REGION=us-east-1"}
	for name, uri := range map[string]string{"file": "file://" + filepath.Join(t.TempDir(), "store"), "s3": "s3://ckpt/shared"} {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			svc := &ckptService{log: hclog.NewNullLogger(), tasks: map[localapi.RankID]*ckptTask{}}
			gen := uint64(0)
			start := func(job, id, resumeFrom string) (localapi.RankID, *ckptTask, PrefetchRecord) {
				gen++
				spec := &pb.JobSpec{Name: job, Checkpoint: &pb.CheckpointSpec{Uri: uri, ResumeFrom: resumeFrom}}
				r := localapi.RankID{Job: id, Generation: gen}
				task := svc.add(r, spec, s3env, t.TempDir())
				rec := task.prefetch(ctx, 0, 1)
				t.Cleanup(func() { svc.remove(r, task) })
				return r, task, rec
			}
			save := func(r localapi.RankID, step int64) error {
				p, err := svc.CreatePart(ctx, r, step)
				if err != nil {
					return err
				}
				if _, err := p.File().Write([]byte("state")); err != nil {
					t.Fatal(err)
				}
				part, err := p.Commit(ctx)
				if err != nil {
					t.Fatal(err)
				}
				return svc.Commit(ctx, r, checkpoint.Manifest{Step: step, WorldSize: 1, Parts: []checkpoint.Part{part}})
			}

			// The first job saves; its manifest names it.
			a, _, rec := start("train", "train-0000000a", "")
			if rec.Found || rec.Error != "" {
				t.Fatalf("empty store: %+v", rec)
			}
			if err := save(a, 5); err != nil {
				t.Fatal(err)
			}
			if m, err := svc.Latest(ctx, a); err != nil || m.JobName != "train" || m.Job != "train-0000000a" {
				t.Fatalf("manifest %+v, %v: does not name the job", m, err)
			}

			// The same job submitted again resumes.
			again, _, rec := start("train", "train-0000000b", "")
			if !rec.Found || rec.Step != 5 || rec.Error != "" || rec.Warning != "" {
				t.Fatalf("resubmitted job: %+v", rec)
			}
			if err := save(again, 10); err != nil {
				t.Fatal(err)
			}

			// Another job is refused everything, and the store is untouched.
			other, task, rec := start("eval", "eval-0000000c", "")
			if rec.Found || !strings.Contains(rec.Error, `written by job "train" (ID train-0000000b)`) || !strings.Contains(rec.Error, `this is job "eval" (ID eval-0000000c)`) ||
				!strings.Contains(rec.Error, "resume_from: train") || !strings.Contains(rec.Error, uri) {
				t.Fatalf("another job's prefetch: %+v", rec)
			}
			if err := task.refusal(); !errors.Is(err, checkpoint.ErrOtherJob) {
				t.Fatalf("refusal %v", err)
			}
			if _, err := svc.Latest(ctx, other); !errors.Is(err, checkpoint.ErrOtherJob) {
				t.Fatalf("latest: %v", err)
			}
			if _, err := svc.Open(ctx, other, -1, -1, 1); !errors.Is(err, checkpoint.ErrOtherJob) {
				t.Fatalf("open: %v", err)
			}
			if err := save(other, 11); !errors.Is(err, checkpoint.ErrOtherJob) {
				t.Fatalf("save: %v", err)
			}
			if m, err := svc.Latest(ctx, again); err != nil || m.Step != 10 || m.JobName != "train" {
				t.Fatalf("after the refused job: %+v, %v", m, err)
			}

			// Asked to, it continues from them, and its own saves name it.
			adopt, _, rec := start("eval", "eval-0000000d", "train")
			if !rec.Found || rec.Step != 10 || rec.Error != "" {
				t.Fatalf("resume_from: %+v", rec)
			}
			if err := save(adopt, 12); err != nil {
				t.Fatal(err)
			}

			// A manifest that names no job (written before names were
			// recorded) is used, with a warning.
			st, err := checkpoint.Open(ctx, uri, s3ConfigFromEnv(s3env))
			if err != nil {
				t.Fatal(err)
			}
			c, err := checkpoint.New(st, checkpoint.Config{Keep: 10})
			if err != nil {
				t.Fatal(err)
			}
			p, err := c.PutPart(ctx, 20, 0, bytes.NewReader([]byte("old")))
			if err != nil {
				t.Fatal(err)
			}
			if err := c.Commit(ctx, checkpoint.Manifest{Step: 20, WorldSize: 1, Parts: []checkpoint.Part{p}, Job: "old-0000000e", Generation: 1}); err != nil {
				t.Fatal(err)
			}
			_, _, rec = start("train", "train-0000000f", "")
			if !rec.Found || rec.Step != 20 || rec.Error != "" || !strings.Contains(rec.Warning, "names no job") {
				t.Fatalf("old manifest: %+v", rec)
			}
		})
	}
}
