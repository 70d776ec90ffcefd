package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Log files. A stream ("stdout" or "stderr") is kept as files <stream>.0,
// <stream>.1, ... in the log directory. Every file but the newest holds
// exactly MaxFileBytes bytes, so byte N of the stream is at offset
// N mod MaxFileBytes of file N / MaxFileBytes: an offset into the stream is
// stable across rotation and can resume a follow. Only the newest MaxFiles
// files are kept. logs.json records the rotation settings for readers, and
// <stream>.closed appears once the stream is complete (the task exited and
// its output was written).
//
// Beside each file, <stream>.<n>.times records when its bytes were written:
// one record per write, 16 bytes, the stream offset of the write's first
// byte and the time in Unix nanoseconds (both little-endian int64). It is
// pruned with its file. Recording is best effort: a failure to write it
// never fails the log.
const (
	logMetaName     = "logs.json"
	closedSuffix    = ".closed"
	timesSuffix     = ".times"
	timeRecordBytes = 16
	logCopyBufBytes = 64 << 10
)

// logPollInterval is how often a following reader looks for new data.
var logPollInterval = 100 * time.Millisecond

func logFileName(dir, stream string, idx int) string {
	return filepath.Join(dir, stream+"."+strconv.Itoa(idx))
}

func logTimesName(dir, stream string, idx int) string {
	return logFileName(dir, stream, idx) + timesSuffix
}

func closedMarker(dir, stream string) string { return filepath.Join(dir, stream+closedSuffix) }

// logIndexes returns the indexes of a stream's files, lowest and highest;
// ok is false when there are none.
func logIndexes(dir, stream string) (lo, hi int, ok bool, err error) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return 0, 0, false, err
	}
	prefix := stream + "."
	for _, e := range entries {
		name := e.Name()
		if !strings.HasPrefix(name, prefix) {
			continue
		}
		n, err := strconv.Atoi(name[len(prefix):])
		if err != nil || n < 0 || strconv.Itoa(n) != name[len(prefix):] {
			continue
		}
		if !ok || n < lo {
			lo = n
		}
		if !ok || n > hi {
			hi = n
		}
		ok = true
	}
	return lo, hi, ok, nil
}

// rotatingWriter appends a stream to its log files, cutting a file at
// exactly MaxFileBytes and deleting files beyond MaxFiles. Not safe for
// concurrent use: one goroutine copies one stream (detach excepted).
type rotatingWriter struct {
	dir, stream string
	cfg         LogConfig
	f           *os.File
	times       *os.File // file idx's write times; opened at its first write
	idx         int
	size        int64
	// detached: dir may be another task's now; write only to the files
	// already open, and open, delete or mark nothing by path.
	detached atomic.Bool
}

// errLogDetached is the write error of a detached writer whose file is full.
var errLogDetached = errors.New("log directory is no longer this task's")

// detach stops w from touching its directory by path; safe to call from
// any goroutine.
func (w *rotatingWriter) detach() { w.detached.Store(true) }

// writeLogMeta records the rotation settings readers need.
func writeLogMeta(dir string, cfg LogConfig) error {
	return writeJSONAtomic(filepath.Join(dir, logMetaName), cfg, ephemeral)
}

func readLogMeta(dir string) (LogConfig, error) {
	var cfg LogConfig
	if err := readJSON(filepath.Join(dir, logMetaName), &cfg); err != nil {
		return cfg, err
	}
	return cfg, cfg.Validate()
}

// openRotatingWriter continues a stream in dir (appending to its newest
// file) or begins it at <stream>.0.
func openRotatingWriter(dir, stream string, cfg LogConfig) (*rotatingWriter, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	w := &rotatingWriter{dir: dir, stream: stream, cfg: cfg}
	_, hi, ok, err := logIndexes(dir, stream)
	if err != nil {
		return nil, err
	}
	if ok {
		w.idx = hi
	}
	f, err := os.OpenFile(logFileName(dir, stream, w.idx), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		_ = f.Close()
		return nil, err
	}
	w.f, w.size = f, st.Size()
	_ = os.Remove(closedMarker(dir, stream))
	w.prune()
	return w, nil
}

// Write appends p, rotating as needed. It writes straight to the file (no
// buffering), so readers see the bytes at once.
func (w *rotatingWriter) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		if w.size >= w.cfg.MaxFileBytes {
			if err := w.rotate(); err != nil {
				return written, err
			}
		}
		n := int64(len(p))
		if room := w.cfg.MaxFileBytes - w.size; n > room {
			n = room
		}
		w.stamp(int64(w.idx)*w.cfg.MaxFileBytes+w.size, time.Now())
		m, err := w.f.Write(p[:n])
		written += m
		w.size += int64(m)
		if err != nil {
			return written, err
		}
		p = p[m:]
	}
	return written, nil
}

// stamp records that the byte at stream offset off is written at t.
func (w *rotatingWriter) stamp(off int64, t time.Time) {
	if w.times == nil {
		if w.detached.Load() {
			return
		}
		f, err := os.OpenFile(logTimesName(w.dir, w.stream, w.idx), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			return
		}
		w.times = f
	}
	var rec [timeRecordBytes]byte
	binary.LittleEndian.PutUint64(rec[:8], uint64(off))
	binary.LittleEndian.PutUint64(rec[8:], uint64(t.UnixNano()))
	_, _ = w.times.Write(rec[:])
}

func (w *rotatingWriter) closeTimes() {
	if w.times != nil {
		_ = w.times.Close()
		w.times = nil
	}
}

func (w *rotatingWriter) rotate() error {
	if w.detached.Load() {
		return errLogDetached
	}
	w.closeTimes()
	if err := w.f.Close(); err != nil {
		return err
	}
	w.f = nil
	f, err := os.OpenFile(logFileName(w.dir, w.stream, w.idx+1), os.O_CREATE|os.O_WRONLY|os.O_APPEND|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	w.idx++
	w.f, w.size = f, 0
	w.prune()
	return nil
}

// prune deletes files older than the newest MaxFiles.
func (w *rotatingWriter) prune() {
	if w.detached.Load() {
		return
	}
	lo, _, ok, err := logIndexes(w.dir, w.stream)
	if err != nil || !ok {
		return
	}
	for i := lo; i <= w.idx-w.cfg.MaxFiles; i++ {
		_ = os.Remove(logFileName(w.dir, w.stream, i))
		_ = os.Remove(logTimesName(w.dir, w.stream, i))
	}
}

// Close closes the current file and marks the stream complete.
func (w *rotatingWriter) Close() error {
	w.closeTimes()
	var err error
	if w.f != nil {
		err = w.f.Close()
		w.f = nil
	}
	if w.detached.Load() {
		return err
	}
	if e := markLogClosed(w.dir, w.stream); err == nil {
		err = e
	}
	return err
}

func markLogClosed(dir, stream string) error {
	f, err := os.OpenFile(closedMarker(dir, stream), os.O_CREATE|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	return f.Close()
}

// LogReader reads one stream of a task's logs across its rotated files. It
// is an io.ReadCloser; Offset tells where in the stream the next byte is,
// so a dropped follow can resume where it stopped.
type LogReader struct {
	dir, stream string
	follow      bool
	maxBytes    int64 // 0 until logs.json has been read
	pending     int64 // the offset asked for, applied once maxBytes is known
	ctx         context.Context
	cancel      context.CancelFunc

	mu  sync.Mutex // held by Read; Close takes it after cancelling
	f   *os.File
	idx int
	off atomic.Int64 // stream offset of the next byte

	// NewStamps' position: the times file it reads and how far.
	stampIdx int
	stampPos int64
}

// Logs opens a stream ("stdout" or "stderr") of the task whose log
// directory is dir. offset >= 0 starts at that byte of the stream;
// offset < 0 starts that many bytes before the current end (-1000 shows the
// last 1000 bytes). Offsets before the oldest byte still kept start at it.
// With follow, Read waits for more output, across rotation, until the
// stream is complete (the task exited), ctx is done or the reader is
// closed; without it, Read returns io.EOF at the current end. A follow may
// begin before the task has started writing: it waits for the logs.
func Logs(ctx context.Context, dir, stream string, follow bool, offset int64) (*LogReader, error) {
	if stream != Stdout && stream != Stderr {
		return nil, fmt.Errorf("%w: log stream must be %q or %q, got %q", ErrInvalidSpec, Stdout, Stderr, stream)
	}
	r := &LogReader{dir: dir, stream: stream, follow: follow, pending: offset}
	ok, err := r.init()
	if err != nil {
		return nil, err
	}
	if !ok && !follow {
		return nil, fmt.Errorf("%w: %s has no %s (the task has not started writing logs)", ErrNoLogs, dir, logMetaName)
	}
	r.ctx, r.cancel = context.WithCancel(ctx)
	return r, nil
}

// init reads the rotation settings and positions the reader; ok is false
// while they are not written yet.
func (r *LogReader) init() (ok bool, err error) {
	cfg, err := readLogMeta(r.dir)
	if errors.Is(err, fs.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, err
	}
	r.maxBytes = cfg.MaxFileBytes
	return true, r.seek(r.pending)
}

// seek positions the reader at a stream offset (negative: from the end).
func (r *LogReader) seek(offset int64) error {
	lo, hi, ok, err := logIndexes(r.dir, r.stream)
	if err != nil {
		return err
	}
	if !ok {
		r.idx = 0
		r.off.Store(0)
		return nil
	}
	start := int64(lo) * r.maxBytes
	if offset < 0 {
		var lastSize int64
		if st, err := os.Stat(logFileName(r.dir, r.stream, hi)); err == nil {
			lastSize = st.Size()
		}
		offset += int64(hi)*r.maxBytes + lastSize
	}
	offset = max(offset, start)
	r.idx = int(offset / r.maxBytes)
	r.off.Store(offset)
	return nil
}

// Offset is the stream offset of the next byte Read returns.
func (r *LogReader) Offset() int64 { return r.off.Load() }

// NewStamps returns the write times recorded since its last call (all kept
// ones at the first), in stream order, so that a follow reads each record
// once. Call it from the goroutine that calls Read.
func (r *LogReader) NewStamps() ([]LogStamp, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	lo, hi, ok, err := logIndexes(r.dir, r.stream)
	if err != nil || !ok {
		return nil, err
	}
	if r.stampIdx < lo {
		r.stampIdx, r.stampPos = lo, 0
	}
	var out []LogStamp
	for {
		b, err := readFrom(logTimesName(r.dir, r.stream, r.stampIdx), r.stampPos)
		if err != nil {
			return out, err
		}
		b = b[:len(b)/timeRecordBytes*timeRecordBytes] // a record being written is read next time
		r.stampPos += int64(len(b))
		out = append(out, decodeStamps(b)...)
		// Older files are complete: the writer closes a file's times before
		// it begins the next file.
		if r.stampIdx >= hi {
			return out, nil
		}
		r.stampIdx, r.stampPos = r.stampIdx+1, 0
	}
}

// readFrom reads a file from off to its end; a missing file reads empty.
func readFrom(name string, off int64) ([]byte, error) {
	f, err := os.Open(name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := f.Seek(off, io.SeekStart); err != nil {
		return nil, err
	}
	return io.ReadAll(f)
}

func decodeStamps(b []byte) []LogStamp {
	out := make([]LogStamp, 0, len(b)/timeRecordBytes)
	for ; len(b) >= timeRecordBytes; b = b[timeRecordBytes:] {
		out = append(out, LogStamp{
			Offset: int64(binary.LittleEndian.Uint64(b[:8])),
			Time:   time.Unix(0, int64(binary.LittleEndian.Uint64(b[8:16]))),
		})
	}
	return out
}

// LogStamp says that the byte at Offset of a stream, and those after it up
// to the next stamp, were written at Time.
type LogStamp struct {
	Offset int64
	Time   time.Time
}

// ReadLogStamps returns the write times of a stream's kept files, in stream
// order; none for files written before times were recorded.
func ReadLogStamps(dir, stream string) ([]LogStamp, error) {
	lo, hi, ok, err := logIndexes(dir, stream)
	if err != nil || !ok {
		return nil, err
	}
	var out []LogStamp
	for i := lo; i <= hi; i++ {
		b, err := os.ReadFile(logTimesName(dir, stream, i))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, err
		}
		out = append(out, decodeStamps(b)...) // a torn last record is left out
	}
	return out, nil
}

// open opens file r.idx at r.off; if it was deleted, it skips to the oldest
// file kept. It returns false when the file does not exist yet.
func (r *LogReader) open() (bool, error) {
	f, err := os.Open(logFileName(r.dir, r.stream, r.idx))
	if errors.Is(err, fs.ErrNotExist) {
		lo, _, ok, lerr := logIndexes(r.dir, r.stream)
		if lerr != nil {
			return false, lerr
		}
		if ok && lo > r.idx {
			// Rotated away while we were behind: continue at the oldest kept.
			r.idx = lo
			r.off.Store(int64(lo) * r.maxBytes)
			return r.open()
		}
		return false, nil
	}
	if err != nil {
		return false, err
	}
	if pos := r.off.Load() - int64(r.idx)*r.maxBytes; pos > 0 {
		if _, err := f.Seek(pos, io.SeekStart); err != nil {
			_ = f.Close()
			return false, err
		}
	}
	r.f = f
	return true, nil
}

// Read implements io.Reader.
func (r *LogReader) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	for {
		if err := r.ctx.Err(); err != nil {
			return 0, err
		}
		if r.maxBytes == 0 {
			ok, err := r.init()
			if err != nil {
				return 0, err
			}
			if !ok {
				if err := r.sleep(); err != nil {
					return 0, err
				}
				continue
			}
		}
		if r.f == nil {
			ok, err := r.open()
			if err != nil {
				return 0, err
			}
			if !ok {
				if exists(closedMarker(r.dir, r.stream)) {
					// Re-check: the file may have appeared before the marker.
					if ok, err = r.open(); err != nil || !ok {
						return 0, io.EOF
					}
				} else if !r.follow {
					return 0, io.EOF
				} else if err := r.sleep(); err != nil {
					return 0, err
				} else {
					continue
				}
			}
		}
		n, err := r.f.Read(p)
		if n > 0 {
			r.off.Add(int64(n))
			return n, nil
		}
		if err != nil && err != io.EOF {
			return 0, err
		}
		// At the end of the current file. The writer fills a file to
		// MaxFileBytes before it creates a newer one, and closes the last
		// one before it writes the marker, so once either exists, one more
		// read drains whatever was written since ours.
		_, hi, ok, err := logIndexes(r.dir, r.stream)
		if err != nil {
			return 0, err
		}
		next := ok && hi > r.idx
		done := !next && exists(closedMarker(r.dir, r.stream))
		if next || done {
			if n, _ := r.f.Read(p); n > 0 {
				r.off.Add(int64(n))
				return n, nil
			}
			if done {
				return 0, io.EOF
			}
			_ = r.f.Close()
			r.f = nil
			r.idx++
			r.off.Store(int64(r.idx) * r.maxBytes)
			continue
		}
		if !r.follow {
			return 0, io.EOF
		}
		if err := r.sleep(); err != nil {
			return 0, err
		}
	}
}

func (r *LogReader) sleep() error {
	t := time.NewTimer(logPollInterval)
	defer t.Stop()
	select {
	case <-r.ctx.Done():
		return r.ctx.Err()
	case <-t.C:
		return nil
	}
}

// Close ends the reader; a Read blocked in follow returns.
func (r *LogReader) Close() error {
	r.cancel()
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.f != nil {
		err := r.f.Close()
		r.f = nil
		return err
	}
	return nil
}
