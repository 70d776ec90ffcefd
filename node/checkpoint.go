package node

import (
	"os"
	"strconv"
	"strings"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

// Variables an exec task of a job with a checkpoint block gets, read by
// python/gpumesh/checkpoint.py and `gpumesh checkpoint`.
const (
	// EnvCheckpointURI is the job spec's checkpoint.uri.
	EnvCheckpointURI = "GPUMESH_CHECKPOINT_URI"
	// EnvCheckpointKeep is checkpoint.keep.
	EnvCheckpointKeep = "GPUMESH_CHECKPOINT_KEEP"
	// EnvCheckpointEvery is checkpoint.every (0: save only when preempted).
	EnvCheckpointEvery = "GPUMESH_CHECKPOINT_EVERY"
	// EnvCheckpointResumeFrom is checkpoint.resume_from.
	EnvCheckpointResumeFrom = "GPUMESH_CHECKPOINT_RESUME_FROM"
	// EnvJobName is the job's name, which `gpumesh checkpoint commit`
	// records in the manifest and `latest` and `get` check
	// (checkpoint.Owner).
	EnvJobName = "GPUMESH_JOB_NAME"
	// EnvBin is the agent's own binary, which the Python side runs for
	// `gpumesh checkpoint put|commit|latest|get` when the agent's local API
	// is off (it otherwise asks the agent on its socket).
	EnvBin = "GPUMESH_BIN"
	// EnvS3Endpoint is the S3 endpoint URL of an S3-compatible store
	// (path-style), from the agent's or the job's environment: read by the
	// agent for its ranks' stores and by `gpumesh checkpoint`.
	EnvS3Endpoint = "GPUMESH_S3_ENDPOINT"
)

// checkpointEnv returns the checkpoint variables of a job's tasks, leaving
// out any the environment env already sets.
func checkpointEnv(spec *pb.JobSpec, env []string) []string {
	c := spec.GetCheckpoint()
	if c == nil {
		return nil
	}
	set := map[string]bool{}
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		set[k] = true
	}
	var out []string
	add := func(k, v string) {
		if !set[k] && v != "" {
			out = append(out, k+"="+v)
		}
	}
	add(EnvCheckpointURI, c.GetUri())
	add(EnvCheckpointKeep, strconv.Itoa(int(c.GetKeep())))
	add(EnvCheckpointEvery, strconv.Itoa(int(c.GetEvery())))
	add(EnvCheckpointResumeFrom, c.GetResumeFrom())
	add(EnvJobName, spec.GetName())
	if exe, err := os.Executable(); err == nil {
		add(EnvBin, exe)
	}
	return out
}
