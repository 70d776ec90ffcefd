// Package meshtest starts in-process gossip meshes on 127.0.0.1 (or on
// an in-memory mesh.MemNetwork) for tests of mesh and of the packages built on it: configs with short timeouts,
// loggers that write to the test log, a cluster helper and wait helpers
// that poll a condition with a deadline (never a bare sleep).
package meshtest

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gpumesh/gpumesh/internal/poll"
	"github.com/gpumesh/gpumesh/mesh"
)

// Logger returns an hclog logger that writes to tb.Log until the test's
// cleanup ends (later lines, from goroutines still winding down, are
// dropped instead of failing the test).
func Logger(tb testing.TB, name string) hclog.Logger {
	w := &tbWriter{tb: tb}
	tb.Cleanup(w.close) // registered first, so it runs after every later Cleanup
	return hclog.New(&hclog.LoggerOptions{Name: name, Level: hclog.Debug, Output: w})
}

type tbWriter struct {
	mu     sync.Mutex
	tb     testing.TB
	closed bool
}

func (w *tbWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.closed {
		w.tb.Helper()
		w.tb.Log(strings.TrimRight(string(p), "\n"))
	}
	return len(p), nil
}

func (w *tbWriter) close() {
	w.mu.Lock()
	w.closed = true
	w.mu.Unlock()
}

// Config returns mesh.DefaultLocalConfig for a node called name (ID
// "id-"+name), logging to the test log.
func Config(tb testing.TB, name string) mesh.Config {
	c := mesh.DefaultLocalConfig()
	c.NodeName, c.NodeID = name, "id-"+name
	c.Logger = Logger(tb, name)
	return c
}

// New starts one node and shuts it down when the test ends.
func New(tb testing.TB, cfg mesh.Config) *mesh.Mesh {
	tb.Helper()
	m, err := mesh.New(cfg)
	if err != nil {
		tb.Fatalf("mesh.New(%s): %v", cfg.NodeName, err)
	}
	tb.Cleanup(func() { _ = m.Shutdown() })
	return m
}

// StartCluster starts n nodes named prefix0..prefix(n-1), joins every
// other node to the first, and waits until every node lists all n alive.
// modify, if not nil, edits each node's config first.
func StartCluster(tb testing.TB, prefix string, n int, modify func(i int, c *mesh.Config)) []*mesh.Mesh {
	tb.Helper()
	ms := make([]*mesh.Mesh, n)
	for i := range ms {
		c := Config(tb, fmt.Sprintf("%s%d", prefix, i))
		if modify != nil {
			modify(i, &c)
		}
		ms[i] = New(tb, c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for _, m := range ms[1:] {
		if _, err := m.Join(ctx, []string{ms[0].Addr()}); err != nil {
			tb.Fatalf("%s: join %s: %v", m.Name(), ms[0].Addr(), err)
		}
	}
	WaitConverged(tb, ms, n)
	return ms
}

// WaitConverged waits until every mesh in ms lists exactly want alive
// members.
func WaitConverged(tb testing.TB, ms []*mesh.Mesh, want int) {
	tb.Helper()
	WaitConvergedWithin(tb, ms, want, 30*time.Second)
}

// WaitConvergedWithin is WaitConverged with its own deadline.
func WaitConvergedWithin(tb testing.TB, ms []*mesh.Mesh, want int, timeout time.Duration) {
	tb.Helper()
	poll.Until(tb, timeout, func() (bool, string) {
		for _, m := range ms {
			if got := m.NumAlive(); got != want {
				return false, fmt.Sprintf("%s sees %d alive members, want %d", m.Name(), got, want)
			}
		}
		return true, ""
	})
}

// WaitMember waits until m lists the named member and cond holds for it.
func WaitMember(tb testing.TB, m *mesh.Mesh, name string, cond func(mesh.Member) bool, what string) mesh.Member {
	tb.Helper()
	var got mesh.Member
	poll.Until(tb, 30*time.Second, func() (bool, string) {
		mem, ok := m.Member(name)
		if !ok {
			return false, fmt.Sprintf("%s does not list %s (waiting for %s)", m.Name(), name, what)
		}
		got = mem
		if !cond(mem) {
			return false, fmt.Sprintf("%s sees %s as %s with meta %+v (waiting for %s)", m.Name(), name, mem.State, mem.Meta, what)
		}
		return true, ""
	})
	return got
}

// NextEvent waits up to timeout for the next event on ch that satisfies
// match, skipping others, and fails the test otherwise.
func NextEvent(tb testing.TB, ch <-chan mesh.Event, timeout time.Duration, match func(mesh.Event) bool, what string) mesh.Event {
	tb.Helper()
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case ev, ok := <-ch:
			if !ok {
				tb.Fatalf("event channel closed while waiting for %s", what)
			}
			if match(ev) {
				return ev
			}
		case <-t.C:
			tb.Fatalf("no %s event within %v", what, timeout)
		}
	}
}

// MemConfig returns Config(tb, name) on an in-memory network: the node
// gossips through a new transport of net instead of sockets. level sets
// the log level (a mesh of hundreds of nodes logging at Debug into the
// test log costs more than the gossip).
func MemConfig(tb testing.TB, net *mesh.MemNetwork, name string, level hclog.Level) mesh.Config {
	c := Config(tb, name)
	c.Transport = net.NewTransport()
	c.Logger.SetLevel(level)
	return c
}

// StartMemCluster starts n nodes named prefix0..prefix(n-1) on net, all
// joining the first three at once (a mass join), and waits until every
// node lists all n alive. modify, if not nil, edits each node's config
// first.
func StartMemCluster(tb testing.TB, net *mesh.MemNetwork, prefix string, n int, level hclog.Level, modify func(i int, c *mesh.Config)) []*mesh.Mesh {
	tb.Helper()
	ms := make([]*mesh.Mesh, n)
	for i := range ms {
		c := MemConfig(tb, net, fmt.Sprintf("%s%d", prefix, i), level)
		if modify != nil {
			modify(i, &c)
		}
		ms[i] = New(tb, c)
	}
	var seeds []string
	for _, m := range ms[:min(3, n)] {
		seeds = append(seeds, m.Addr())
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	errs := make(chan error, n)
	for _, m := range ms[1:] {
		go func() {
			_, err := m.Join(ctx, seeds)
			if err != nil {
				err = fmt.Errorf("%s: join %v: %w", m.Name(), seeds, err)
			}
			errs <- err
		}()
	}
	for range ms[1:] {
		if err := <-errs; err != nil {
			tb.Fatal(err)
		}
	}
	WaitConvergedWithin(tb, ms, n, 120*time.Second)
	return ms
}
