//go:build linux

package localapi

import (
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
	"github.com/gpumesh/gpumesh/collective"
)

// The Python module saves and loads through the agent's checkpoint
// connection into S3 (gofakes3 through the SDK): the rank writes a spool
// file the agent uploads, bodies too large for a packet travel in memfds,
// and loads are mapped views of the file the agent hands over.
func TestPythonCheckpointThroughAgent(t *testing.T) {
	s, c := startS3CkptServer(t, 1)
	script, _ := filepath.Abs("testdata/ckpt_agent.py")
	out := runPython(t, s, 1, script)[0]
	if !strings.Contains(out, "checkpoint ok") {
		t.Fatalf("script output:\n%s", out)
	}
	ms, err := c.List(t.Context())
	if err != nil || len(ms) != 2 || ms[0].Step != 7 || ms[1].Step != 9 {
		t.Fatalf("store holds %d checkpoints (%v), want steps 7 and 9", len(ms), err)
	}
}

// startS3CkptServer serves ranks of job "j" generation 1 and their
// checkpoints in S3 (gofakes3), and points the Python module at it alone.
func startS3CkptServer(t *testing.T, ranks int) (*Server, *checkpoint.Checkpoints) {
	t.Helper()
	srv := s3test.NewServer(t, "ckpt")
	c, err := checkpoint.New(srv.Store(t, "ckpt", "job", 0), checkpoint.Config{})
	if err != nil {
		t.Fatal(err)
	}
	s, err := Listen(Config{
		SocketPath:   filepath.Join(t.TempDir(), "local.sock"),
		Transport:    collective.NewLocalTransport(),
		Collective:   collective.DefaultConfig(),
		Authorizer:   fakeAuth{ranks: ranks},
		Checkpointer: &storeCheckpointer{c: c, spool: t.TempDir(), own: true},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	t.Setenv("GPUMESH_CHECKPOINT_URI", "s3://ckpt/job")
	t.Setenv("GPUMESH_BIN", "/nonexistent") // the module must not fall back to the binary
	return s, c
}

// Two ranks (Gloo, and the gpumesh backend) save a sharded checkpoint
// through their agent, one part each, and load their own part back; the
// parts are gathered for the manifest with kept tensors, as
// all_gather_object would give them (ckpt_shards.py checks).
func TestPythonShardedCheckpointThroughAgent(t *testing.T) {
	for _, backend := range []string{"gloo", "gpumesh"} {
		t.Run(backend, func(t *testing.T) {
			s, c := startS3CkptServer(t, 2)
			script, _ := filepath.Abs("testdata/ckpt_shards.py")
			for r, out := range runPython(t, s, 2, script, backend) {
				if !strings.Contains(out, "shards ok") {
					t.Fatalf("rank %d output:\n%s", r, out)
				}
			}
			m, err := c.Latest(t.Context())
			if err != nil || len(m.Parts) != 2 || m.Parts[1].CRC32C[0] == m.Parts[0].CRC32C[0] {
				t.Fatalf("latest: %+v, %v; want two different parts", m.Parts, err)
			}
		})
	}
}
