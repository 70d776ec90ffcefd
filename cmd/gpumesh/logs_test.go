package main

import (
	"bytes"
	"sync"
	"testing"
	"time"

	pb "github.com/gpumesh/gpumesh/internal/controlpb"
)

func TestTailBuffer(t *testing.T) {
	for _, tc := range []struct {
		in    string
		lines int
		want  string
	}{
		{"a\nb\nc\n", 2, "b\nc\n"},
		{"a\nb\nc", 2, "b\nc"},
		{"a\nb\n", 5, "a\nb\n"},
		{"a\n\n\n", 2, "\n\n"},
		{"", 3, ""},
	} {
		tb := tailBuffer{lines: tc.lines}
		for i := range tc.in { // byte by byte: chunk borders do not matter
			tb.Write([]byte{tc.in[i]})
		}
		if got := string(tb.bytes()); got != tc.want {
			t.Errorf("tail %d of %q = %q, want %q", tc.lines, tc.in, got, tc.want)
		}
	}
	// Past the trimming threshold it still keeps exactly the last lines.
	tb := tailBuffer{lines: 2}
	line := bytes.Repeat([]byte("x"), 1023)
	for i := 0; i < 3000; i++ {
		tb.Write(append(line, '\n'))
	}
	tb.Write([]byte("last\n"))
	if got, want := string(tb.bytes()), string(line)+"\nlast\n"; got != want {
		t.Errorf("after 3 MiB: %d bytes, want %d", len(got), len(want))
	}
}

func TestLineWriterPrefixesWholeLines(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	a := &lineWriter{mu: &mu, w: &out, prefix: "[rank 0] "}
	b := &lineWriter{mu: &mu, w: &out, prefix: "[rank 1] "}
	a.Write([]byte("hel"))
	b.Write([]byte("one\ntw"))
	a.Write([]byte("lo\nworld\n"))
	b.Write([]byte("o"))
	a.flush()
	b.flush()
	want := "[rank 1] one\n[rank 0] hello\n[rank 0] world\n[rank 1] two\n"
	if out.String() != want {
		t.Fatalf("got %q, want %q", out.String(), want)
	}
	out.Reset()
	raw := &lineWriter{mu: &mu, w: &out}
	raw.Write([]byte("no prefix, no newline"))
	raw.flush()
	if out.String() != "no prefix, no newline" {
		t.Fatalf("one rank is copied as is: %q", out.String())
	}
}

// Stamped lines begin with the time of the write their first byte came in,
// whatever the chunk borders.
func TestLineWriterStamps(t *testing.T) {
	var mu sync.Mutex
	var out bytes.Buffer
	t0 := time.Date(2026, 12, 7, 5, 0, 0, 0, time.UTC)
	at := func(off int64, ms int) *pb.LogStamp {
		return &pb.LogStamp{Offset: off, UnixNano: t0.Add(time.Duration(ms) * time.Millisecond).UnixNano()}
	}
	lw := &lineWriter{mu: &mu, w: &out, prefix: "[rank 1] ", stamped: true}
	// Stream from offset 100: "a\nbb\n" written at +1ms, "c" at +2ms, "c\nd" at +3ms.
	chunks := []*pb.LogChunk{
		{Offset: 100, Data: []byte("a\nb"), Stamps: []*pb.LogStamp{at(100, 1)}},
		{Offset: 103, Data: []byte("b\nc"), Stamps: []*pb.LogStamp{at(100, 1), at(105, 2)}},
		{Offset: 106, Data: []byte("c\nd"), Stamps: []*pb.LogStamp{at(105, 2), at(106, 3)}},
	}
	for _, ch := range chunks {
		if err := lw.writeChunk(ch); err != nil {
			t.Fatal(err)
		}
	}
	lw.flush()
	want := "[rank 1] 2026-12-07T05:00:00.001Z a\n" +
		"[rank 1] 2026-12-07T05:00:00.001Z bb\n" +
		"[rank 1] 2026-12-07T05:00:00.002Z cc\n" +
		"[rank 1] 2026-12-07T05:00:00.003Z d\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
	// No stamps (a built-in rank, an older node): "-".
	out.Reset()
	lw = &lineWriter{mu: &mu, w: &out, stamped: true}
	lw.writeChunk(&pb.LogChunk{Data: []byte("x\n")})
	if out.String() != "- x\n" {
		t.Fatalf("unstamped: %q", out.String())
	}
}
