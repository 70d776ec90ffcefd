package node

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// The agent's prefetch puts the part a rank will load (its own shard when
// the world size matches, else rank 0's) beside the rank, and writes its
// record last; without a checkpoint it records found=false.
func TestPrefetchCheckpointFetchesThePartARankLoads(t *testing.T) {
	srv := s3test.NewServer(t, "ckpt")
	env := []string{"GPUMESH_S3_ENDPOINT=" + srv.URL, "AWS_ACCESS_KEY_ID=test", "AWS_SECRET_ACCESS_KEY=test", "AWS_REGION=us-east-1"}
	spec := &pb.JobSpec{Checkpoint: &pb.CheckpointSpec{Uri: "s3://ckpt/job"}}
	ctx := context.Background()
	logger := hclog.NewNullLogger()

	empty := t.TempDir()
	if rec := prefetchCheckpoint(ctx, spec, env, 0, 2, empty, logger); rec.Found || rec.Error != "" {
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
		dir := t.TempDir()
		rec := prefetchCheckpoint(ctx, spec, env, tc.rank, tc.world, dir, logger)
		if !rec.Found || rec.Step != 42 || rec.Part != tc.part || rec.Error != "" {
			t.Fatalf("rank %d of %d: %+v", tc.rank, tc.world, rec)
		}
		got, err := os.ReadFile(filepath.Join(dir, rec.File))
		if err != nil || !bytes.Equal(got, shards[tc.part]) {
			t.Fatalf("rank %d of %d: prefetched copy differs from part %d (%v)", tc.rank, tc.world, tc.part, err)
		}
		var onDisk PrefetchRecord
		b, err := os.ReadFile(filepath.Join(dir, prefetchRecord))
		if err != nil || json.Unmarshal(b, &onDisk) != nil || onDisk != rec {
			t.Fatalf("record on disk %s (%v), want %+v", b, err, rec)
		}
	}

	// A store it cannot reach is recorded, not fatal.
	bad := &pb.JobSpec{Checkpoint: &pb.CheckpointSpec{Uri: "s3://missing-bucket/x"}}
	if rec := prefetchCheckpoint(ctx, bad, env, 0, 1, t.TempDir(), logger); rec.Found || rec.Error == "" {
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
