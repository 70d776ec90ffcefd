package consensus

import (
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"github.com/hashicorp/raft"
)

// tcpStreamLayer is the default raft.StreamLayer: plain TCP. Wrap or
// replace it (Config.StreamLayer) to add TLS.
type tcpStreamLayer struct {
	ln        net.Listener
	advertise net.Addr
}

var _ raft.StreamLayer = (*tcpStreamLayer)(nil)

// NewTCPStreamLayer listens on bind and advertises advertise (or the
// listener's address when empty).
func NewTCPStreamLayer(bind, advertise string) (raft.StreamLayer, error) {
	ln, err := net.Listen("tcp", bind)
	if err != nil {
		return nil, fmt.Errorf("raft transport: listen on %s: %w (is another agent using the Raft port?)", bind, err)
	}
	var adv net.Addr = ln.Addr()
	if advertise != "" {
		a, err := net.ResolveTCPAddr("tcp", advertise)
		if err != nil {
			ln.Close()
			return nil, fmt.Errorf("raft transport: advertise address %q: %w", advertise, err)
		}
		adv = a
	}
	if ta, ok := adv.(*net.TCPAddr); ok && ta.IP.IsUnspecified() {
		ln.Close()
		return nil, fmt.Errorf("raft transport: address %s is unspecified; set RaftAdvertiseAddr to an address other servers can dial", adv)
	}
	return &tcpStreamLayer{ln: ln, advertise: adv}, nil
}

func (t *tcpStreamLayer) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	return net.DialTimeout("tcp", string(address), timeout)
}

func (t *tcpStreamLayer) Accept() (net.Conn, error) { return t.ln.Accept() }
func (t *tcpStreamLayer) Close() error              { return t.ln.Close() }
func (t *tcpStreamLayer) Addr() net.Addr            { return t.advertise }

// trackedStream wraps a StreamLayer and closes every connection it accepted
// or dialed when it is closed. raft's NetworkTransport.Close closes only the
// listener: without this, connections to a shut-down server stay open (and
// their handler goroutines alive) for as long as the peers keep them pooled.
type trackedStream struct {
	raft.StreamLayer
	mu     sync.Mutex
	closed bool
	conns  map[*trackedConn]struct{}
}

func newTrackedStream(s raft.StreamLayer) *trackedStream {
	return &trackedStream{StreamLayer: s, conns: map[*trackedConn]struct{}{}}
}

type trackedConn struct {
	net.Conn
	owner *trackedStream
	once  sync.Once
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.owner.mu.Lock()
		delete(c.owner.conns, c)
		c.owner.mu.Unlock()
	})
	return c.Conn.Close()
}

func (t *trackedStream) track(c net.Conn) (net.Conn, error) {
	tc := &trackedConn{Conn: c, owner: t}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		c.Close()
		return nil, net.ErrClosed
	}
	t.conns[tc] = struct{}{}
	return tc, nil
}

func (t *trackedStream) Accept() (net.Conn, error) {
	c, err := t.StreamLayer.Accept()
	if err != nil {
		return nil, err
	}
	return t.track(c)
}

func (t *trackedStream) Dial(address raft.ServerAddress, timeout time.Duration) (net.Conn, error) {
	c, err := t.StreamLayer.Dial(address, timeout)
	if err != nil {
		return nil, err
	}
	return t.track(c)
}

func (t *trackedStream) Close() error {
	err := t.StreamLayer.Close()
	t.mu.Lock()
	t.closed = true
	conns := t.conns
	t.conns = map[*trackedConn]struct{}{}
	t.mu.Unlock()
	for c := range conns {
		c.Conn.Close()
	}
	return err
}

// quietOnShutdown is the transport's logger: once the server shuts down
// (done closed) its errors and warnings become debug lines. raft's
// NetworkTransport logs what its own shutdown cuts short (a command read
// on a closed connection, "transport shutdown", an answer that cannot be
// flushed) as errors, and a clean stop must log no ERROR.
type quietOnShutdown struct {
	hclog.Logger
	done <-chan struct{}
}

func (q quietOnShutdown) stopping() bool {
	select {
	case <-q.done:
		return true
	default:
		return false
	}
}

func (q quietOnShutdown) Log(level hclog.Level, msg string, args ...any) {
	if level >= hclog.Warn && q.stopping() {
		level = hclog.Debug
	}
	q.Logger.Log(level, msg, args...)
}

func (q quietOnShutdown) Error(msg string, args ...any) { q.Log(hclog.Error, msg, args...) }
func (q quietOnShutdown) Warn(msg string, args ...any)  { q.Log(hclog.Warn, msg, args...) }
