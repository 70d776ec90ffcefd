package checkpoint

import (
	"bytes"
	"context"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"hash"
	"hash/crc32"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// Config configures Checkpoints.
type Config struct {
	// Keep is how many complete checkpoints Prune leaves. Default 3.
	Keep int
	// Logger for commits and pruning. Default: a null logger.
	Logger hclog.Logger
	// Now is the clock for manifest times. Default time.Now.
	Now func() time.Time
}

// DefaultKeep is Config.Keep's default.
const DefaultKeep = 3

// Part is one rank's bytes in a checkpoint.
type Part struct {
	Rank int   `json:"rank"`
	Size int64 `json:"size"`
	// CRC32C holds the Castagnoli CRC-32 (8 hex digits) of every
	// ChecksumChunk bytes, the last chunk shorter; none for an empty part.
	// Chunks are checked independently, so uploads hash them in parallel
	// and a download whose ranges arrive out of order checks each as it
	// lands.
	CRC32C []string `json:"crc32c"`
}

// ChecksumChunk is the span of each of a Part's Chunks checksums; it is
// the default S3 part size, so one ranged download fills one chunk in
// order.
const ChecksumChunk = DefaultPartSize

// Manifest describes one complete checkpoint.
type Manifest struct {
	// Step is the training step the state belongs to (the next step to run
	// is Step+1, by the convention of the Python side).
	Step int64 `json:"step"`
	// WorldSize is the number of ranks of the job that saved it.
	WorldSize int `json:"world_size"`
	// Parts, by rank: one (rank 0 only) or WorldSize (every rank's shard).
	Parts []Part `json:"parts"`
	// Job (the ID of one submission) and Generation that wrote it; empty
	// outside a job.
	Job        string `json:"job,omitempty"`
	Generation uint64 `json:"generation,omitempty"`
	// JobName is the name of the job that wrote it: what stays the same
	// when a job is submitted again, and so what Owner.Check compares.
	// Empty in manifests written before it was recorded and outside a job.
	JobName string `json:"job_name,omitempty"`
	// Time of the commit.
	Time time.Time `json:"time"`
	// Meta holds small user data (e.g. the epoch); at most 64 KiB in all.
	Meta map[string]string `json:"meta,omitempty"`
}

// Part returns the part of a rank.
func (m Manifest) Part(rank int) (Part, bool) {
	for _, p := range m.Parts {
		if p.Rank == rank {
			return p, true
		}
	}
	return Part{}, false
}

// Size is the sum of the parts' sizes.
func (m Manifest) Size() int64 {
	var n int64
	for _, p := range m.Parts {
		n += p.Size
	}
	return n
}

// castagnoli is the CRC-32C table (hardware-accelerated on x86-64 and
// arm64; the checksum S3 itself offers).
var castagnoli = crc32.MakeTable(crc32.Castagnoli)

const (
	stepPrefix   = "step-"
	manifestName = "MANIFEST.json"
	maxMetaBytes = 64 << 10
)

// StepDir is the key prefix of a step's objects.
func StepDir(step int64) string { return fmt.Sprintf("%s%020d/", stepPrefix, step) }

// PartKey is the key of a rank's part.
func PartKey(step int64, rank int) string { return fmt.Sprintf("%spart-%05d", StepDir(step), rank) }

// ManifestKey is the key of a step's manifest.
func ManifestKey(step int64) string { return StepDir(step) + manifestName }

// Checkpoints runs the commit protocol (see the package doc) on a Store.
// It is safe for concurrent use; Commit and Prune of one Checkpoints are
// serialised.
type Checkpoints struct {
	store Store
	cfg   Config
	mu    sync.Mutex // serialises Commit and Prune
}

// New returns Checkpoints over a store.
func New(store Store, cfg Config) (*Checkpoints, error) {
	if cfg.Keep == 0 {
		cfg.Keep = DefaultKeep
	}
	if cfg.Keep < 1 {
		return nil, fmt.Errorf("%w: keep must be >= 1, got %d", ErrInvalidConfig, cfg.Keep)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Checkpoints{store: store, cfg: cfg}, nil
}

// Store returns the underlying store.
func (c *Checkpoints) Store() Store { return c.store }

// chunkHasher counts what passes through and checksums each
// ChecksumChunk of it.
type chunkHasher struct {
	chunk  hash.Hash32
	chunks []string
	n      int64
}

func (c *chunkHasher) Write(p []byte) (int, error) {
	for q := p; len(q) > 0; {
		room := ChecksumChunk - c.n%ChecksumChunk
		k := min(int64(len(q)), room)
		c.chunk.Write(q[:k])
		c.n += k
		q = q[k:]
		if k == room {
			c.chunks = append(c.chunks, hex.EncodeToString(c.chunk.Sum(nil)))
			c.chunk.Reset()
		}
	}
	return len(p), nil
}

func (c *chunkHasher) sums() []string {
	if c.n%ChecksumChunk != 0 {
		return append(c.chunks, hex.EncodeToString(c.chunk.Sum(nil)))
	}
	return c.chunks
}

// sizedReaderAt is what a file offers: the upload reads it in parallel
// ranges without a copy, and the checksums are taken from it beside.
type sizedReaderAt interface {
	io.ReaderAt
	io.ReadSeeker
}

// PutPart uploads one rank's bytes for a step and returns the Part to list
// in the manifest. Nothing is visible to Latest until Commit. A reader that
// is also an io.ReaderAt and io.Seeker (a file) is uploaded in parallel
// ranges and checksummed in parallel beside the upload; any other is
// checksummed as it streams.
func (c *Checkpoints) PutPart(ctx context.Context, step int64, rank int, r io.Reader) (Part, error) {
	if step < 0 || rank < 0 {
		return Part{}, fmt.Errorf("%w: step %d, rank %d: both must be >= 0", ErrInvalidConfig, step, rank)
	}
	key := PartKey(step, rank)
	if ra, ok := r.(sizedReaderAt); ok {
		if start, size, ok := extent(ra); ok {
			sums := make(chan []string, 1)
			go func() { sums <- parallelChecksums(io.NewSectionReader(ra, start, size), size) }()
			err := c.store.Upload(ctx, key, r)
			sum := <-sums
			if err != nil {
				return Part{}, fmt.Errorf("checkpoint step %d rank %d: %w", step, rank, err)
			}
			if sum == nil {
				return Part{}, fmt.Errorf("checkpoint step %d rank %d: reading the part to checksum it failed", step, rank)
			}
			return Part{Rank: rank, Size: size, CRC32C: sum}, nil
		}
	}
	ch := &chunkHasher{chunk: crc32.New(castagnoli)}
	if err := c.store.Upload(ctx, key, io.TeeReader(r, ch)); err != nil {
		return Part{}, fmt.Errorf("checkpoint step %d rank %d: %w", step, rank, err)
	}
	return Part{Rank: rank, Size: ch.n, CRC32C: ch.sums()}, nil
}

// extent returns where r is and how many bytes follow, if r can seek (a
// pipe cannot).
func extent(r io.Seeker) (start, size int64, ok bool) {
	start, err := r.Seek(0, io.SeekCurrent)
	if err != nil {
		return 0, 0, false
	}
	end, err := r.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, 0, false
	}
	if _, err := r.Seek(start, io.SeekStart); err != nil {
		return 0, 0, false
	}
	return start, end - start, true
}

// parallelChecksums checksums every ChecksumChunk of r, a few chunks at a
// time; nil if reading fails.
func parallelChecksums(r *io.SectionReader, size int64) []string {
	n := (size + ChecksumChunk - 1) / ChecksumChunk
	out := make([]string, n)
	var wg sync.WaitGroup
	var failed atomic.Bool
	sem := make(chan struct{}, 4)
	for i := int64(0); i < n; i++ {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			h := crc32.New(castagnoli)
			off := i * ChecksumChunk
			if _, err := io.Copy(h, io.NewSectionReader(r, off, min(ChecksumChunk, size-off))); err != nil {
				failed.Store(true)
				return
			}
			out[i] = hex.EncodeToString(h.Sum(nil))
		}()
	}
	wg.Wait()
	if failed.Load() {
		return nil
	}
	return out
}

// Commit makes a checkpoint visible: it checks that every part the manifest
// lists is in the store with its size, writes the manifest, and prunes to
// Keep. A failed prune is logged, not returned: the checkpoint is committed.
func (c *Checkpoints) Commit(ctx context.Context, m Manifest) error {
	if err := validateManifest(m); err != nil {
		return err
	}
	if m.Time.IsZero() {
		m.Time = c.cfg.Now().UTC()
	}
	for _, p := range m.Parts {
		n, err := c.store.Size(ctx, PartKey(m.Step, p.Rank))
		if err != nil {
			return fmt.Errorf("%w: step %d rank %d: %v", ErrIncomplete, m.Step, p.Rank, err)
		}
		if n != p.Size {
			return fmt.Errorf("%w: step %d rank %d: %d bytes stored, manifest says %d", ErrIncomplete, m.Step, p.Rank, n, p.Size)
		}
	}
	b, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.store.Upload(ctx, ManifestKey(m.Step), bytes.NewReader(b)); err != nil {
		return fmt.Errorf("checkpoint step %d manifest: %w", m.Step, err)
	}
	c.cfg.Logger.Info("checkpoint committed", "step", m.Step, "world_size", m.WorldSize, "parts", len(m.Parts), "bytes", m.Size())
	if err := c.pruneLocked(ctx); err != nil {
		c.cfg.Logger.Warn("checkpoint prune failed", "error", err)
	}
	return nil
}

func validateManifest(m Manifest) error {
	if m.Step < 0 {
		return fmt.Errorf("%w: step must be >= 0, got %d", ErrInvalidConfig, m.Step)
	}
	if m.WorldSize < 1 {
		return fmt.Errorf("%w: world size must be >= 1, got %d", ErrInvalidConfig, m.WorldSize)
	}
	if len(m.Parts) == 0 {
		return fmt.Errorf("%w: a checkpoint needs at least one part", ErrInvalidConfig)
	}
	seen := map[int]bool{}
	for _, p := range m.Parts {
		if p.Rank < 0 || p.Rank >= m.WorldSize || seen[p.Rank] {
			return fmt.Errorf("%w: part rank %d is out of range or repeated (world size %d)", ErrInvalidConfig, p.Rank, m.WorldSize)
		}
		seen[p.Rank] = true
		if p.Size < 0 || int64(len(p.CRC32C)) != (p.Size+ChecksumChunk-1)/ChecksumChunk {
			return fmt.Errorf("%w: part rank %d: %d CRC32C checksums for %d bytes", ErrInvalidConfig, p.Rank, len(p.CRC32C), p.Size)
		}
		for _, sum := range p.CRC32C {
			if b, err := hex.DecodeString(sum); err != nil || len(b) != 4 {
				return fmt.Errorf("%w: part rank %d: CRC32C %q is not 8 hex digits", ErrInvalidConfig, p.Rank, sum)
			}
		}
	}
	n := 0
	for k, v := range m.Meta {
		n += len(k) + len(v)
	}
	if n > maxMetaBytes {
		return fmt.Errorf("%w: meta holds %d bytes; at most %d", ErrInvalidConfig, n, maxMetaBytes)
	}
	return nil
}

// steps lists the steps that have objects, and which of them have a
// manifest, in ascending order.
func (c *Checkpoints) steps(ctx context.Context) (all []int64, committed map[int64]bool, keys map[int64][]string, err error) {
	ks, err := c.store.List(ctx, stepPrefix)
	if err != nil {
		return nil, nil, nil, err
	}
	committed = map[int64]bool{}
	keys = map[int64][]string{}
	for _, k := range ks {
		dir, name, ok := strings.Cut(k, "/")
		if !ok {
			continue
		}
		step, err := strconv.ParseInt(strings.TrimPrefix(dir, stepPrefix), 10, 64)
		if err != nil || StepDir(step) != dir+"/" {
			continue // not ours
		}
		if _, ok := keys[step]; !ok {
			all = append(all, step)
		}
		keys[step] = append(keys[step], k)
		if name == manifestName {
			committed[step] = true
		}
	}
	return all, committed, keys, nil
}

// Latest returns the manifest of the newest complete checkpoint, or
// ErrNoCheckpoint. A manifest that cannot be read is skipped with a warning
// (an older one is used).
func (c *Checkpoints) Latest(ctx context.Context) (Manifest, error) {
	all, committed, _, err := c.steps(ctx)
	if err != nil {
		return Manifest{}, err
	}
	for i := len(all) - 1; i >= 0; i-- {
		if !committed[all[i]] {
			continue
		}
		m, err := c.Manifest(ctx, all[i])
		if err == nil {
			return m, nil
		}
		c.cfg.Logger.Warn("skipping unreadable checkpoint manifest", "step", all[i], "error", err)
	}
	return Manifest{}, ErrNoCheckpoint
}

// Manifest reads the manifest of a step.
func (c *Checkpoints) Manifest(ctx context.Context, step int64) (Manifest, error) {
	var buf writerAtBuffer
	if _, err := c.store.Download(ctx, ManifestKey(step), &buf); err != nil {
		return Manifest{}, err
	}
	var m Manifest
	if err := json.Unmarshal(buf.b, &m); err != nil {
		return Manifest{}, fmt.Errorf("%w: manifest of step %d: %v", ErrCorrupt, step, err)
	}
	if m.Step != step {
		return Manifest{}, fmt.Errorf("%w: manifest under step %d says step %d", ErrCorrupt, step, m.Step)
	}
	if err := validateManifest(m); err != nil {
		return Manifest{}, fmt.Errorf("%w: manifest of step %d: %v", ErrCorrupt, step, err)
	}
	return m, nil
}

// GetPart downloads a rank's part of a checkpoint into w and checks its
// size and CRC32C against the manifest.
func (c *Checkpoints) GetPart(ctx context.Context, m Manifest, rank int, w io.WriterAt) error {
	p, ok := m.Part(rank)
	if !ok {
		return fmt.Errorf("%w: checkpoint of step %d has no part for rank %d (it has %d parts of world size %d)", ErrNotFound, m.Step, rank, len(m.Parts), m.WorldSize)
	}
	hw := &hashingWriterAt{w: w, span: ChecksumChunk, chunks: map[int64]*chunkState{}}
	n, err := c.store.Download(ctx, PartKey(m.Step, rank), hw)
	if err != nil {
		return err
	}
	if n != p.Size {
		return fmt.Errorf("%w: step %d rank %d: got %d bytes, manifest says %d", ErrCorrupt, m.Step, rank, n, p.Size)
	}
	for i, sum := range hw.sums(n) {
		if sum != p.CRC32C[i] {
			return fmt.Errorf("%w: step %d rank %d: CRC32C of bytes %d.. is %s, manifest says %s", ErrCorrupt, m.Step, rank, int64(i)*ChecksumChunk, sum, p.CRC32C[i])
		}
	}
	return nil
}

// Prune deletes all but the newest Keep complete checkpoints, and the
// objects of uncommitted steps older than the newest complete checkpoint
// (writes that died), including a FileStore's temporary files of such
// steps. Steps newer than it are left alone: they may be in progress.
func (c *Checkpoints) Prune(ctx context.Context) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.pruneLocked(ctx)
}

func (c *Checkpoints) pruneLocked(ctx context.Context) error {
	all, committed, keys, err := c.steps(ctx)
	if err != nil {
		return err
	}
	kept := 0
	var newest int64 = -1
	for i := len(all) - 1; i >= 0; i-- {
		step := all[i]
		if committed[step] {
			if newest < 0 {
				newest = step
			}
			if kept < c.cfg.Keep {
				kept++
				continue
			}
			// Manifest first: the checkpoint disappears whole.
			if err := c.store.Delete(ctx, ManifestKey(step)); err != nil {
				return err
			}
		} else if newest < 0 || step > newest {
			continue // maybe being written
		}
		var parts []string
		for _, k := range keys[step] {
			if k != ManifestKey(step) {
				parts = append(parts, k)
			}
		}
		if err := c.store.Delete(ctx, parts...); err != nil {
			return err
		}
		c.cfg.Logger.Debug("checkpoint pruned", "step", step, "committed", committed[step])
	}
	return c.sweepTemps(newest)
}

// tempSweeper is a Store whose unfinished uploads outlive a writer that
// dies (FileStore's temporary files; S3 makes nothing of an unfinished
// upload visible).
type tempSweeper interface {
	temps(prefix string) ([]string, error)
	removeTemp(key string) error
}

// sweepTemps removes the temporary files of steps older than the newest
// complete checkpoint: writes that died (an agent killed while a rank's
// part was being written into the store).
func (c *Checkpoints) sweepTemps(newest int64) error {
	ts, ok := c.store.(tempSweeper)
	if !ok || newest < 0 {
		return nil
	}
	keys, err := ts.temps(stepPrefix)
	if err != nil {
		return err
	}
	for _, k := range keys {
		dir, _, _ := strings.Cut(k, "/")
		step, err := strconv.ParseInt(strings.TrimPrefix(dir, stepPrefix), 10, 64)
		if err != nil || StepDir(step) != dir+"/" || step >= newest {
			continue
		}
		if err := ts.removeTemp(k); err != nil {
			return err
		}
		c.cfg.Logger.Debug("checkpoint write that never finished removed", "step", step, "file", k)
	}
	return nil
}

// writerAtBuffer is an in-memory io.WriterAt.
type writerAtBuffer struct {
	mu sync.Mutex
	b  []byte
}

func (w *writerAtBuffer) WriteAt(p []byte, off int64) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if end := off + int64(len(p)); end > int64(len(w.b)) {
		w.b = append(w.b, make([]byte, end-int64(len(w.b)))...)
	}
	copy(w.b[off:], p)
	return len(p), nil
}

// hashingWriterAt checksums each span-sized chunk of what is written
// through it. Writes within a chunk that arrive in order are hashed at
// once; a piece that arrives early is held until the gap before it fills
// (concurrent ranged downloads write each range in order, so only ranges
// that straddle chunks are held).
type hashingWriterAt struct {
	w      io.WriterAt
	span   int64
	mu     sync.Mutex
	chunks map[int64]*chunkState
}

type chunkState struct {
	h       hash.Hash32
	next    int64 // offset within the chunk hashed up to
	pending map[int64][]byte
}

func (hw *hashingWriterAt) WriteAt(p []byte, off int64) (int, error) {
	n, err := hw.w.WriteAt(p, off)
	if err != nil {
		return n, err
	}
	hw.mu.Lock()
	defer hw.mu.Unlock()
	for q, o := p, off; len(q) > 0; {
		idx, in := o/hw.span, o%hw.span
		k := min(int64(len(q)), hw.span-in)
		hw.add(idx, in, q[:k])
		q, o = q[k:], o+k
	}
	return n, nil
}

func (hw *hashingWriterAt) add(idx, in int64, p []byte) {
	c := hw.chunks[idx]
	if c == nil {
		c = &chunkState{h: crc32.New(castagnoli)}
		hw.chunks[idx] = c
	}
	if in != c.next {
		if c.pending == nil {
			c.pending = map[int64][]byte{}
		}
		c.pending[in] = append([]byte(nil), p...)
		return
	}
	c.h.Write(p)
	c.next += int64(len(p))
	for {
		q, ok := c.pending[c.next]
		if !ok {
			return
		}
		delete(c.pending, c.next)
		c.h.Write(q)
		c.next += int64(len(q))
	}
}

// sums returns the checksum of every chunk of an object of size n; a
// chunk with a gap gets "incomplete".
func (hw *hashingWriterAt) sums(n int64) []string {
	hw.mu.Lock()
	defer hw.mu.Unlock()
	out := make([]string, (n+hw.span-1)/hw.span)
	for i := range out {
		c := hw.chunks[int64(i)]
		size := min(hw.span, n-int64(i)*hw.span)
		switch {
		case c == nil || c.next != size || len(c.pending) > 0:
			out[i] = "incomplete"
		default:
			out[i] = hex.EncodeToString(c.h.Sum(nil))
		}
	}
	return out
}

// List returns the manifests of the complete checkpoints, oldest first;
// unreadable ones are skipped with a warning.
func (c *Checkpoints) List(ctx context.Context) ([]Manifest, error) {
	all, committed, _, err := c.steps(ctx)
	if err != nil {
		return nil, err
	}
	var ms []Manifest
	for _, step := range all {
		if !committed[step] {
			continue
		}
		m, err := c.Manifest(ctx, step)
		if err != nil {
			c.cfg.Logger.Warn("skipping unreadable checkpoint manifest", "step", step, "error", err)
			continue
		}
		ms = append(ms, m)
	}
	return ms, nil
}
