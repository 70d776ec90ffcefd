package node

import (
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"

	"github.com/gpumesh/gpumesh/checkpoint"
	pb "github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/node/localapi"
)

// Prefetch: when a rank of a job with a checkpoint block starts, its agent
// fetches the part of the newest complete checkpoint that the rank will
// load while the rank's process starts (imports, process-group
// rendezvous), and hands it over when the rank asks (checkpoint_local.go).
// The record of how it went ends up in the allocation's result.

// cacheDirName is the directory, in the rank's allocation directory, of
// downloaded copies and of S3 spool files.
const cacheDirName = "checkpoint-cache"

// PrefetchRecord says how a rank's prefetch went (the allocation's result
// shows it).
type PrefetchRecord struct {
	// Found is false when the store holds no complete checkpoint.
	Found bool `json:"found"`
	// Step of the checkpoint fetched, and the rank whose part it is.
	Step    int64   `json:"step"`
	Part    int     `json:"part"`
	Bytes   int64   `json:"bytes"`
	Seconds float64 `json:"seconds"`
	// Error says why nothing was fetched; the rank then downloads itself.
	Error string `json:"error,omitempty"`
	// Warning says the newest checkpoint names no job (see
	// checkpoint.Unowned): the job resumed from it, which may be a mistake.
	Warning string `json:"warning,omitempty"`
}

// checkpointCacheDir is a rank's directory of downloaded copies and spool
// files.
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
	cfg := checkpoint.S3Config{Endpoint: envLookup(env, EnvS3Endpoint), Region: envLookup(env, "AWS_REGION")}
	if id, secret := envLookup(env, "AWS_ACCESS_KEY_ID"), envLookup(env, "AWS_SECRET_ACCESS_KEY"); id != "" && secret != "" {
		cfg.Credentials = credentials.NewStaticCredentialsProvider(id, secret, envLookup(env, "AWS_SESSION_TOKEN"))
	}
	return cfg
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
	if p.Warning != "" {
		m["warning"] = p.Warning
	}
	return m
}

// startPrefetch registers a just started rank with the checkpoint service
// and fetches the newest checkpoint for it, in the runner's tracked
// goroutines; it gives up when the rank ends, and the rank is forgotten
// then. Without the local API it only checks the owner (checkOwnerOnly).
func (r *runner) startPrefetch(t *execTask, spec *pb.JobSpec, env []string, al *pb.Allocation, allocDir string) {
	id := localapi.RankID{Job: al.JobId, Generation: al.Generation, Rank: int(al.Rank)}
	if r.a.local == nil {
		r.checkOwnerOnly(t, id, spec, env, allocDir)
		return
	}
	ct := r.a.local.ckpt.add(id, spec, env, allocDir)
	t.ckpt = ct
	r.goFunc(func() {
		ctx, cancel := r.taskContext(t)
		defer cancel()
		rec := ct.prefetch(ctx, int(al.Rank), int(al.WorldSize))
		t.prefetch.Store(&rec)
		if err := ct.refusal(); err != nil {
			// Another job's checkpoints: the rank must not start from
			// them (its requests are refused); its start fails.
			t.Stop("its checkpoint.uri holds another job's checkpoints", time.Time{})
		}
		select {
		case <-t.Done():
		case <-r.ctx.Done():
		}
		r.a.local.ckpt.remove(id, ct)
	})
}

// checkOwnerOnly is startPrefetch for an agent without its local API: the
// rank's gpumesh.checkpoint runs `gpumesh checkpoint` itself, which refuses
// another job's checkpoints, but only the agent can make that the rank's
// typed start failure (no restarts, the refusal in the job's status). So
// the agent makes the same owner check from the job's spec and the task's
// environment and stops a refused rank; a store it cannot read is left to
// the rank.
func (r *runner) checkOwnerOnly(t *execTask, id localapi.RankID, spec *pb.JobSpec, env []string, allocDir string) {
	ct := newCkptService(r.a).newTask(id, spec, env, allocDir)
	t.ckpt = ct
	r.goFunc(func() {
		ctx, cancel := r.taskContext(t)
		defer cancel()
		if _, err := ct.checkpoints(ctx); err != nil && ct.refusal() != nil {
			t.Stop("its checkpoint.uri holds another job's checkpoints", time.Time{})
		}
	})
}

// taskContext returns a context of the runner's that also ends when the
// task does; the caller must call cancel.
func (r *runner) taskContext(t *execTask) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancel(r.ctx)
	go func() {
		select {
		case <-t.Done():
			cancel()
		case <-ctx.Done():
		}
	}()
	return ctx, cancel
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
