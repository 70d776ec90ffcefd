package checkpoint_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gpumesh/gpumesh/checkpoint"
)

// A part written into the file CreatePart hands out (what a rank does
// through the descriptor its agent passes it) is stored once committed,
// listed nowhere before, and read back by OpenPart checked; an aborted one
// leaves nothing, not even its spool file.
func TestPartFileWrittenInPlaceCommitsAndOpens(t *testing.T) {
	for name, st := range stores(t) {
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			c := newCheckpoints(t, st, 3)
			spool := t.TempDir()
			want := payload(3, checkpoint.ChecksumChunk+(3<<20))

			aborted, err := c.CreatePart(4, 0, spool)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := aborted.File().Write(want[:1000]); err != nil {
				t.Fatal(err)
			}
			aborted.Abort()

			pf, err := c.CreatePart(5, 0, spool)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := pf.File().Write(want); err != nil {
				t.Fatal(err)
			}
			if keys, _ := st.List(ctx, ""); len(keys) != 0 {
				t.Fatalf("objects visible before the part's commit: %v", keys)
			}
			p, err := pf.Commit(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if p.Size != int64(len(want)) || len(p.CRC32C) != 2 {
				t.Fatalf("part %+v", p)
			}
			if _, err := pf.Commit(ctx); err == nil {
				t.Fatal("a second Commit succeeded")
			}
			m := checkpoint.Manifest{Step: 5, WorldSize: 1, Parts: []checkpoint.Part{p}}
			if err := c.Commit(ctx, m); err != nil {
				t.Fatal(err)
			}
			if keys, _ := st.List(ctx, ""); len(keys) != 2 {
				t.Fatalf("store holds %v, want step 5's part and manifest only", keys)
			}
			if left, _ := os.ReadDir(spool); len(left) != 0 {
				t.Fatalf("spool files left: %v", left)
			}
			f, err := c.OpenPart(ctx, m, 0, t.TempDir())
			if err != nil {
				t.Fatal(err)
			}
			got, err := io.ReadAll(f)
			f.Close()
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("OpenPart read %d bytes (%v), want the %d written", len(got), err, len(want))
			}

			// A flipped bit in the stored part fails OpenPart.
			bad := bytes.Clone(want)
			bad[checkpoint.ChecksumChunk+7] ^= 1
			if err := st.Upload(ctx, checkpoint.PartKey(5, 0), bytes.NewReader(bad)); err != nil {
				t.Fatal(err)
			}
			if f, err := c.OpenPart(ctx, m, 0, t.TempDir()); !errors.Is(err, checkpoint.ErrCorrupt) {
				if f != nil {
					f.Close()
				}
				t.Fatalf("OpenPart of a flipped bit: %v, want ErrCorrupt", err)
			}
		})
	}
}

// A part that was being written straight into a FileStore when its writer
// died (the agent killed mid-save) leaves a temporary file that no List
// shows; the next commit's prune removes it once a newer checkpoint is
// complete, and leaves one of a newer step (maybe in progress).
func TestPruneRemovesTemporaryFilesOfDeadWrites(t *testing.T) {
	dir := t.TempDir()
	st, err := checkpoint.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	c := newCheckpoints(t, st, 3)
	dead, err := c.CreatePart(4, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := dead.File().Write([]byte("half a state")); err != nil {
		t.Fatal(err)
	}
	dead.File().Close() // the writer died: neither Commit nor Abort
	busy, err := c.CreatePart(9, 0, "")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Abort()
	save(t, c, 5, map[int][]byte{0: payload(5, 10)}, 1)
	var files []string
	err = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			rel, _ := filepath.Rel(dir, p)
			files = append(files, rel)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 3 || !strings.HasPrefix(files[2], "step-00000000000000000009/part-00000.") {
		t.Fatalf("store holds %v, want step 5's manifest and part and step 9's temporary file", files)
	}
}

// Several callers that open one part of a store that does not keep files
// into one directory at once (ranks sharing a spool directory) each get a
// whole, checked copy: each download has a temporary file of its own.
func TestOpenPartAtOnceIntoOneDirectory(t *testing.T) {
	st := stores(t)["s3"]
	c := newCheckpoints(t, st, 3)
	want := payload(9, 3*checkpoint.ChecksumChunk/2)
	m := save(t, c, 9, map[int][]byte{0: want}, 1)
	dir := t.TempDir()
	const n = 4
	start := make(chan struct{})
	errs := make(chan error, n)
	for range n {
		go func() {
			<-start
			f, err := c.OpenPart(context.Background(), m, 0, dir)
			if err != nil {
				errs <- err
				return
			}
			defer f.Close()
			got, err := io.ReadAll(f)
			if err == nil && !bytes.Equal(got, want) {
				err = fmt.Errorf("read %d bytes that differ from the %d saved", len(got), len(want))
			}
			errs <- err
		}()
	}
	close(start)
	for range n {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
	left, err := os.ReadDir(dir)
	if err != nil || len(left) != 1 || left[0].Name() != "step-9-part-0" {
		t.Fatalf("left in the directory: %v (%v); want the part's copy only", left, err)
	}
}
