package node

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/checkpoint"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Prefetch: when a rank of a job with a checkpoint block starts, its agent
// fetches the part of the newest complete checkpoint that the rank will
// load, into the rank's allocation directory, while the rank's process
// starts (imports, process-group rendezvous). python/gpumesh/checkpoint.py
// waits for the record and loads the local copy when it is of the newest
// step. The record (prefetch.json) also ends up in the allocation's result.
const (
	// EnvCheckpointCache names the directory of the prefetched copy.
	EnvCheckpointCache = "GPUMESH_CHECKPOINT_CACHE"
	// prefetchRecord is written last, once the copy is complete or failed.
	prefetchRecord = "prefetch.json"
	cacheDirName   = "checkpoint-cache"
)

// PrefetchRecord is what prefetch.json holds.
type PrefetchRecord struct {
	// Found is false when the store holds no complete checkpoint.
	Found bool `json:"found"`
	// Step of the checkpoint fetched, and the rank whose part it is.
	Step int64 `json:"step"`
	Part int   `json:"part"`
	// File is the copy's name inside the cache directory.
	File    string  `json:"file,omitempty"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	// Error says why nothing was fetched; the rank then downloads itself.
	Error string `json:"error,omitempty"`
}

// checkpointCacheDir is a rank's prefetch directory.
func checkpointCacheDir(allocDir string) string { return filepath.Join(allocDir, cacheDirName) }

// envLookup finds a variable in an environment list (the last one wins, as
// BuildEnv's list holds each name once).
func envLookup(env []string, key string) string {
	v := ""
	for _, kv := range env {
		if k, val, ok := strings.Cut(kv, "="); ok && k == key {
			v = val
		}
	}
	return v
}

// s3ConfigFromEnv turns a task's environment into the S3 settings the rank
// itself would use through `gpumesh checkpoint` (see cmd/gpumesh).
func s3ConfigFromEnv(env []string) checkpoint.S3Config {
	cfg := checkpoint.S3Config{Endpoint: envLookup(env, "GPUMESH_S3_ENDPOINT"), Region: envLookup(env, "AWS_REGION")}
	if id, secret := envLookup(env, "AWS_ACCESS_KEY_ID"), envLookup(env, "AWS_SECRET_ACCESS_KEY"); id != "" && secret != "" {
		cfg.Credentials = credentials.NewStaticCredentialsProvider(id, secret, envLookup(env, "AWS_SESSION_TOKEN"))
	}
	return cfg
}

// prefetchCheckpoint fetches into dir the part of the newest checkpoint
// that a rank of a world will load (its own of a sharded checkpoint of the
// same world size, else rank 0's) and writes the record last. It never
// fails the rank: errors are recorded and logged.
func prefetchCheckpoint(ctx context.Context, spec *pb.JobSpec, env []string, rank, world int, dir string, logger hclog.Logger) PrefetchRecord {
	start := time.Now()
	rec, err := fetchNewest(ctx, spec, env, rank, world, dir)
	rec.Seconds = time.Since(start).Seconds()
	if err != nil {
		rec = PrefetchRecord{Error: err.Error(), Seconds: rec.Seconds}
		logger.Warn("checkpoint prefetch failed; the rank will download it itself", "error", err)
	} else if rec.Found {
		logger.Info("checkpoint prefetched", "step", rec.Step, "part", rec.Part, "bytes", rec.Bytes, "seconds", rec.Seconds)
	}
	b, _ := json.Marshal(rec)
	if err := os.MkdirAll(dir, 0o755); err == nil {
		tmp := filepath.Join(dir, prefetchRecord+".tmp")
		if os.WriteFile(tmp, b, 0o644) == nil {
			_ = os.Rename(tmp, filepath.Join(dir, prefetchRecord))
		}
	}
	return rec
}

func fetchNewest(ctx context.Context, spec *pb.JobSpec, env []string, rank, world int, dir string) (PrefetchRecord, error) {
	st, err := checkpoint.Open(ctx, spec.GetCheckpoint().GetUri(), s3ConfigFromEnv(env))
	if err != nil {
		return PrefetchRecord{}, err
	}
	c, err := checkpoint.New(st, checkpoint.Config{})
	if err != nil {
		return PrefetchRecord{}, err
	}
	m, err := c.Latest(ctx)
	if errors.Is(err, checkpoint.ErrNoCheckpoint) {
		return PrefetchRecord{}, nil
	}
	if err != nil {
		return PrefetchRecord{}, err
	}
	part := 0
	if len(m.Parts) > 1 && m.WorldSize == world {
		part = rank
	}
	p, ok := m.Part(part)
	if !ok {
		return PrefetchRecord{}, fmt.Errorf("checkpoint of step %d has no part %d", m.Step, part)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return PrefetchRecord{}, err
	}
	name := fmt.Sprintf("step-%d-part-%d", m.Step, part)
	f, err := os.Create(filepath.Join(dir, name+".partial"))
	if err != nil {
		return PrefetchRecord{}, err
	}
	err = c.GetPart(ctx, m, part, f)
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), filepath.Join(dir, name))
	}
	if err != nil {
		os.Remove(f.Name())
		return PrefetchRecord{}, err
	}
	return PrefetchRecord{Found: true, Step: m.Step, Part: part, File: name, Bytes: p.Size}, nil
}

// report is the record as the allocation's result shows it.
func (p *PrefetchRecord) report() map[string]any {
	m := map[string]any{"found": p.Found, "seconds": p.Seconds}
	if p.Found {
		m["step"], m["part"], m["bytes"] = float64(p.Step), float64(p.Part), float64(p.Bytes)
	}
	if p.Error != "" {
		m["error"] = p.Error
	}
	return m
}

// startPrefetch fetches the newest checkpoint for a just started rank, in
// the runner's tracked goroutines; it gives up when the rank ends.
func (r *runner) startPrefetch(t *execTask, spec *pb.JobSpec, env []string, al *pb.Allocation, allocDir string) {
	ctx, cancel := context.WithCancel(r.ctx)
	r.goFunc(func() {
		defer cancel()
		go func() {
			select {
			case <-t.Done():
				cancel()
			case <-ctx.Done():
			}
		}()
		logger := r.logger.With("job", al.JobId, "generation", al.Generation, "rank", al.Rank)
		rec := prefetchCheckpoint(ctx, spec, env, int(al.Rank), int(al.WorldSize), checkpointCacheDir(allocDir), logger)
		t.prefetch.Store(&rec)
	})
}

// checkpointProgressFile is where python/gpumesh/checkpoint.py records the
// step a rank resumed from and the last step it finished.
const checkpointProgressFile = "checkpoint-progress.json"

// readCheckpointProgress returns a rank's recorded progress
// (resumed_step, last_step), or nil when there is none. The steps a crash
// lost are the previous generation's last_step minus the next one's
// resumed_step.
func readCheckpointProgress(allocDir string) map[string]any {
	if allocDir == "" {
		return nil
	}
	b, err := os.ReadFile(filepath.Join(allocDir, checkpointProgressFile))
	if err != nil {
		return nil
	}
	var p struct {
		Resumed *int64 `json:"resumed_step"`
		Last    *int64 `json:"last_step"`
	}
	if json.Unmarshal(b, &p) != nil {
		return nil
	}
	m := map[string]any{}
	if p.Resumed != nil {
		m["resumed_step"] = float64(*p.Resumed)
	}
	if p.Last != nil {
		m["last_step"] = float64(*p.Last)
	}
	if len(m) == 0 {
		return nil
	}
	return m
}
