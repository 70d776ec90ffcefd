//go:build linux

package cuda

import (
	"sync"
	"syscall"
	"testing"
)

// Every function, and the setup, runs on the one OS thread of the issuer
// (where a device's context is current), whichever goroutine submits it.
func TestIssuerUsesOneThread(t *testing.T) {
	var setupTid int
	q, err := NewIssuer(DefaultIssuerConfig(), func() error { setupTid = syscall.Gettid(); return nil })
	if err != nil {
		t.Fatal(err)
	}
	defer q.Close()
	tids := map[int]int{}
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				_ = q.Do(func() error { tids[syscall.Gettid()]++; return nil })
			}
		}()
	}
	wg.Wait()
	if len(tids) != 1 || tids[setupTid] != 800 {
		t.Fatalf("functions ran on threads %v, setup on %d; want all 800 on the setup's thread", tids, setupTid)
	}
}
