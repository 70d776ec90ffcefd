package main

import (
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	vegeta "github.com/tsenart/vegeta/v12/lib"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// loadRun is a steady load (vegeta, keep-alive, 10 s timeout) on one
// target, recorded as it goes: the service e2e tests send one through a
// router while they move, update or scale replicas.
type loadRun struct {
	attacker *vegeta.Attacker
	done     chan struct{}

	mu      sync.Mutex
	metrics vegeta.Metrics
	errs    []string // the first failures, for the verdict
	// each, when set, sees every result (under mu) as it comes.
	each func(*vegeta.Result)
}

// postTarget is a POST of body (JSON) to url.
func postTarget(url, body string) vegeta.Target {
	return vegeta.Target{Method: http.MethodPost, URL: url, Body: []byte(body), Header: http.Header{"Content-Type": {"application/json"}}}
}

// startLoad sends target at rate requests/s until stop (also called at the
// end of the test). each, if not nil, sees every result under the run's
// lock.
func startLoad(t *testing.T, name string, target vegeta.Target, rate int, each func(*vegeta.Result)) *loadRun {
	t.Helper()
	l := &loadRun{attacker: vegeta.NewAttacker(vegeta.Timeout(10*time.Second), vegeta.KeepAlive(true)), done: make(chan struct{}), each: each}
	results := l.attacker.Attack(vegeta.NewStaticTargeter(target), vegeta.Rate{Freq: rate, Per: time.Second}, 0, name)
	go func() {
		defer close(l.done)
		for res := range results {
			l.mu.Lock()
			l.metrics.Add(res)
			if res.Code != http.StatusOK && len(l.errs) < 20 {
				l.errs = append(l.errs, fmt.Sprintf("%s: %d %s %s", res.Timestamp.Format("15:04:05.000"), res.Code, res.Error, strings.TrimSpace(string(res.Body))))
			}
			if l.each != nil {
				l.each(res)
			}
			l.mu.Unlock()
		}
	}()
	t.Cleanup(l.stop)
	return l
}

// locked runs f under the run's lock (to change what each reads).
func (l *loadRun) locked(f func()) {
	l.mu.Lock()
	defer l.mu.Unlock()
	f()
}

// requests returns how many requests have been answered so far.
func (l *loadRun) requests() uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.metrics.Requests
}

// waitMore waits until n more requests than now have been answered.
func (l *loadRun) waitMore(t *testing.T, n uint64, timeout time.Duration) {
	t.Helper()
	from := l.requests()
	poll.Until(t, timeout, func() error {
		if got := l.requests() - from; got < n {
			return fmt.Errorf("%d of %d more requests answered", got, n)
		}
		return nil
	})
}

// stop ends the load and waits for every answer; it may be called twice.
func (l *loadRun) stop() {
	l.attacker.Stop()
	<-l.done
}

// verdict stops the load and fails the test unless at least min requests
// were sent and every one succeeded; it returns the closed metrics.
func (l *loadRun) verdict(t *testing.T, min uint64) *vegeta.Metrics {
	t.Helper()
	l.stop()
	l.mu.Lock()
	defer l.mu.Unlock()
	l.metrics.Close()
	m := &l.metrics
	if m.Requests < min {
		t.Fatalf("only %d requests were sent, want at least %d", m.Requests, min)
	}
	if m.Success != 1 {
		failed := m.Requests - uint64(m.Success*float64(m.Requests)+0.5)
		t.Fatalf("%d of %d requests failed; first failures:\n%s", failed, m.Requests, strings.Join(l.errs, "\n"))
	}
	return m
}
