package main

import (
	"fmt"
	"io"
	"os"
	"strings"
	"sync"
	"time"
)

// progress draws a one-line progress bar for long runs (benchmarks) when w
// is a terminal, redrawn at most every 100 ms; elsewhere (pipes, files, CI
// logs) it prints nothing, so machine-readable output stays clean.
//
//	p := newProgress(cmd.ErrOrStderr(), "all-reduce 64 MiB", int64(iters))
//	for i := 0; i < iters; i++ { ...; p.Add(1) }
//	p.Done()
//
// With total 0 the amount is unknown: the line shows the count and the
// elapsed time instead of a bar. Safe for concurrent use.
type progress struct {
	w     io.Writer
	tty   bool
	label string
	total int64
	start time.Time
	now   func() time.Time

	mu     sync.Mutex
	done   int64
	drawn  time.Time
	closed bool
}

// progressWidth is the bar's width in cells.
const progressWidth = 30

func newProgress(w io.Writer, label string, total int64) *progress {
	return &progress{w: w, tty: isTerminal(w), label: label, total: total, start: time.Now(), now: time.Now}
}

// isTerminal says whether w is a character device (a terminal).
func isTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	if !ok {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Mode()&os.ModeCharDevice != 0
}

// Add advances by n.
func (p *progress) Add(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done += n
	p.drawLocked(false)
}

// Set moves to n.
func (p *progress) Set(n int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = n
	p.drawLocked(false)
}

// Done draws the final state and ends the line. Later calls do nothing.
func (p *progress) Done() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.drawLocked(true)
	p.closed = true
	if p.tty {
		fmt.Fprintln(p.w)
	}
}

func (p *progress) drawLocked(force bool) {
	if !p.tty || p.closed {
		return
	}
	now := p.now()
	if !force && now.Sub(p.drawn) < 100*time.Millisecond {
		return
	}
	p.drawn = now
	fmt.Fprint(p.w, "\r"+p.line(now)+"\x1b[K")
}

// line renders the current state (without control characters).
func (p *progress) line(now time.Time) string {
	elapsed := now.Sub(p.start).Round(100 * time.Millisecond)
	if p.total <= 0 {
		return fmt.Sprintf("%s  %d done  %s", p.label, p.done, elapsed)
	}
	frac := float64(p.done) / float64(p.total)
	frac = max(0, min(1, frac))
	full := int(frac * progressWidth)
	bar := strings.Repeat("█", full) + strings.Repeat("░", progressWidth-full)
	eta := ""
	if p.done > 0 && p.done < p.total {
		left := time.Duration(float64(now.Sub(p.start)) * (1 - frac) / frac).Round(time.Second)
		eta = fmt.Sprintf("  ~%s left", left)
	}
	return fmt.Sprintf("%s %s %3.0f%%  %d/%d  %s%s", p.label, bar, 100*frac, p.done, p.total, elapsed, eta)
}

// tickProgress redraws an unknown-length progress (elapsed time) every
// interval until the returned stop is called; stop ends the line. For
// runs that report no steps of their own.
func tickProgress(w io.Writer, label string, interval time.Duration) (stop func()) {
	p := newProgress(w, label, 0)
	if !p.tty {
		return func() {}
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(interval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				p.mu.Lock()
				p.drawLocked(true)
				p.mu.Unlock()
			}
		}
	}()
	var once sync.Once
	return func() {
		once.Do(func() {
			close(quit)
			wg.Wait()
			p.Done()
		})
	}
}
