package checkpoint_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
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
