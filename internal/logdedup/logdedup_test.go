package logdedup

import (
	"bytes"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) now() time.Time           { c.mu.Lock(); defer c.mu.Unlock(); return c.t }
func (c *clock) add(d time.Duration)      { c.mu.Lock(); c.t = c.t.Add(d); c.mu.Unlock() }
func lines(b *bytes.Buffer) []string      { return strings.Split(strings.TrimSpace(b.String()), "\n") }
func count(b *bytes.Buffer, s string) int { return strings.Count(b.String(), s) }

func newTest(t *testing.T) (*Logger, *bytes.Buffer, *clock) {
	var buf bytes.Buffer
	base := hclog.New(&hclog.LoggerOptions{Name: "gpumesh", Output: &buf, Level: hclog.Trace})
	l := New(base, 10*time.Second)
	c := &clock{t: time.Unix(1000, 0)}
	l.SetClock(c.now)
	return l, &buf, c
}

// Raft's heartbeat failure to a dead voter, eight times a second for two
// minutes, is 12 lines with counts, not 960.
func TestRepeatedErrorsCollapse(t *testing.T) {
	l, buf, c := newTest(t)
	raft := l.Named("raft")
	err := errors.New("dial tcp 127.0.0.3:7948: connect: connection refused")
	for i := 0; i < 960; i++ {
		raft.Error("failed to heartbeat to", "peer", "127.0.0.3:7948", "backoff time", time.Duration(i)*time.Millisecond, "error", err)
		c.add(125 * time.Millisecond)
	}
	if n := count(buf, "failed to heartbeat"); n != 12 {
		t.Fatalf("%d lines for 960 repeats over 2 minutes, want 12:\n%s", n, buf)
	}
	if !strings.Contains(lines(buf)[1], "repeated=79") {
		t.Fatalf("second line does not count the held-back repeats: %s", lines(buf)[1])
	}
	// Another peer's failure is news; so are info lines.
	raft.Error("failed to heartbeat to", "peer", "127.0.0.4:7948", "error", err)
	l.Info("agent started")
	l.Info("agent started")
	if count(buf, "127.0.0.4") != 1 || count(buf, "agent started") != 2 {
		t.Fatalf("distinct errors or info lines were held back:\n%s", buf)
	}
	// Derived loggers share the counts.
	l.Named("raft").Error("failed to heartbeat to", "peer", "127.0.0.4:7948", "error", err)
	l.With("x", 1).Named("raft").Warn("w")
	if count(buf, "127.0.0.4") != 1 {
		t.Fatalf("a derived logger repeated a held-back error:\n%s", buf)
	}
}
