package cuda

import (
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// issuerConfigs are the spinning defaults and the sleeping extreme (every
// hand-over through the channels).
var issuerConfigs = map[string]IssuerConfig{"spin": DefaultIssuerConfig(), "sleep": {}}

// Functions from many goroutines run one at a time, each goroutine's in its
// submission order, each Do returning its own function's error.
func TestIssuerRunsInSubmissionOrder(t *testing.T) {
	for name, cfg := range issuerConfigs {
		t.Run(name, func(t *testing.T) {
			q, err := NewIssuer(cfg, nil)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Close()
			const submitters, each = 16, 200
			var ran [][2]int // touched only by the issuing thread until every Do returned
			running := 0     // functions running at once (only ever 1)
			var wg sync.WaitGroup
			errs := make(chan error, submitters)
			for g := 0; g < submitters; g++ {
				wg.Add(1)
				go func(g int) {
					defer wg.Done()
					for i := 0; i < each; i++ {
						want := fmt.Errorf("g%d/%d", g, i)
						got := q.Do(func() error {
							running++
							defer func() { running-- }()
							if running != 1 {
								return errors.New("two functions ran at once")
							}
							ran = append(ran, [2]int{g, i})
							return want
						})
						if got != want {
							errs <- fmt.Errorf("submitter %d call %d got error %v, want its own %v", g, i, got, want)
							return
						}
					}
				}(g)
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			if len(ran) != submitters*each {
				t.Fatalf("%d functions ran, want %d", len(ran), submitters*each)
			}
			next := make([]int, submitters)
			for _, r := range ran {
				if r[1] != next[r[0]] {
					t.Fatalf("submitter %d: call %d ran when %d was due", r[0], r[1], next[r[0]])
				}
				next[r[0]]++
			}
			if st := q.Stats(); st.Issued != submitters*each || st.Batches < 1 || st.Batches > st.Issued {
				t.Fatalf("stats %+v, want %d issued in 1..%d batches", st, submitters*each, submitters*each)
			}
		})
	}
}

// Setup runs first, on the issuing thread; its error is NewIssuer's.
func TestIssuerSetup(t *testing.T) {
	bad := errors.New("no context")
	if q, err := NewIssuer(DefaultIssuerConfig(), func() error { return bad }); !errors.Is(err, bad) || q != nil {
		t.Fatalf("NewIssuer with a failing setup = %v, %v; want nil, %v", q, err, bad)
	}
	order := []string{}
	q, err := NewIssuer(DefaultIssuerConfig(), func() error { order = append(order, "setup"); return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	if err := q.Do(func() error { order = append(order, "fn"); return nil }); err != nil {
		t.Fatal(err)
	}
	if fmt.Sprint(order) != "[setup fn]" {
		t.Fatalf("ran %v, want setup then fn", order)
	}
	if _, err := NewIssuer(IssuerConfig{Spin: -time.Second}, nil); !errors.Is(err, ErrBadArgument) {
		t.Fatalf("negative spin: %v, want ErrBadArgument", err)
	}
}

// Close lets queued work finish, then refuses more; it may be called twice.
func TestIssuerClose(t *testing.T) {
	q, err := NewIssuer(IssuerConfig{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	started, release := make(chan struct{}), make(chan struct{})
	first := make(chan error, 1)
	go func() {
		first <- q.Do(func() error { close(started); <-release; return nil })
	}()
	<-started
	// queued behind the running function, then Close is called
	second := make(chan error, 1)
	ranSecond := false
	go func() { second <- q.Do(func() error { ranSecond = true; return nil }) }()
	poll.Until(t, 10*time.Second, func() bool { return q.queued.Load() == 1 }, "second function queued")
	closed := make(chan struct{})
	go func() { q.Close(); close(closed) }()
	close(release)
	<-closed
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	if err := <-second; err != nil || !ranSecond {
		t.Fatalf("work queued before Close: ran %v, err %v", ranSecond, err)
	}
	if err := q.Do(func() error { t.Error("ran after Close"); return nil }); !errors.Is(err, ErrClosed) {
		t.Fatalf("Do after Close = %v, want ErrClosed", err)
	}
	q.Close()
}

// BenchmarkIssuerDo is the cost of one hand-over to the issuing thread and
// back (an empty function), from 1 and from 16 goroutines at once.
func BenchmarkIssuerDo(b *testing.B) {
	for name, cfg := range issuerConfigs {
		for _, g := range []int{1, 16} {
			b.Run(fmt.Sprintf("%s/goroutines=%d", name, g), func(b *testing.B) {
				q, err := NewIssuer(cfg, nil)
				if err != nil {
					b.Fatal(err)
				}
				defer q.Close()
				b.SetParallelism(g)
				b.RunParallel(func(pb *testing.PB) {
					for pb.Next() {
						_ = q.Do(func() error { return nil })
					}
				})
			})
		}
	}
}
