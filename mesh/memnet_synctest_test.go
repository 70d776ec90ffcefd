package mesh_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"testing"
	"testing/synctest"
	"time"

	"github.com/gpumesh/gpumesh/mesh"
	"github.com/hashicorp/go-hclog"
)

// The memory network runs inside a testing/synctest bubble (bench/mesh's
// virtual-time simulation): every wait in it is durably blocking (a
// channel, a select, a timer), so the virtual clock advances through link
// delays, dial timeouts and stream deadlines, and they last exactly their
// configured time. A wait on a mutex, a sync.Cond or a socket would stop
// the clock, and this test would hang.
func TestMemNetworkVirtualTime(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		n := mesh.NewMemNetwork()
		a, b, c := n.NewTransport(), n.NewTransport(), n.NewTransport()
		const d = 30 * time.Millisecond
		n.SetDefault(mesh.LinkFault{Delay: d})

		// A packet arrives exactly one link delay after it was sent.
		sent, err := a.WriteTo([]byte("ping"), b.Addr())
		if err != nil {
			t.Fatal(err)
		}
		p := <-b.PacketCh()
		if got := p.Timestamp.Sub(sent); got != d {
			t.Errorf("packet arrived %v after it was sent, link delay %v", got, d)
		}

		// A dial takes one link delay; the stream's read deadline fires
		// at its virtual time.
		accepted := make(chan io.ReadWriteCloser, 1)
		go func() {
			conn := <-b.StreamCh()
			accepted <- conn
		}()
		start := time.Now()
		conn, err := a.DialTimeout(b.Addr(), time.Second)
		if err != nil {
			t.Fatal(err)
		}
		if got := time.Since(start); got != d {
			t.Errorf("dial took %v, link delay %v", got, d)
		}
		remote := <-accepted
		start = time.Now()
		if err := conn.SetReadDeadline(start.Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Errorf("read past its deadline: %v, want os.ErrDeadlineExceeded", err)
		}
		if got := time.Since(start); got != 5*time.Second {
			t.Errorf("read deadline of 5s fired after %v", got)
		}
		// Data written by the peer wakes a blocked read.
		go func() {
			time.Sleep(time.Second)
			_, _ = remote.Write([]byte("x"))
		}()
		start = time.Now()
		if err := conn.SetReadDeadline(time.Time{}); err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Read(make([]byte, 1)); err != nil || time.Since(start) != time.Second {
			t.Errorf("read: %v after %v, want the byte written 1s later", err, time.Since(start))
		}
		conn.Close()
		remote.Close()

		// A dial across a partition waits for its whole timeout.
		n.Partition([]string{a.Addr()}, []string{c.Addr()})
		start = time.Now()
		if _, err := a.DialTimeout(c.Addr(), 3*time.Second); err == nil {
			t.Error("dial across a partition succeeded")
		}
		if got := time.Since(start); got != 3*time.Second {
			t.Errorf("partitioned dial gave up after %v, want its 3s timeout", got)
		}

		for _, tr := range []*mesh.MemTransport{a, b, c} {
			tr.Shutdown()
		}
		synctest.Wait()
	})
}

// The post-join syncs of nodes that joined in the same instant are
// spread over [½, 1] of JoinSyncDelay (virtual time): a mass join must
// not reach its seeds all at once, since memberlist refuses push-pulls
// past 128 at a time; and none waits longer than JoinSyncDelay, which
// sets how soon a small mesh converges.
func TestJoinSyncJitter(t *testing.T) {
	synctest.Test(t, func(t *testing.T) {
		const joiners = 20
		n := mesh.NewMemNetwork()
		cfg := func(name string) mesh.Config {
			c := mesh.DefaultLocalConfig()
			c.NodeName, c.NodeID = name, "id-"+name
			c.Logger = hclog.NewNullLogger()
			c.Transport = n.NewTransport()
			c.PushPullInterval = 0 // no periodic push-pull: every stream below is a join or a sync
			return c
		}
		seed, err := mesh.New(cfg("seed"))
		if err != nil {
			t.Fatal(err)
		}
		defer seed.Shutdown()
		var trs []*mesh.MemTransport
		var ms []*mesh.Mesh
		for i := 0; i < joiners; i++ {
			c := cfg(fmt.Sprintf("j%d", i))
			m, err := mesh.New(c)
			if err != nil {
				t.Fatal(err)
			}
			defer m.Shutdown()
			trs, ms = append(trs, c.Transport.(*mesh.MemTransport)), append(ms, m)
		}
		delay := mesh.DefaultLocalConfig().JoinSyncDelay
		start := time.Now()
		done := make(chan error, joiners)
		for _, m := range ms {
			go func() {
				_, err := m.Join(context.Background(), []string{seed.Addr()})
				done <- err
			}()
		}
		for range ms {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
		if d := time.Since(start); d != 0 {
			t.Fatalf("joins took %v of virtual time, want 0", d)
		}
		// Each joiner dialed once to join; its first sync is its second dial.
		first := make([]time.Duration, joiners)
		for left := joiners; left > 0; {
			time.Sleep(time.Millisecond)
			for i, tr := range trs {
				if first[i] == 0 && tr.Stats().Streams >= 2 {
					first[i] = time.Since(start)
					left--
				}
			}
			if time.Since(start) > 2*delay {
				t.Fatalf("first syncs after %v (0: not yet), want all within [½, 1] of %v", first, delay)
			}
		}
		distinct := map[time.Duration]bool{}
		for _, d := range first {
			if d < delay/2 || d > delay+time.Millisecond { // polled every millisecond
				t.Errorf("a first sync after %v, want within [½, 1] of %v", d, delay)
			}
			distinct[d] = true
		}
		if len(distinct) < joiners/2 {
			t.Errorf("first syncs at only %d distinct instants (%v): the joiners reach the seed together", len(distinct), first)
		}
	})
}
