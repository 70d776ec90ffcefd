package consensus

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
	"google.golang.org/protobuf/proto"

	"github.com/gpumesh/gpumesh/internal/controlpb"
	"github.com/gpumesh/gpumesh/internal/poll"
)

// FakeMembership is an in-memory Membership for tests: members are set by
// hand, and every change calls the subscribed functions (as gossip events
// would). It is safe for concurrent use.
type FakeMembership struct {
	mu       sync.Mutex
	members  map[string]Member
	order    []string
	subs     []func()
	decorate func(*Member)
}

var _ Membership = (*FakeMembership)(nil)

// NewFakeMembership returns an empty view.
func NewFakeMembership() *FakeMembership {
	return &FakeMembership{members: map[string]Member{}}
}

// Members returns the members in the order they were first set.
func (f *FakeMembership) Members() []Member {
	f.mu.Lock()
	out := make([]Member, 0, len(f.order))
	for _, id := range f.order {
		out = append(out, f.members[id])
	}
	dec := f.decorate
	f.mu.Unlock()
	if dec != nil {
		for i := range out {
			dec(&out[i])
		}
	}
	return out
}

// Subscribe registers fn to be called after every change.
func (f *FakeMembership) Subscribe(fn func()) {
	f.mu.Lock()
	f.subs = append(f.subs, fn)
	f.mu.Unlock()
}

// SetDecorate installs a function applied to each member returned by
// Members (for fields computed on the fly, such as Bootstrapped).
func (f *FakeMembership) SetDecorate(fn func(*Member)) {
	f.mu.Lock()
	f.decorate = fn
	f.mu.Unlock()
}

// Set adds or replaces a member.
func (f *FakeMembership) Set(m Member) {
	f.mu.Lock()
	if _, ok := f.members[m.ID]; !ok {
		f.order = append(f.order, m.ID)
	}
	if m.State == "" {
		m.State = MemberAlive
	}
	f.members[m.ID] = m
	subs := append([]func(){}, f.subs...)
	f.mu.Unlock()
	for _, fn := range subs {
		fn()
	}
}

// Update changes a member in place; it does nothing for an unknown ID.
func (f *FakeMembership) Update(id string, fn func(*Member)) {
	f.mu.Lock()
	m, ok := f.members[id]
	if !ok {
		f.mu.Unlock()
		return
	}
	fn(&m)
	f.members[id] = m
	f.mu.Unlock()
	f.Set(m)
}

// Get returns a member by ID.
func (f *FakeMembership) Get(id string) (Member, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	m, ok := f.members[id]
	return m, ok
}

// WaitFor is poll.Until, for the callers of this package's earlier helper.
func WaitFor(t testing.TB, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	poll.Until(t, timeout, cond)
}

// TestConfig returns a Config with short timeouts for in-process clusters
// on loopback.
func TestConfig(t testing.TB, id string, m Membership) *Config {
	c := DefaultConfig()
	c.NodeID = id
	c.NodeName = id
	c.DataDir = filepath.Join(t.TempDir(), id)
	c.RaftBindAddr = "127.0.0.1:0"
	c.Membership = m
	// Short, but with room for a loaded 2-core machine running -race:
	// tighter leases make leaders step down spuriously there.
	c.HeartbeatTimeout = 250 * time.Millisecond
	c.ElectionTimeout = 250 * time.Millisecond
	c.LeaderLeaseTimeout = 200 * time.Millisecond
	c.BootstrapSettle = 20 * time.Millisecond
	c.DeadServerCleanup = time.Second
	c.ServerStabilization = 200 * time.Millisecond
	c.LastContactThreshold = 500 * time.Millisecond
	c.ReconcileInterval = 200 * time.Millisecond
	c.NodeLossGrace = 500 * time.Millisecond
	c.FailureSettle = 300 * time.Millisecond
	// Info: logs reach the output only when a test fails (t.Log), and then
	// the membership changes are what one needs to see.
	level := hclog.Info
	if l := os.Getenv("GPUMESH_TEST_LOG"); l != "" {
		level = hclog.LevelFromString(l)
	}
	c.Logger = hclog.New(&hclog.LoggerOptions{Name: id, Level: level, Output: testWriter{t}})
	return c
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// TestCluster is N in-process servers on 127.0.0.1 with random ports. Each
// server has its own FakeMembership view; the cluster's methods change all
// views at once, as converged gossip would.
type TestCluster struct {
	t      testing.TB
	mu     sync.Mutex
	Views  map[string]*FakeMembership
	srv    map[string]*Server
	cfgs   map[string]*Config
	member map[string]Member
	Mutate func(*Config)
}

// NewTestCluster returns an empty cluster; mutate (may be nil) adjusts
// every server's config. Servers are shut down at the end of the test.
func NewTestCluster(t testing.TB, mutate func(*Config)) *TestCluster {
	tc := &TestCluster{t: t, Views: map[string]*FakeMembership{}, srv: map[string]*Server{}, cfgs: map[string]*Config{}, member: map[string]Member{}, Mutate: mutate}
	t.Cleanup(tc.ShutdownAll)
	return tc
}

// MakeTestCluster starts n server-eligible nodes (node-0 ... node-n-1)
// that see each other and waits for a leader.
func MakeTestCluster(t testing.TB, n int, mutate func(*Config)) *TestCluster {
	tc := NewTestCluster(t, mutate)
	for i := 0; i < n; i++ {
		tc.Start(fmt.Sprintf("node-%d", i), nil)
	}
	for i := 0; i < n; i++ {
		tc.AnnounceAll(fmt.Sprintf("node-%d", i))
	}
	tc.WaitForLeader(10 * time.Second)
	return tc
}

// Start creates the server id (reusing its data dir and Raft address after
// a Stop) with an empty view; edit sets member fields (may be nil). It does
// not announce the member: call AnnounceAll or Announce.
func (tc *TestCluster) Start(id string, edit func(*Member)) *Server {
	tc.t.Helper()
	tc.mu.Lock()
	view := tc.Views[id]
	if view == nil {
		view = NewFakeMembership()
		tc.Views[id] = view
		view.SetDecorate(tc.decorate)
	}
	cfg := tc.cfgs[id]
	m, known := tc.member[id]
	tc.mu.Unlock()
	if cfg == nil {
		cfg = TestConfig(tc.t, id, view)
		if tc.Mutate != nil {
			tc.Mutate(cfg)
		}
	}
	bind := "127.0.0.1:0"
	if known {
		bind = m.RaftAddr
	}
	var sl raft.StreamLayer
	var err error
	for i := 0; i < 50; i++ { // the old listener's port may linger briefly
		if sl, err = NewTCPStreamLayer(bind, ""); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		tc.t.Fatalf("start %s: %v", id, err)
	}
	c2 := *cfg
	c2.StreamLayer = sl
	s, err := NewServer(&c2)
	if err != nil {
		tc.t.Fatalf("start %s: %v", id, err)
	}
	view.Subscribe(s.MembershipChanged)
	if !known {
		m = Member{ID: id, Name: id, RaftAddr: sl.Addr().String(), RPCAddr: "127.0.0.1:7947", Server: true, Lifecycle: LifecycleOnDemand}
		if edit != nil {
			edit(&m)
		}
	}
	m.State = MemberAlive
	tc.mu.Lock()
	tc.srv[id], tc.cfgs[id], tc.member[id] = s, cfg, m
	tc.mu.Unlock()
	return s
}

// decorate fills Member.Bootstrapped from the live servers.
func (tc *TestCluster) decorate(m *Member) {
	tc.mu.Lock()
	s := tc.srv[m.ID]
	tc.mu.Unlock()
	if s != nil {
		m.Bootstrapped = s.Bootstrapped()
	}
}

// Announce shows member id (as last set) in the view of observer.
func (tc *TestCluster) Announce(observer, id string) {
	tc.mu.Lock()
	m, v := tc.member[id], tc.Views[observer]
	tc.mu.Unlock()
	if v != nil {
		v.Set(m)
	}
}

// AnnounceAll shows member id in every view, and every member in its view.
func (tc *TestCluster) AnnounceAll(id string) {
	for _, other := range tc.IDs() {
		tc.Announce(other, id)
		tc.Announce(id, other)
	}
}

// SetMember changes a member everywhere (all views see the change).
func (tc *TestCluster) SetMember(id string, fn func(*Member)) {
	tc.mu.Lock()
	m := tc.member[id]
	fn(&m)
	tc.member[id] = m
	tc.mu.Unlock()
	for _, other := range tc.IDs() {
		tc.Announce(other, id)
	}
}

// AddClient adds a non-server member (a client node with this record) to
// every view.
func (tc *TestCluster) AddClient(n *controlpb.Node) {
	m := Member{ID: n.Id, Name: n.Name, RPCAddr: n.RpcAddr, State: MemberAlive, AZ: n.Az, Lifecycle: n.Lifecycle, Node: proto.Clone(n).(*controlpb.Node)}
	tc.mu.Lock()
	tc.member[n.Id] = m
	tc.mu.Unlock()
	for _, other := range tc.IDs() {
		tc.Announce(other, n.Id)
	}
}

// IDs returns the IDs of all started servers (live or stopped), sorted.
func (tc *TestCluster) IDs() []string {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	var out []string
	for id := range tc.Views {
		out = append(out, id)
	}
	sort.Strings(out)
	return out
}

// Server returns the live server id, or nil.
func (tc *TestCluster) Server(id string) *Server {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	return tc.srv[id]
}

// Live returns the live servers.
func (tc *TestCluster) Live() []*Server {
	tc.mu.Lock()
	defer tc.mu.Unlock()
	var out []*Server
	for _, s := range tc.srv {
		out = append(out, s)
	}
	return out
}

// Stop shuts a server down and, when dead is true, shows it dead in every
// view (as gossip would after a crash); otherwise the views are untouched.
func (tc *TestCluster) Stop(id string, dead bool) {
	tc.mu.Lock()
	s := tc.srv[id]
	delete(tc.srv, id)
	tc.mu.Unlock()
	if s != nil {
		if err := s.Shutdown(); err != nil {
			tc.t.Errorf("shutdown %s: %v", id, err)
		}
	}
	if dead {
		tc.SetMember(id, func(m *Member) { m.State = MemberDead })
	}
}

// Restart starts a stopped server again from its data dir and shows it
// alive everywhere.
func (tc *TestCluster) Restart(id string) *Server {
	s := tc.Start(id, nil)
	tc.AnnounceAll(id)
	return s
}

// ShutdownAll stops every live server.
func (tc *TestCluster) ShutdownAll() {
	for _, s := range tc.Live() {
		_ = s.Shutdown()
	}
	tc.mu.Lock()
	tc.srv = map[string]*Server{}
	tc.mu.Unlock()
}

// Leader returns the single live leader, or nil.
func (tc *TestCluster) Leader() *Server {
	var l *Server
	for _, s := range tc.Live() {
		if s.IsLeader() {
			if l != nil {
				return nil
			}
			l = s
		}
	}
	return l
}

// WaitForLeader waits until exactly one live server leads and every live
// server that is in the configuration knows it.
func (tc *TestCluster) WaitForLeader(timeout time.Duration) *Server {
	tc.t.Helper()
	var l *Server
	poll.Until(tc.t, timeout, func() (bool, string) {
		l = tc.Leader()
		if l == nil {
			return false, "no single leader"
		}
		return true, ""
	})
	return l
}

// Write runs fn on the current leader, retrying while leadership moves
// (ErrNotLeader, ErrLeadershipLost) for up to 10 s; it fails the test on
// any other error.
func (tc *TestCluster) Write(fn func(s *Server) error) {
	tc.t.Helper()
	var err error
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		l := tc.Leader()
		if l == nil {
			time.Sleep(10 * time.Millisecond)
			continue
		}
		if err = fn(l); err == nil {
			return
		}
		if !errors.Is(err, ErrNotLeader) && !errors.Is(err, ErrLeadershipLost) && !errors.Is(err, ErrShutdown) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	tc.t.Fatalf("write failed: %v", err)
}

// RaftConfig returns the leader's Raft configuration as id -> suffrage.
func RaftConfig(s *Server) map[string]raft.ServerSuffrage {
	f := s.raft.GetConfiguration()
	if s.await(f) != nil {
		return nil
	}
	out := map[string]raft.ServerSuffrage{}
	for _, srv := range f.Configuration().Servers {
		out[string(srv.ID)] = srv.Suffrage
	}
	return out
}
