package checkpoint_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/checkpoint"
	"github.com/gpumesh/gpumesh/checkpoint/s3test"
)

// stores gives each test a FileStore and an S3Store (gofakes3 through the
// AWS SDK, 5 MiB parts so that the payloads below go multipart).
func stores(t *testing.T) map[string]checkpoint.Store {
	fs, err := checkpoint.NewFileStore(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	srv := s3test.NewServer(t, "ckpt")
	return map[string]checkpoint.Store{
		"file": fs,
		"s3":   srv.Store(t, "ckpt", "jobs/train", 5<<20),
	}
}

func newCheckpoints(t *testing.T, st checkpoint.Store, keep int) *checkpoint.Checkpoints {
	c, err := checkpoint.New(st, checkpoint.Config{Keep: keep, Logger: hclog.New(&hclog.LoggerOptions{Output: tWriter{t}, Level: hclog.Debug})})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

type tWriter struct{ t *testing.T }

func (w tWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimSpace(string(p)))
	return len(p), nil
}

func payload(seed int64, n int) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// save puts one part per rank and commits them.
func save(t *testing.T, c *checkpoint.Checkpoints, step int64, parts map[int][]byte, world int) checkpoint.Manifest {
	t.Helper()
	ctx := context.Background()
	m := checkpoint.Manifest{Step: step, WorldSize: world}
	for r := 0; r < world; r++ {
		b, ok := parts[r]
		if !ok {
			continue
		}
		p, err := c.PutPart(ctx, step, r, bytes.NewReader(b))
		if err != nil {
			t.Fatal(err)
		}
		m.Parts = append(m.Parts, p)
	}
	if err := c.Commit(ctx, m); err != nil {
		t.Fatal(err)
	}
	return m
}

func readPart(t *testing.T, c *checkpoint.Checkpoints, m checkpoint.Manifest, rank int) []byte {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "part")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := c.GetPart(context.Background(), m, rank, f); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(f.Name())
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestRoundTripShardsAndLatest(t *testing.T) {
	for name, st := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newCheckpoints(t, st, 3)
			if _, err := c.Latest(ctx); !errors.Is(err, checkpoint.ErrNoCheckpoint) {
				t.Fatalf("empty store: Latest = %v, want ErrNoCheckpoint", err)
			}
			big := payload(1, 12<<20+123) // three 5 MiB parts and a tail
			small := payload(2, 1000)
			save(t, c, 100, map[int][]byte{0: big, 1: small}, 2)
			save(t, c, 200, map[int][]byte{0: small}, 2) // rank 0 only
			m, err := c.Latest(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if m.Step != 200 || len(m.Parts) != 1 {
				t.Fatalf("Latest = step %d with %d parts, want 200 with 1", m.Step, len(m.Parts))
			}
			old, err := c.Manifest(ctx, 100)
			if err != nil {
				t.Fatal(err)
			}
			if got := readPart(t, c, old, 0); !bytes.Equal(got, big) {
				t.Fatalf("rank 0 of step 100: %d bytes differ from the %d saved", len(got), len(big))
			}
			if got := readPart(t, c, old, 1); !bytes.Equal(got, small) {
				t.Fatal("rank 1 of step 100 differs")
			}
			if err := c.GetPart(ctx, m, 1, &sink{}); !errors.Is(err, checkpoint.ErrNotFound) {
				t.Fatalf("GetPart of a rank without a part: %v, want ErrNotFound", err)
			}
		})
	}
}

// A write that dies before its manifest leaves the previous checkpoint the
// newest; a commit whose parts are not all there fails.
func TestCrashMidWriteKeepsPrevious(t *testing.T) {
	for name, st := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newCheckpoints(t, st, 3)
			good := payload(3, 6<<20)
			save(t, c, 10, map[int][]byte{0: good}, 1)

			// Rank 0 of step 20 is uploaded, its writer dies before committing.
			if _, err := c.PutPart(ctx, 20, 0, bytes.NewReader(payload(4, 100))); err != nil {
				t.Fatal(err)
			}
			// Step 30's upload breaks in the middle (the reader fails after
			// 7 MiB, past the first multipart part).
			broken := io.MultiReader(bytes.NewReader(payload(5, 7<<20)), errReader{})
			if _, err := c.PutPart(ctx, 30, 0, broken); err == nil {
				t.Fatal("PutPart of a failing reader succeeded")
			}
			if _, err := st.Size(ctx, checkpoint.PartKey(30, 0)); !errors.Is(err, checkpoint.ErrNotFound) {
				t.Fatalf("a failed upload left an object: %v", err)
			}
			// A commit naming a part that is not there.
			err := c.Commit(ctx, checkpoint.Manifest{Step: 40, WorldSize: 2, Parts: []checkpoint.Part{
				{Rank: 0, Size: 1, CRC32C: []string{"00000000"}}, {Rank: 1, Size: 1, CRC32C: []string{"00000000"}}}})
			if !errors.Is(err, checkpoint.ErrIncomplete) {
				t.Fatalf("commit of missing parts: %v, want ErrIncomplete", err)
			}
			m, err := c.Latest(ctx)
			if err != nil || m.Step != 10 {
				t.Fatalf("Latest = %d, %v; want step 10", m.Step, err)
			}
			if got := readPart(t, c, m, 0); !bytes.Equal(got, good) {
				t.Fatal("previous checkpoint damaged")
			}
		})
	}
}

type errReader struct{}

func (errReader) Read([]byte) (int, error) { return 0, errors.New("writer died") }

func TestPruneKeepsNewestAndCleansDeadWrites(t *testing.T) {
	for name, st := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newCheckpoints(t, st, 2)
			for step := int64(1); step <= 3; step++ {
				save(t, c, step, map[int][]byte{0: payload(step, 10), 1: payload(step+9, 10)}, 2)
			}
			// A dead write at step 4, and one in progress at step 9.
			if _, err := c.PutPart(ctx, 4, 0, strings.NewReader("dead")); err != nil {
				t.Fatal(err)
			}
			if _, err := c.PutPart(ctx, 9, 0, strings.NewReader("in progress")); err != nil {
				t.Fatal(err)
			}
			save(t, c, 5, map[int][]byte{0: payload(5, 10)}, 2)
			keys, err := st.List(ctx, "")
			if err != nil {
				t.Fatal(err)
			}
			want := []string{
				checkpoint.ManifestKey(3), checkpoint.PartKey(3, 0), checkpoint.PartKey(3, 1),
				checkpoint.ManifestKey(5), checkpoint.PartKey(5, 0),
				checkpoint.PartKey(9, 0),
			}
			if strings.Join(keys, " ") != strings.Join(want, " ") {
				t.Fatalf("after prune:\n got %v\nwant %v", keys, want)
			}
		})
	}
}

func TestCorruptPartIsAnError(t *testing.T) {
	for name, st := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newCheckpoints(t, st, 3)
			// Two checksum chunks; the flipped bit is in the second.
			m := save(t, c, 7, map[int][]byte{0: payload(7, checkpoint.ChecksumChunk+(4<<20))}, 1)
			bad := payload(7, checkpoint.ChecksumChunk+(4<<20))
			bad[checkpoint.ChecksumChunk+12345] ^= 1
			if err := st.Upload(ctx, checkpoint.PartKey(7, 0), bytes.NewReader(bad)); err != nil {
				t.Fatal(err)
			}
			err := c.GetPart(ctx, m, 0, &sink{})
			if !errors.Is(err, checkpoint.ErrCorrupt) {
				t.Fatalf("GetPart of a flipped bit: %v, want ErrCorrupt", err)
			}
			// A manifest that is not JSON is skipped, not fatal.
			if err := st.Upload(ctx, checkpoint.ManifestKey(8), strings.NewReader("{torn")); err != nil {
				t.Fatal(err)
			}
			if got, err := c.Latest(ctx); err != nil || got.Step != 7 {
				t.Fatalf("Latest with a torn newer manifest = %d, %v; want 7", got.Step, err)
			}
		})
	}
}

// sink is an io.WriterAt that drops its input.
type sink struct{}

func (*sink) WriteAt(p []byte, _ int64) (int, error) { return len(p), nil }

func TestFileStoreLeavesNoTempFiles(t *testing.T) {
	dir := t.TempDir()
	st, err := checkpoint.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := st.Upload(ctx, "a/b", strings.NewReader("x")); err == nil {
		t.Fatal("upload under a cancelled context succeeded")
	}
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			t.Errorf("left behind: %s", p)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}

func TestParseURI(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"s3://bucket/a/b/", "s3://bucket/a/b", true},
		{"s3://bucket", "s3://bucket", true},
		{"file:///shared/ckpt/", "file:///shared/ckpt", true},
		{"file://shared/ckpt", "", false},
		{"file:///", "", false},
		{"s3:///prefix", "", false},
		{"gs://b/p", "", false},
		{"/plain/path", "", false},
	} {
		u, err := checkpoint.ParseURI(tc.in)
		if tc.ok != (err == nil) {
			t.Errorf("ParseURI(%q) error = %v, want ok=%v", tc.in, err, tc.ok)
			continue
		}
		if err != nil && !errors.Is(err, checkpoint.ErrInvalidURI) {
			t.Errorf("ParseURI(%q) = %v, not ErrInvalidURI", tc.in, err)
		}
		if tc.ok && u.String() != tc.want {
			t.Errorf("ParseURI(%q) = %s, want %s", tc.in, u, tc.want)
		}
	}
}
