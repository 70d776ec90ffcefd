package node

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/textproto"
	"net/url"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/sys/unix"
)

// The router's fast path forwards a plain request (no body, or one of
// known length already read; no Upgrade, no Expect) to a replica over
// HTTP/1.1 itself, on a connection it takes from the replica's pool, in the
// handler's own goroutine: no request clone, no transport goroutines or
// channels between the handler and the socket. What it writes and passes
// back follows httputil.ReverseProxy, which remains the general path for
// everything else (upgrades, bodies streamed or of unknown length):
//
//   - to the replica: the request line with the path below /svc/NAME, Host
//     as the client sent it, the client's headers less the hop-by-hop ones
//     (Connection and those it names, Keep-Alive, Proxy-*, TE but
//     "trailers", Trailer, Transfer-Encoding, Upgrade) and less Forwarded
//     and X-Forwarded-*, then X-Forwarded-For/-Host/-Proto of this hop,
//     Content-Length from the parsed request (never the client's
//     Content-Length or Transfer-Encoding text: the server already settled
//     an ambiguous pair, and the body sent is the one it read);
//   - to the client: interim 1xx answers (but 101), then the status, the
//     headers less the hop-by-hop ones, the body (flushed after every read
//     when of unknown length or server-sent events, so that streams pass
//     unbuffered) and trailers.
//
// An answer of known length and nothing unusual is passed on straight
// from the connection's buffer (passPlainAnswer, service_answer.go); the
// rest through http.ReadResponse (readFinal, copyAnswer). A connection goes
// back to its pool only when its answer was read to the end and neither
// side asked to close it.

// Fast-path limits.
const (
	// maxIdlePerReplica is how many idle connections a router keeps to
	// one replica (more are closed when returned).
	maxIdlePerReplica = 256
	// upstreamIdleTimeout is how long an idle connection stays in the
	// pool (as http.Transport's IdleConnTimeout): after a burst, the
	// connections it opened are closed as later ones are returned.
	upstreamIdleTimeout = 90 * time.Second
	// upstreamDialTimeout bounds a connection attempt to a replica.
	upstreamDialTimeout = 2 * time.Second
)

// Fast-path errors: the router's retry rules read at.written, not these.
var (
	errUpstreamProtocol = errors.New("the replica answered 101 Switching Protocols to a request that asked for no upgrade")
	errPoolClosed       = errors.New("the replica left the routing table")
)

// upConn is one kept-alive connection to a replica.
type upConn struct {
	c        net.Conn
	br       *bufio.Reader
	bw       *bufio.Writer // writes to the upConn (Write)
	idleFrom time.Time
	// rc is c's raw connection (nil when c has none): the last write of a
	// request goes out through it (send).
	rc syscall.RawConn
	// sending is set while send flushes a request's last bytes.
	sending bool
	// abort ends the connection's reads and writes at once; sendFn is
	// sendRaw (both made once, not per request).
	abort  func()
	sendFn func(uintptr) bool
	raw    rawSend
}

// replicaConns holds a router's idle connections to one replica: the most
// recently used first. It lives as long as the replica is in the table.
type replicaConns struct {
	addr   string
	mu     sync.Mutex
	idle   []*upConn
	closed bool
}

// get returns an idle connection (reused true) or dials a new one.
func (p *replicaConns) get(ctx context.Context) (uc *upConn, reused bool, err error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, false, errPoolClosed
	}
	if n := len(p.idle); n > 0 {
		uc = p.idle[n-1]
		p.idle[n-1] = nil
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return uc, true, nil
	}
	p.mu.Unlock()
	d := net.Dialer{Timeout: upstreamDialTimeout, KeepAlive: 30 * time.Second}
	c, err := d.DialContext(ctx, "tcp", p.addr)
	if err != nil {
		return nil, false, err
	}
	return newUpConn(c), false, nil
}

// newUpConn wraps a connection to a replica, buffered both ways (a
// request goes out in one write).
func newUpConn(c net.Conn) *upConn {
	uc := &upConn{c: c, br: bufio.NewReaderSize(c, 4<<10)}
	uc.bw = bufio.NewWriterSize(uc, 4<<10)
	uc.abort = func() { _ = c.SetDeadline(time.Unix(1, 0)) }
	uc.sendFn = uc.sendRaw
	if sc, ok := c.(syscall.Conn); ok {
		uc.rc, _ = sc.SyscallConn()
	}
	return uc
}

// send flushes the request written to uc.bw and returns once the answer
// can be read (or the connection failed, or its deadline passed: the read
// that follows says so).
func (uc *upConn) send() error {
	uc.sending = true
	err := uc.bw.Flush()
	uc.sending = false
	return err
}

// Write is uc.bw's: straight to the connection, but for the last bytes of
// a request (send). Those are written from inside a raw read of the
// connection that then waits until the answer is there, so that the read
// of the answer is not first tried in vain. A plain write and read would
// cost one read system call more per request: Go's poller forgets the
// readiness it saw before a read begins, so every read is tried before it
// waits, and right after its request the answer is not there yet. Here
// the read has begun (its readiness cleared) before the request leaves,
// so whatever readiness the answer brings is kept: nothing is lost, and
// nothing waits for bytes that arrived before. The replica sends nothing
// unasked (an idle close makes our request's write get a reset, which
// also wakes the wait).
func (uc *upConn) Write(p []byte) (int, error) {
	if !uc.sending || uc.rc == nil || len(p) == 0 {
		return uc.c.Write(p)
	}
	uc.raw = rawSend{p: p}
	_ = uc.rc.Read(uc.sendFn)
	r := uc.raw
	uc.raw = rawSend{}
	// A failed wait (the deadline set when the client went away, or a
	// close) fails the read of the answer that follows, as it would have.
	if r.err != nil || r.all {
		return r.n, r.err
	}
	m, err := uc.c.Write(p[r.n:])
	return r.n + m, err
}

// rawSend is the state of one Write through the raw connection.
type rawSend struct {
	p   []byte
	n   int  // bytes of p written
	all bool // all of p written: waiting for the answer
	err error
}

// sendRaw is uc.rc.Read's function for Write (a method value made once:
// a closure per request would be allocated).
func (uc *upConn) sendRaw(fd uintptr) bool {
	r := &uc.raw
	if r.all {
		return true // woken: the answer, an error or a close
	}
	for r.n < len(r.p) {
		m, err := unix.Write(int(fd), r.p[r.n:])
		switch {
		case err == unix.EINTR:
			continue
		case err == unix.EAGAIN:
			return true // the rest as usual (Write)
		case err != nil:
			r.err = &net.OpError{Op: "write", Net: "tcp", Source: uc.c.LocalAddr(), Addr: uc.c.RemoteAddr(), Err: os.NewSyscallError("write", err)}
			return true
		}
		r.n += m
	}
	r.all = true
	return false // wait until the answer can be read
}

// put returns a connection whose last answer was read to the end.
func (p *replicaConns) put(uc *upConn) {
	uc.idleFrom = time.Now()
	p.mu.Lock()
	if p.closed || len(p.idle) >= maxIdlePerReplica {
		p.mu.Unlock()
		_ = uc.c.Close()
		return
	}
	p.idle = append(p.idle, uc)
	// The least recently used are at the bottom: close those idle too long.
	var stale *upConn
	if old := p.idle[0]; uc.idleFrom.Sub(old.idleFrom) > upstreamIdleTimeout {
		stale, p.idle[0] = old, nil
		p.idle = p.idle[1:]
	}
	p.mu.Unlock()
	if stale != nil {
		_ = stale.c.Close()
	}
}

// close closes the idle connections; those in use are closed when put.
func (p *replicaConns) close() {
	p.mu.Lock()
	idle := p.idle
	p.idle, p.closed = nil, true
	p.mu.Unlock()
	for _, uc := range idle {
		_ = uc.c.Close()
	}
}

// fastForwardable says whether req may take the fast path, its body (if
// any) having been read whole by the caller.
func fastForwardable(req *http.Request, bodyRead bool) bool {
	if len(req.TransferEncoding) > 0 || req.Header["Upgrade"] != nil || req.Header["Expect"] != nil {
		return false
	}
	return req.ContentLength == 0 || (bodyRead && req.ContentLength > 0)
}

// hopByHop are the headers dropped in both directions, as by
// httputil.ReverseProxy.
var hopByHop = map[string]bool{
	"Connection": true, "Proxy-Connection": true, "Keep-Alive": true, "Proxy-Authenticate": true,
	"Proxy-Authorization": true, "Te": true, "Trailer": true, "Transfer-Encoding": true, "Upgrade": true,
}

// notForwarded are the client's headers a request does not carry on, but
// for the hop-by-hop ones: written from the parsed request instead, or
// (Forwarded, X-Forwarded-*) replaced by this hop's.
var notForwarded = map[string]bool{
	"Content-Length": true, "Host": true,
	"Forwarded": true, "X-Forwarded-For": true, "X-Forwarded-Host": true, "X-Forwarded-Proto": true,
}

// connectionTokens returns the header names listed in h's Connection
// header (canonical), or nil.
func connectionTokens(h http.Header) map[string]bool {
	var named map[string]bool
	for _, v := range h["Connection"] {
		for _, f := range strings.Split(v, ",") {
			if f = textproto.TrimString(f); f != "" {
				if named == nil {
					named = map[string]bool{}
				}
				named[textproto.CanonicalMIMEHeaderKey(f)] = true
			}
		}
	}
	return named
}

// fastForward sends req (body, if not nil, its whole body) to the replica
// of pool as path and passes the answer to at. It returns an error only
// when nothing but interim answers was written to the client, so that the
// caller may retry elsewhere; once the answer has begun, a failure aborts
// the client's connection (http.ErrAbortHandler), as the general path does.
func fastForward(at *attempt, req *http.Request, pool *replicaConns, path string, body []byte) error {
	ctx := req.Context()
	safe := idempotent(req.Method)
	for try := 0; ; try++ {
		uc, reused, err := pool.get(ctx)
		if err != nil {
			return err
		}
		// Before a request that must not be sent twice goes on a kept-
		// alive connection, check that the replica has not closed it (it
		// exited, or timed the connection out): one non-blocking peek.
		if reused && !safe && !connAlive(uc.c) {
			_ = uc.c.Close()
			continue // nothing was sent on it
		}
		again, err := exchange(at, req, uc, path, body, pool)
		if again && reused && safe && try == 0 {
			// A kept-alive connection the replica had closed answers
			// nothing: send an idempotent request again on a fresh one
			// (as http.Transport does).
			at.written.Store(false)
			continue
		}
		return err
	}
}

// exchange sends the request on uc and passes the answer on. again is set
// when the replica answered nothing at all (uc is then closed).
func exchange(at *attempt, req *http.Request, uc *upConn, path string, body []byte, pool *replicaConns) (again bool, err error) {
	ctx := req.Context()
	// Watch the client while the replica answers: if it goes away, the
	// connection's reads and writes end at once.
	stop := context.AfterFunc(ctx, uc.abort)
	reusable := false
	defer func() {
		if stop() && reusable {
			pool.put(uc)
		} else {
			_ = uc.c.Close()
		}
	}()
	writeUpstream(uc.bw, req, path, body)
	if err := uc.send(); err != nil {
		return false, err
	}
	at.written.Store(true)
	if _, err := uc.br.Peek(1); err != nil {
		return ctx.Err() == nil, err
	}
	if ok, closeAfter := passPlainAnswer(at, uc.br, req); ok {
		reusable = !closeAfter
		return false, nil
	}
	resp, err := readFinal(at, uc.br, req)
	if err != nil {
		return false, err
	}
	copyAnswer(at, resp) // panics (http.ErrAbortHandler) on a failure
	reusable = !resp.Close
	return false, nil
}

// connAlive says whether the replica has not closed c while it was idle:
// a peek that would block finds nothing pending (no EOF, no stray bytes).
func connAlive(c net.Conn) bool {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return true
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	alive := false
	err = rc.Read(func(fd uintptr) bool {
		var b [1]byte
		_, _, perr := unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		alive = perr == unix.EAGAIN
		return true // never wait
	})
	return err == nil && alive
}

// writeUpstream writes the request line, headers and body of req to bw,
// for the caller to flush (a write error shows then).
func writeUpstream(bw *bufio.Writer, req *http.Request, path string, body []byte) {
	bw.WriteString(req.Method)
	bw.WriteByte(' ')
	bw.WriteString(path)
	if req.URL.ForceQuery || req.URL.RawQuery != "" {
		bw.WriteByte('?')
		bw.WriteString(req.URL.RawQuery)
	}
	bw.WriteString(" HTTP/1.1\r\nHost: ")
	bw.WriteString(req.Host)
	bw.WriteString("\r\n")
	named := connectionTokens(req.Header)
	for k, vv := range req.Header {
		if hopByHop[k] || notForwarded[k] || named[k] {
			if k == "Te" && httpguts.HeaderValuesContainsToken(vv, "trailers") {
				bw.WriteString("Te: trailers\r\n")
			}
			continue
		}
		for _, v := range vv {
			bw.WriteString(k)
			bw.WriteString(": ")
			bw.WriteString(v)
			bw.WriteString("\r\n")
		}
	}
	if ip, _, err := net.SplitHostPort(req.RemoteAddr); err == nil {
		bw.WriteString("X-Forwarded-For: ")
		bw.WriteString(ip)
		bw.WriteString("\r\n")
	}
	bw.WriteString("X-Forwarded-Host: ")
	bw.WriteString(req.Host)
	if req.TLS == nil {
		bw.WriteString("\r\nX-Forwarded-Proto: http\r\n")
	} else {
		bw.WriteString("\r\nX-Forwarded-Proto: https\r\n")
	}
	switch {
	case len(body) > 0:
		bw.WriteString("Content-Length: ")
		bw.WriteString(strconv.Itoa(len(body)))
		bw.WriteString("\r\n")
	case req.Method == http.MethodPost || req.Method == http.MethodPut || req.Method == http.MethodPatch:
		bw.WriteString("Content-Length: 0\r\n") // as http.Transport: many servers want one
	}
	bw.WriteString("\r\n")
	bw.Write(body)
}

// readFinal reads the replica's answer to req, passing interim 1xx answers
// (but 101) on to the client.
func readFinal(at *attempt, br *bufio.Reader, req *http.Request) (*http.Response, error) {
	for {
		resp, err := http.ReadResponse(br, req)
		if err != nil {
			return nil, err
		}
		switch {
		case resp.StatusCode == http.StatusSwitchingProtocols:
			return nil, errUpstreamProtocol
		case resp.StatusCode >= 100 && resp.StatusCode < 200:
			h := at.Header()
			for k, vv := range resp.Header {
				h[k] = vv
			}
			at.WriteHeader(resp.StatusCode)
			clear(h)
		default:
			return resp, nil
		}
	}
}

// copyAnswer passes resp to the client: headers, body and trailers. A
// failure while copying the body aborts the client's connection.
func copyAnswer(at *attempt, resp *http.Response) {
	h := at.Header()
	named := connectionTokens(resp.Header)
	for k, vv := range resp.Header {
		if !hopByHop[k] && !named[k] {
			h[k] = vv
		}
	}
	announced := len(resp.Trailer)
	if announced > 0 {
		keys := make([]string, 0, announced)
		for k := range resp.Trailer {
			keys = append(keys, k)
		}
		h["Trailer"] = []string{strings.Join(keys, ", ")}
	}
	at.WriteHeader(resp.StatusCode)
	// Stream what has no length, or is a stream of events, as it comes.
	var flusher http.Flusher
	if resp.ContentLength == -1 || isEventStream(resp.Header.Get("Content-Type")) {
		flusher, _ = at.ResponseWriter.(http.Flusher)
		if flusher != nil {
			flusher.Flush()
		}
	}
	buf := copyBuffers.Get()
	defer copyBuffers.Put(buf)
	for {
		n, rerr := resp.Body.Read(buf)
		if n > 0 {
			if _, werr := at.ResponseWriter.Write(buf[:n]); werr != nil {
				panic(http.ErrAbortHandler) // the client went away
			}
			if flusher != nil {
				flusher.Flush()
			}
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			panic(http.ErrAbortHandler) // the replica failed mid-answer
		}
	}
	if len(resp.Trailer) == 0 {
		return
	}
	// As httputil.ReverseProxy: force chunking so that trailers can
	// follow, then set the announced ones, or all under TrailerPrefix.
	_ = http.NewResponseController(at.ResponseWriter).Flush()
	for k, vv := range resp.Trailer {
		if len(resp.Trailer) != announced {
			k = http.TrailerPrefix + k
		}
		h[k] = vv
	}
}

func isEventStream(ct string) bool {
	mt, _, _ := strings.Cut(ct, ";")
	return strings.EqualFold(strings.TrimSpace(mt), "text/event-stream")
}

// upstreamPath returns the path of u below prefix ("/svc/NAME"), "/" when
// nothing is left, escaped as the client sent it (a %2F stays one): what
// both paths send.
func upstreamPath(u *url.URL, prefix string) string {
	if esc := u.EscapedPath(); strings.HasPrefix(esc, prefix) {
		if esc = esc[len(prefix):]; esc == "" || esc[0] == '/' {
			if esc == "" {
				return "/"
			}
			return esc
		}
	}
	path := u.Path[len(prefix):]
	if path == "" {
		return "/"
	}
	return (&url.URL{Path: path}).EscapedPath()
}
