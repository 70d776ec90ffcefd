package collective

import (
	"fmt"
	"sync"
)

// NewLocalGroup creates the n communicators of one group over a fresh
// LocalTransport (all ranks in this process). It is the cluster helper of
// tests; the transport's fault hooks (SetFault, Kill) act on the group.
func NewLocalGroup(job string, gen uint64, n int, cfg Config) (*LocalTransport, []*Communicator, error) {
	t := NewLocalTransport()
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = fmt.Sprintf("local:%d", i)
	}
	comms := make([]*Communicator, n)
	for r := range comms {
		c, err := New(t, Group{Job: job, Generation: gen, Rank: r, Addrs: addrs}, cfg)
		if err != nil {
			CloseAll(comms)
			return nil, nil, err
		}
		comms[r] = c
	}
	return t, comms, nil
}

// RunAll calls f for every communicator concurrently and returns each
// rank's error.
func RunAll(comms []*Communicator, f func(c *Communicator) error) []error {
	errs := make([]error, len(comms))
	var wg sync.WaitGroup
	for i, c := range comms {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = f(c)
		}()
	}
	wg.Wait()
	return errs
}

// CloseAll closes every non-nil communicator, all at once (a closing
// endpoint waits for its peers to read what it sent, so closing one after the
// other would wait for each in turn).
func CloseAll(comms []*Communicator) {
	var wg sync.WaitGroup
	for _, c := range comms {
		if c != nil {
			wg.Add(1)
			go func() {
				defer wg.Done()
				_ = c.Close()
			}()
		}
	}
	wg.Wait()
}

// LoopbackGroup is a group whose ranks each have their own data-plane
// server on 127.0.0.1 (a free port), talking over real gRPC and TCP.
type LoopbackGroup struct {
	Servers []*Server
	Comms   []*Communicator
}

// NewLoopbackGroup starts n servers and the n communicators of one group.
func NewLoopbackGroup(job string, gen uint64, n int, cfg Config, gcfg NetConfig) (*LoopbackGroup, error) {
	g := &LoopbackGroup{}
	addrs := make([]string, n)
	for i := range addrs {
		s, err := Listen("127.0.0.1:0", gcfg)
		if err != nil {
			g.Close()
			return nil, err
		}
		g.Servers = append(g.Servers, s)
		addrs[i] = s.Addr()
	}
	for r := 0; r < n; r++ {
		c, err := New(g.Servers[r].Transport(), Group{Job: job, Generation: gen, Rank: r, Addrs: addrs}, cfg)
		if err != nil {
			g.Close()
			return nil, err
		}
		g.Comms = append(g.Comms, c)
	}
	return g, nil
}

// NewSharedGroup starts one server and the n communicators of one group on
// it: every rank has the same address, so frames between them take the
// server's in-memory shortcut (by reference, see RefSender) instead of TCP,
// as ranks of one node's agent do.
func NewSharedGroup(job string, gen uint64, n int, cfg Config, gcfg NetConfig) (*LoopbackGroup, error) {
	s, err := Listen("127.0.0.1:0", gcfg)
	if err != nil {
		return nil, err
	}
	g := &LoopbackGroup{Servers: []*Server{s}}
	addrs := make([]string, n)
	for i := range addrs {
		addrs[i] = s.Addr()
	}
	for r := 0; r < n; r++ {
		c, err := New(s.Transport(), Group{Job: job, Generation: gen, Rank: r, Addrs: addrs}, cfg)
		if err != nil {
			g.Close()
			return nil, err
		}
		g.Comms = append(g.Comms, c)
	}
	return g, nil
}

// Close closes the communicators, then the servers.
func (g *LoopbackGroup) Close() {
	CloseAll(g.Comms)
	for _, s := range g.Servers {
		s.Close()
	}
}
