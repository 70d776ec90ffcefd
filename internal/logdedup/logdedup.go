// Package logdedup wraps an hclog.Logger so that a warning or error that
// repeats (the same logger name, level, message and textual arguments)
// is written once per window: the first occurrence at once, the repeats
// counted, and the next occurrence after the window written with
// "repeated" = how many were held back. Raft, for one, logs a failed
// heartbeat to a dead voter about eight times a second; an operator needs
// one line and a count, not a thousand lines.
//
// Numbers, durations and times do not count towards "the same" (raft's
// "backoff time" grows with every failure); strings, errors and other
// values do (a heartbeat failing to another peer is a new line). Info,
// debug and trace pass through untouched.
package logdedup

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// DefaultWindow is how long repeats are held back.
const DefaultWindow = 30 * time.Second

// maxKeys bounds the memory of distinct messages; past it the oldest
// window's entries are dropped.
const maxKeys = 4096

// state is shared by a logger and every logger derived from it.
type state struct {
	mu     sync.Mutex
	window time.Duration
	now    func() time.Time
	seen   map[string]*entry
}

type entry struct {
	last   time.Time // when it was last written
	repeat int       // occurrences held back since then
}

// Logger is the deduplicating wrapper.
type Logger struct {
	hclog.Logger
	st *state
}

var _ hclog.Logger = (*Logger)(nil)

// New wraps l; window <= 0 means DefaultWindow.
func New(l hclog.Logger, window time.Duration) *Logger {
	if window <= 0 {
		window = DefaultWindow
	}
	return &Logger{Logger: l, st: &state{window: window, now: time.Now, seen: map[string]*entry{}}}
}

// SetClock replaces the clock (tests).
func (l *Logger) SetClock(now func() time.Time) {
	l.st.mu.Lock()
	l.st.now = now
	l.st.mu.Unlock()
}

// admit says whether to write this occurrence, and how many repeats were
// held back before it.
func (l *Logger) admit(level hclog.Level, msg string, args []any) (bool, int) {
	if level < hclog.Warn {
		return true, 0
	}
	key := l.key(level, msg, args)
	st := l.st
	st.mu.Lock()
	defer st.mu.Unlock()
	now := st.now()
	e, ok := st.seen[key]
	if !ok {
		if len(st.seen) >= maxKeys {
			for k, old := range st.seen {
				if now.Sub(old.last) >= st.window {
					delete(st.seen, k)
				}
			}
			if len(st.seen) >= maxKeys {
				return true, 0 // too many distinct lines to track: write them all
			}
		}
		st.seen[key] = &entry{last: now}
		return true, 0
	}
	if now.Sub(e.last) < st.window {
		e.repeat++
		return false, 0
	}
	n := e.repeat
	e.last, e.repeat = now, 0
	return true, n
}

func (l *Logger) key(level hclog.Level, msg string, args []any) string {
	var b strings.Builder
	b.WriteString(l.Logger.Name())
	b.WriteByte(0)
	b.WriteString(level.String())
	b.WriteByte(0)
	b.WriteString(msg)
	for i := 0; i+1 < len(args); i += 2 {
		switch args[i+1].(type) {
		case int, int8, int16, int32, int64, uint, uint8, uint16, uint32, uint64, float32, float64,
			time.Duration, time.Time:
			continue
		}
		fmt.Fprintf(&b, "\x00%v=%v", args[i], args[i+1])
	}
	return b.String()
}

func withRepeats(args []any, n int) []any {
	if n == 0 {
		return args
	}
	return append(append([]any{}, args...), "repeated", n)
}

// Log implements hclog.Logger.
func (l *Logger) Log(level hclog.Level, msg string, args ...any) {
	if ok, n := l.admit(level, msg, args); ok {
		l.Logger.Log(level, msg, withRepeats(args, n)...)
	}
}

// Warn implements hclog.Logger.
func (l *Logger) Warn(msg string, args ...any) { l.Log(hclog.Warn, msg, args...) }

// Error implements hclog.Logger.
func (l *Logger) Error(msg string, args ...any) { l.Log(hclog.Error, msg, args...) }

// Named implements hclog.Logger; the new logger shares the repeat counts.
func (l *Logger) Named(name string) hclog.Logger {
	return &Logger{Logger: l.Logger.Named(name), st: l.st}
}

// ResetNamed implements hclog.Logger.
func (l *Logger) ResetNamed(name string) hclog.Logger {
	return &Logger{Logger: l.Logger.ResetNamed(name), st: l.st}
}

// With implements hclog.Logger.
func (l *Logger) With(args ...any) hclog.Logger {
	return &Logger{Logger: l.Logger.With(args...), st: l.st}
}
