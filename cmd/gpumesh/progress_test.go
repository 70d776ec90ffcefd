package main

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

func TestProgressLine(t *testing.T) {
	start := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	p := &progress{label: "bench", total: 10, start: start, now: func() time.Time { return start }}
	p.done = 5
	got := p.line(start.Add(10 * time.Second))
	for _, want := range []string{"bench", " 50%", "5/10", "10s", "~10s left", strings.Repeat("█", 15) + strings.Repeat("░", 15)} {
		if !strings.Contains(got, want) {
			t.Errorf("line %q lacks %q", got, want)
		}
	}
	p.done = 10
	if got := p.line(start.Add(20 * time.Second)); !strings.Contains(got, "100%") || strings.Contains(got, "left") {
		t.Errorf("finished line %q", got)
	}
	unknown := &progress{label: "x", start: start}
	unknown.done = 3
	if got := unknown.line(start.Add(1500 * time.Millisecond)); got != "x  3 done  1.5s" {
		t.Errorf("unknown-total line %q", got)
	}
}

func TestProgressSilentWhenNotATerminal(t *testing.T) {
	var buf bytes.Buffer
	p := newProgress(&buf, "bench", 3)
	p.Add(1)
	p.Set(3)
	p.Done()
	p.Done()
	stop := tickProgress(&buf, "bench", time.Millisecond)
	stop()
	stop()
	if buf.Len() != 0 {
		t.Fatalf("progress wrote %q to a non-terminal", buf.String())
	}
}
