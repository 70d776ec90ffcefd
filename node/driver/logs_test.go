package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

func writeAll(t *testing.T, w *rotatingWriter, p []byte) {
	t.Helper()
	if n, err := w.Write(p); err != nil || n != len(p) {
		t.Fatalf("write: n=%d err=%v", n, err)
	}
}

func pattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte('a' + i%26)
	}
	return b
}

func TestRotatingWriterCutsAndPrunes(t *testing.T) {
	dir := t.TempDir()
	cfg := LogConfig{MaxFileBytes: 10, MaxFiles: 3}
	if err := writeLogMeta(dir, cfg); err != nil {
		t.Fatal(err)
	}
	w, err := openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(57)
	writeAll(t, w, data[:7])
	writeAll(t, w, data[7:33]) // spans three files
	writeAll(t, w, data[33:])
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	lo, hi, ok, err := logIndexes(dir, Stdout)
	if err != nil || !ok || lo != 3 || hi != 5 {
		t.Fatalf("indexes lo=%d hi=%d ok=%v err=%v, want 3..5", lo, hi, ok, err)
	}
	for i := lo; i <= hi; i++ {
		b, err := os.ReadFile(logFileName(dir, Stdout, i))
		if err != nil {
			t.Fatal(err)
		}
		want := data[i*10 : min((i+1)*10, len(data))]
		if !bytes.Equal(b, want) {
			t.Errorf("file %d = %q, want %q", i, b, want)
		}
	}
	// From the start: begins at the oldest byte kept (offset 30).
	r, err := Logs(context.Background(), dir, Stdout, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	if r.Offset() != 30 {
		t.Errorf("offset = %d, want 30", r.Offset())
	}
	got, err := io.ReadAll(r)
	if err != nil || !bytes.Equal(got, data[30:]) {
		t.Errorf("read %q (err %v), want %q", got, err, data[30:])
	}
	if r.Offset() != 57 {
		t.Errorf("end offset = %d, want 57", r.Offset())
	}
	_ = r.Close()
	// Tail: the last 12 bytes, across a file boundary.
	r, err = Logs(context.Background(), dir, Stdout, false, -12)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(r)
	if !bytes.Equal(got, data[45:]) {
		t.Errorf("tail = %q, want %q", got, data[45:])
	}
	_ = r.Close()
	// A given offset inside a file.
	r, err = Logs(context.Background(), dir, Stdout, false, 44)
	if err != nil {
		t.Fatal(err)
	}
	got, _ = io.ReadAll(r)
	if !bytes.Equal(got, data[44:]) {
		t.Errorf("from 44 = %q, want %q", got, data[44:])
	}
	_ = r.Close()
	// Reopening continues the newest file.
	w, err = openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	if w.idx != 5 || w.size != 7 {
		t.Errorf("reopened at file %d size %d, want 5 and 7", w.idx, w.size)
	}
	if exists(closedMarker(dir, Stdout)) {
		t.Error("reopening must clear the closed marker")
	}
	_ = w.Close()
}

func TestLogsFollowAcrossRotation(t *testing.T) {
	dir := t.TempDir()
	cfg := LogConfig{MaxFileBytes: 64, MaxFiles: 1000}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// The reader opens before the task has written anything, even its
	// rotation settings.
	r, err := Logs(ctx, dir, Stdout, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := writeLogMeta(dir, cfg); err != nil {
		t.Fatal(err)
	}
	w, err := openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var want bytes.Buffer
	got := make(chan []byte, 1)
	go func() {
		b, err := io.ReadAll(r)
		if err != nil {
			b = append(b, []byte(fmt.Sprintf("<read error: %v>", err))...)
		}
		got <- b
	}()
	// Lines, written while the reader follows; each line confirmed read
	// before the next, so reads interleave with rotation.
	for i := range 40 {
		line := fmt.Appendf(nil, "line %03d %s\n", i, bytes.Repeat([]byte{'x'}, i%17))
		writeAll(t, w, line)
		want.Write(line)
		target := int64(want.Len())
		poll.Until(t, 10*time.Second, func() bool { return r.Offset() >= target }, "reader to reach offset %d", target)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case b := <-got:
		if !bytes.Equal(b, want.Bytes()) {
			t.Fatalf("follow read %d bytes %q\nwant %d bytes", len(b), b, want.Len())
		}
	case <-ctx.Done():
		t.Fatal("follow did not end after the stream was closed")
	}
	_, hi, _, _ := logIndexes(dir, Stdout)
	if hi < 5 {
		t.Fatalf("test did not rotate enough: newest file %d", hi)
	}
}

func TestLogsFollowSkipsPrunedFiles(t *testing.T) {
	dir := t.TempDir()
	cfg := LogConfig{MaxFileBytes: 10, MaxFiles: 2}
	if err := writeLogMeta(dir, cfg); err != nil {
		t.Fatal(err)
	}
	w, err := openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeAll(t, w, pattern(5))
	r, err := Logs(context.Background(), dir, Stdout, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b := make([]byte, 3)
	if n, err := r.Read(b); n != 3 || err != nil {
		t.Fatalf("read n=%d err=%v", n, err)
	}
	// The reader holds file 0 open; the writer moves on and deletes it.
	data := pattern(45)
	writeAll(t, w, data[5:])
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	rest, err := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	// File 0 is still readable through the open descriptor; files 1 and 2
	// are gone, so the reader continues at file 3 (offset 30).
	want := append(append([]byte{}, data[3:10]...), data[30:]...)
	if !bytes.Equal(rest, want) {
		t.Fatalf("got %q, want %q", rest, want)
	}
}

func TestLogsErrors(t *testing.T) {
	dir := t.TempDir()
	if _, err := Logs(context.Background(), dir, Stdout, false, 0); !errors.Is(err, ErrNoLogs) {
		t.Errorf("no meta: err = %v, want ErrNoLogs", err)
	}
	if _, err := Logs(context.Background(), dir, "stdin", false, 0); !errors.Is(err, ErrInvalidSpec) {
		t.Errorf("bad stream: err = %v", err)
	}
	// Follow on an empty, open stream stops when the context ends or the
	// reader is closed.
	if err := writeLogMeta(dir, DefaultLogConfig()); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r, err := Logs(ctx, dir, Stderr, true, 0)
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() { _, err := r.Read(make([]byte, 10)); errc <- err }()
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("read after cancel: err = %v", err)
	}
	_ = r.Close()
	if _, err := os.Stat(filepath.Join(dir, logMetaName)); err != nil {
		t.Fatal(err)
	}
}

// Every write is stamped at the stream offset of its first byte in each
// file it lands in; stamps of pruned files go with them.
func TestLogStamps(t *testing.T) {
	dir := t.TempDir()
	cfg := LogConfig{MaxFileBytes: 10, MaxFiles: 2}
	if err := writeLogMeta(dir, cfg); err != nil {
		t.Fatal(err)
	}
	w, err := openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	data := pattern(35)
	writeAll(t, w, data[:4])   // 0..4 in file 0
	writeAll(t, w, data[4:23]) // 4..10 in file 0, 10..20 in 1, 20..23 in 2
	writeAll(t, w, data[23:])  // 23..30 in 2, 30..35 in 3
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	stamps, err := ReadLogStamps(dir, Stdout)
	if err != nil {
		t.Fatal(err)
	}
	// Files 2 and 3 are kept.
	var offs []int64
	for i, s := range stamps {
		offs = append(offs, s.Offset)
		if i > 0 && s.Time.Before(stamps[i-1].Time) {
			t.Errorf("stamp %d goes back in time: %v after %v", i, s.Time, stamps[i-1].Time)
		}
		if time.Since(s.Time) > time.Hour || time.Until(s.Time) > time.Minute {
			t.Errorf("stamp %d: %v is not now", i, s.Time)
		}
	}
	if fmt.Sprint(offs) != "[20 23 30]" {
		t.Fatalf("stamp offsets %v, want [20 23 30]", offs)
	}
	if _, err := os.Stat(logTimesName(dir, Stdout, 1)); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("times of pruned file 1: %v", err)
	}
	// A follower reads each record once.
	r, err := Logs(context.Background(), dir, Stdout, false, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got, err := r.NewStamps(); err != nil || len(got) != 3 {
		t.Fatalf("first NewStamps: %v %v, want 3", got, err)
	}
	if got, err := r.NewStamps(); err != nil || len(got) != 0 {
		t.Fatalf("NewStamps with nothing new: %v %v", got, err)
	}
	w, err = openRotatingWriter(dir, Stdout, cfg)
	if err != nil {
		t.Fatal(err)
	}
	writeAll(t, w, pattern(8)) // 35..40 in file 3, 40..43 in file 4
	if got, err := r.NewStamps(); err != nil || fmt.Sprint(stampOffsets(got)) != "[35 40]" {
		t.Fatalf("NewStamps after two more writes: %v %v, want offsets [35 40]", stampOffsets(got), err)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	// A torn last record is left out.
	f, err := os.OpenFile(logTimesName(dir, Stdout, 3), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.Write([]byte{1, 2, 3})
	f.Close()
	if again, err := ReadLogStamps(dir, Stdout); err != nil || fmt.Sprint(stampOffsets(again)) != "[30 35 40]" {
		t.Fatalf("with a torn record: %v, %v; want offsets [30 35 40]", stampOffsets(again), err)
	}
}

func stampOffsets(st []LogStamp) []int64 {
	var out []int64
	for _, s := range st {
		out = append(out, s.Offset)
	}
	return out
}
