package main

import (
	"bytes"
	"sync"
	"testing"
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
