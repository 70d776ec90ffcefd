package poll

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"
)

func TestUntilHolds(t *testing.T) {
	n := 0
	Until(t, 10*time.Second, func() bool { n++; return n == 3 })
	m := 0
	Until(t, 10*time.Second, func() (bool, string) { m++; return m == 3, "not yet" })
	k := 0
	Until(t, 10*time.Second, func() error {
		if k++; k < 3 {
			return errors.New("not yet")
		}
		return nil
	})
	if n != 3 || m != 3 || k != 3 {
		t.Fatalf("conditions evaluated %d, %d, %d times; want 3 each", n, m, k)
	}
}

// fakeTB records a failure instead of ending the test.
type fakeTB struct {
	testing.TB
	failed string
}

func (f *fakeTB) Helper()                           {}
func (f *fakeTB) Fatalf(format string, args ...any) { f.failed = fmt.Sprintf(format, args...) }

func TestUntilFailsWithTheLastMessage(t *testing.T) {
	for name, run := range map[string]func(tb testing.TB){
		"bool": func(tb testing.TB) { Until(tb, 20*time.Millisecond, func() bool { return false }, "the %s", "answer") },
		"string": func(tb testing.TB) {
			Until(tb, 20*time.Millisecond, func() (bool, string) { return false, "3 of 4 up" }, "the answer")
		},
		"error": func(tb testing.TB) { Until(tb, 20*time.Millisecond, func() error { return errors.New("3 of 4 up") }) },
	} {
		f := &fakeTB{}
		run(f)
		want := "3 of 4 up"
		if name == "bool" {
			want = "the answer: still false"
		}
		if !strings.Contains(f.failed, "within 20ms") || !strings.Contains(f.failed, want) {
			t.Errorf("%s: failure %q, want the timeout and %q", name, f.failed, want)
		}
	}
}
