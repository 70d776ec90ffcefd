// Package poll is how gpumesh's tests wait: poll a condition until it holds
// or a deadline passes, then fail the test with what the condition last
// said. Tests never sleep a fixed time instead.
package poll

import (
	"fmt"
	"testing"
	"time"
)

// Cond is a condition to wait for: true (with an optional description of
// what is still missing) or nil when it holds.
type Cond interface {
	~func() bool | ~func() (bool, string) | ~func() error
}

// maxInterval caps the back-off between two evaluations of a condition
// (conditions that run a process or an RPC must not spin).
const maxInterval = 50 * time.Millisecond

// Until evaluates cond, 1 ms after the last evaluation at first and backing
// off to 50 ms, until it holds, and fails tb if it still does not after
// timeout. The message names the timeout, what (a format and its
// arguments, if given) and cond's last description or error.
func Until[C Cond](tb testing.TB, timeout time.Duration, cond C, what ...any) {
	tb.Helper()
	if err := check(timeout, cond); err != nil {
		if len(what) > 0 {
			if f, ok := what[0].(string); ok {
				err = fmt.Errorf("%s: %w", fmt.Sprintf(f, what[1:]...), err)
			}
		}
		tb.Fatalf("condition not met within %s: %v", timeout, err)
	}
}

func check[C Cond](timeout time.Duration, cond C) error {
	deadline := time.Now().Add(timeout)
	interval := time.Millisecond
	for {
		err := eval(cond)
		if err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return err
		}
		time.Sleep(interval)
		interval = min(2*interval, maxInterval)
	}
}

func eval[C Cond](cond C) error {
	switch c := any(cond).(type) {
	case func() bool:
		if c() {
			return nil
		}
		return fmt.Errorf("still false")
	case func() (bool, string):
		if ok, msg := c(); !ok {
			return fmt.Errorf("%s", msg)
		}
		return nil
	case func() error:
		return c()
	}
	panic(fmt.Sprintf("poll: condition of type %T", cond))
}
