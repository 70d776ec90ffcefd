package checkpoint

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
)

// A PartFile is one rank's part written straight into a file by the rank's
// own process (the agent hands the rank the file's descriptor), so the
// state is written once: into the store's own temporary file when the store
// keeps files (FileStore: Commit syncs it and renames it into place), else
// into a spool file that Commit uploads in parallel ranges, checksummed
// beside the upload, and then removes.
//
// A PartFile is used by one goroutine; Commit or Abort ends it.
type PartFile struct {
	c      *Checkpoints
	step   int64
	rank   int
	f      *os.File
	staged *stagedFile // nil: f is a spool file to upload
	done   bool
}

// stager is a Store that can hand out a file that becomes an object in
// place (FileStore).
type stager interface {
	stage(key string) (*stagedFile, error)
}

// opener is a Store whose objects are local files that can be opened and
// read in place (FileStore).
type opener interface {
	open(key string) (*os.File, error)
}

// stagedFile is a temporary file beside its object's final path.
type stagedFile struct {
	f       *os.File
	publish func() error // sync, rename into place, sync the directory
	abort   func()
}

// CreatePart starts a rank's part of the checkpoint of step. The bytes go
// into File (from offset 0, by anyone holding its descriptor); Commit then
// makes the part stored. spoolDir holds the spool file of a store that
// does not keep files (S3); "" is the system's temporary directory.
func (c *Checkpoints) CreatePart(step int64, rank int, spoolDir string) (*PartFile, error) {
	if step < 0 || rank < 0 {
		return nil, fmt.Errorf("%w: step %d, rank %d: both must be >= 0", ErrInvalidConfig, step, rank)
	}
	p := &PartFile{c: c, step: step, rank: rank}
	if s, ok := c.store.(stager); ok {
		sf, err := s.stage(PartKey(step, rank))
		if err != nil {
			return nil, fmt.Errorf("checkpoint step %d rank %d: %w", step, rank, err)
		}
		p.f, p.staged = sf.f, sf
		return p, nil
	}
	if spoolDir != "" {
		if err := os.MkdirAll(spoolDir, 0o700); err != nil {
			return nil, err
		}
	}
	f, err := os.CreateTemp(spoolDir, fmt.Sprintf("part-%d-%d-*.spool", step, rank))
	if err != nil {
		return nil, fmt.Errorf("checkpoint step %d rank %d: spool file: %w", step, rank, err)
	}
	p.f = f
	return p, nil
}

// File is where the part's bytes go. It stays owned by the PartFile.
func (p *PartFile) File() *os.File { return p.f }

// Commit stores what File holds as the part and returns the Part to list
// in the manifest. The PartFile is ended either way.
func (p *PartFile) Commit(ctx context.Context) (Part, error) {
	if p.done {
		return Part{}, fmt.Errorf("%w: part of step %d rank %d already ended", ErrInvalidConfig, p.step, p.rank)
	}
	p.done = true
	if p.staged == nil {
		defer func() {
			p.f.Close()
			os.Remove(p.f.Name())
		}()
		if _, err := p.f.Seek(0, 0); err != nil {
			return Part{}, err
		}
		return p.c.PutPart(ctx, p.step, p.rank, p.f)
	}
	ok := false
	defer func() {
		p.f.Close()
		if !ok {
			p.staged.abort()
		}
	}()
	st, err := p.f.Stat()
	if err != nil {
		return Part{}, err
	}
	sums := parallelChecksums(io.NewSectionReader(p.f, 0, st.Size()), st.Size())
	if sums == nil {
		return Part{}, fmt.Errorf("checkpoint step %d rank %d: reading the part to checksum it failed", p.step, p.rank)
	}
	if err := ctx.Err(); err != nil {
		return Part{}, err
	}
	if err := p.staged.publish(); err != nil {
		return Part{}, fmt.Errorf("checkpoint step %d rank %d: %w", p.step, p.rank, err)
	}
	ok = true
	return Part{Rank: p.rank, Size: st.Size(), CRC32C: sums}, nil
}

// Abort drops the part: nothing of it is stored. Safe after Commit.
func (p *PartFile) Abort() {
	if p.done {
		return
	}
	p.done = true
	p.f.Close()
	if p.staged != nil {
		p.staged.abort()
		return
	}
	os.Remove(p.f.Name())
}

// OpenPart returns a rank's part of a checkpoint as a local file checked
// against the manifest (size and every CRC32C), positioned at 0: the
// store's own file when the store keeps files (it is read once to check
// it, not copied), else a download into a new file in dir (named
// step-<step>-part-<rank>; a partial download never has that name: each
// download has a temporary file of its own, renamed once checked, so
// callers may open one part into one directory at once). The caller
// closes the file.
func (c *Checkpoints) OpenPart(ctx context.Context, m Manifest, rank int, dir string) (*os.File, error) {
	p, ok := m.Part(rank)
	if !ok {
		return nil, fmt.Errorf("%w: checkpoint of step %d has no part for rank %d (it has %d parts of world size %d)", ErrNotFound, m.Step, rank, len(m.Parts), m.WorldSize)
	}
	if o, ok := c.store.(opener); ok {
		f, err := o.open(PartKey(m.Step, rank))
		if err != nil {
			return nil, err
		}
		if err := verifyFile(f, m.Step, p); err != nil {
			f.Close()
			return nil, err
		}
		return f, nil
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, err
	}
	name := fmt.Sprintf("step-%d-part-%d", m.Step, rank)
	f, err := os.CreateTemp(dir, name+".partial-*")
	if err != nil {
		return nil, err
	}
	name = filepath.Join(dir, name)
	if err := c.GetPart(ctx, m, rank, f); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	if err := os.Rename(f.Name(), name); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return f, nil
}

// verifyFile checks a local copy of a part against its manifest entry.
func verifyFile(f *os.File, step int64, p Part) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if st.Size() != p.Size {
		return fmt.Errorf("%w: step %d rank %d: %d bytes stored, manifest says %d", ErrCorrupt, step, p.Rank, st.Size(), p.Size)
	}
	sums := parallelChecksums(io.NewSectionReader(f, 0, p.Size), p.Size)
	if sums == nil {
		return fmt.Errorf("checkpoint step %d rank %d: reading the part to check it failed", step, p.Rank)
	}
	for i, sum := range sums {
		if sum != p.CRC32C[i] {
			return fmt.Errorf("%w: step %d rank %d: CRC32C of bytes %d.. is %s, manifest says %s", ErrCorrupt, step, p.Rank, int64(i)*ChecksumChunk, sum, p.CRC32C[i])
		}
	}
	return nil
}
