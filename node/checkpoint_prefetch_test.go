package node

import (
	"bytes"
	"context"
	"io"
	"os"
	"path/filepath"
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
