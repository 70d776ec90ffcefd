package node

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
)

// The serve port (Config.ServeAddr, `gpumesh agent --serve`) carries
// service traffic only: /svc/NAME/... and the Host form, routed by the
// same router as the HTTP port's /svc/. Its front end is a lean HTTP/1.1
// server for the common request, with net/http's server behind it for
// everything else:
//
//   - one goroutine per client connection reads requests from its buffer;
//     a plain request (service_serve_request.go) goes straight to the
//     router, and the answer is framed by serveWriter
//     (service_serve_writer.go): a plain answer of known length leaves in
//     one write, a stream chunked and flushed as the router flushes it;
//   - any other request (a body of unknown length or over maxRetryBody, an
//     Upgrade, Expect, HTTP/1.0, a head over serveBufSize, anything it does
//     not parse) hands the connection, with the bytes already read, to an
//     http.Server (through handoffListener) for the rest of its life: it
//     answers exactly as the HTTP port would, 400 and 431 included;
//   - a request's context ends when its client goes away (the requests of
//     one connection share one context, which ends only then): a timer
//     armed per request starts, after watchAfter, a read that notices a
//     closed connection (net/http reads in the background for every
//     request);
//   - the head must arrive within serveHeaderTimeout of its first byte
//     (the HTTP port's ReadHeaderTimeout); an idle connection waits without
//     a limit, as on the HTTP port;
//   - with TLS (when the HTTP port has it) the handshake is done here, with
//     the same certificate, HTTP/1.1 only;
//   - shutdown closes the listener and idle connections, lets requests in
//     flight finish until its context ends, then closes the rest.

// Serve-port limits.
const (
	// serveBufSize is each connection's read and write buffer: a request
	// head that does not fit goes to net/http's server (which allows
	// MaxHeaderBytes).
	serveBufSize = 8 << 10
	// serveHeaderTimeout bounds the time from a request's first byte to
	// the end of its head.
	serveHeaderTimeout = 10 * time.Second
	// watchAfter is how long a request runs before its client is watched.
	watchAfter = 50 * time.Millisecond
)

// aLongTimeAgo is a deadline in the past: it ends a pending read at once.
var aLongTimeAgo = time.Unix(1, 0)

// errServeClosed is returned by serve after shutdown.
var errServeClosed = errors.New("the serve port was shut down")

// serveFront serves one listener. It owns the connections it accepts
// until it hands them to hs.
type serveFront struct {
	ln      net.Listener
	rt      http.Handler // the router
	tls     *tls.Config  // nil: plain
	logger  hclog.Logger
	hand    *handoffListener
	hs      *http.Server
	ctx     context.Context // ends at the shutdown deadline (TLS handshakes)
	cancel  context.CancelFunc
	closing atomic.Bool
	// served counts the requests the front end answered itself, handed
	// the connections it gave to hs.
	served, handed atomic.Int64

	mu    sync.Mutex
	conns map[*serveConn]struct{}
	wg    sync.WaitGroup
}

// serveConn is one client connection of the lean front end.
type serveConn struct {
	c     net.Conn // as accepted (before TLS): deadlines and close
	watch *clientWatch
	mu    sync.Mutex
	idle  bool // waiting for a request's first byte
}

// newServeFront returns the front end of rt on ln; tlsConf, if not nil,
// is the HTTP port's TLS.
func newServeFront(ln net.Listener, rt http.Handler, tlsConf *tls.Config, logger hclog.Logger) *serveFront {
	f := &serveFront{ln: ln, rt: rt, logger: logger, conns: map[*serveConn]struct{}{}}
	if tlsConf != nil {
		f.tls = tlsConf.Clone()
		f.tls.NextProtos = []string{"http/1.1"}
	}
	f.ctx, f.cancel = context.WithCancel(context.Background())
	f.hand = &handoffListener{addr: ln.Addr(), conns: make(chan net.Conn), done: make(chan struct{})}
	f.hs = &http.Server{
		Handler:           withConnTLS(serveHandler(rt)),
		ReadHeaderTimeout: serveHeaderTimeout,
		MaxHeaderBytes:    MaxHeaderBytes,
		ErrorLog:          logger.StandardLogger(&hclog.StandardLoggerOptions{InferLevels: true}),
		ConnContext: func(ctx context.Context, c net.Conn) context.Context {
			if bc, ok := c.(*bufferedConn); ok && bc.tls != nil {
				return context.WithValue(ctx, connTLSKey{}, bc.tls)
			}
			return ctx
		},
	}
	return f
}

// serveHandler is what the serve port answers through net/http: services
// by path and by Host, and for anything else a 404 that says where the
// agent's own API is.
func serveHandler(rt http.Handler) http.Handler {
	mux := http.NewServeMux()
	mux.Handle(svcPrefix, rt)
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "this is the agent's service port: it serves /svc/NAME/... and requests whose Host is NAME.svc[.DOMAIN]; health, metrics, the dashboard and the API are on the agent's HTTP port", http.StatusNotFound)
	})
	return hostRouted(rt, mux)
}

// connTLSKey holds a handed-off TLS connection's state in its context:
// net/http sets Request.TLS only for a *tls.Conn, and it gets a
// bufferedConn.
type connTLSKey struct{}

func withConnTLS(h http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if st, ok := r.Context().Value(connTLSKey{}).(*tls.ConnectionState); ok && r.TLS == nil {
			r.TLS = st
		}
		h.ServeHTTP(w, r)
	})
}

// serve accepts connections until shutdown; it returns errServeClosed then.
func (f *serveFront) serve() error {
	hsDone := make(chan struct{})
	go func() {
		defer close(hsDone)
		_ = f.hs.Serve(f.hand) // ends with ErrServerClosed at shutdown
	}()
	defer func() {
		_ = f.hand.Close() // hs keeps serving what it has
		<-hsDone
	}()
	var backoff time.Duration
	for {
		c, err := f.ln.Accept()
		if err != nil {
			if f.closing.Load() {
				return errServeClosed
			}
			if errors.Is(err, net.ErrClosed) {
				return err
			}
			// As net/http: out of file descriptors and the like pass.
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			f.logger.Warn("serve port: accept failed; retrying", "error", err, "in", backoff)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		// New: idle until its first request, so that a shutdown ends its
		// handshake or its wait.
		sc := &serveConn{c: c, watch: &clientWatch{c: c}, idle: true}
		sc.watch.timer = time.AfterFunc(time.Hour, sc.watch.fire)
		sc.watch.timer.Stop()
		f.mu.Lock()
		if f.closing.Load() {
			f.mu.Unlock()
			_ = c.Close()
			continue
		}
		f.conns[sc] = struct{}{}
		f.wg.Add(1)
		f.mu.Unlock()
		go f.serveConn(sc)
	}
}

// shutdown stops accepting, closes idle connections, and waits for the
// requests in flight (here and on hs) until ctx ends; then it closes what
// is left.
func (f *serveFront) shutdown(ctx context.Context) error {
	f.closing.Store(true)
	_ = f.ln.Close()
	f.mu.Lock()
	for sc := range f.conns {
		sc.mu.Lock()
		if sc.idle {
			_ = sc.c.SetReadDeadline(aLongTimeAgo)
		}
		sc.mu.Unlock()
	}
	f.mu.Unlock()
	hsErr := make(chan error, 1)
	go func() { hsErr <- f.hs.Shutdown(ctx) }()
	done := make(chan struct{})
	go func() { f.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		f.cancel()
		f.mu.Lock()
		for sc := range f.conns {
			sc.watch.abort() // ends the request's upstream exchange
			_ = sc.c.Close()
		}
		f.mu.Unlock()
		<-done
	}
	f.cancel()
	if e := <-hsErr; e != nil {
		_ = f.hs.Close()
		err = errors.Join(err, e)
	}
	return err
}

// serveConn serves one connection until it closes, fails, or is handed
// to hs.
func (f *serveFront) serveConn(sc *serveConn) {
	handed := false
	defer func() {
		f.mu.Lock()
		delete(f.conns, sc)
		f.mu.Unlock()
		if !handed {
			_ = sc.c.Close()
		}
		f.wg.Done()
	}()
	var c net.Conn = sc.c
	var state *tls.ConnectionState
	if f.tls != nil {
		tc := tls.Server(sc.c, f.tls)
		sc.mu.Lock()
		if f.closing.Load() {
			sc.mu.Unlock()
			return
		}
		_ = sc.c.SetDeadline(time.Now().Add(serveHeaderTimeout))
		sc.mu.Unlock()
		if err := tc.HandshakeContext(f.ctx); err != nil {
			return
		}
		_ = sc.c.SetDeadline(time.Time{})
		st := tc.ConnectionState()
		c, state = tc, &st
	}
	br := bufio.NewReaderSize(c, serveBufSize)
	w := &serveWriter{bw: bufio.NewWriterSize(c, serveBufSize), header: make(http.Header, 8)}
	pr := plainRequest{header: make(http.Header, 16)}
	// One context for the connection's requests, not one each: it ends
	// only when the client goes away (or a shutdown runs out of time), and
	// the connection ends with it. Not below f.ctx: every request would
	// take its lock.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	base := (&http.Request{}).WithContext(ctx)
	watch := sc.watch
	watch.mu.Lock()
	watch.br = br
	watch.mu.Unlock()
	defer watch.timer.Stop()
	remote := sc.c.RemoteAddr().String()
	handOff := func() {
		_ = sc.c.SetReadDeadline(time.Time{})
		// Counted first: hs may answer before give returns.
		f.handed.Add(1)
		if handed = f.hand.give(&bufferedConn{Conn: c, br: br, tls: state}); !handed {
			f.handed.Add(-1)
		}
	}
	for {
		sc.mu.Lock()
		sc.idle = true
		sc.mu.Unlock()
		if f.closing.Load() {
			return
		}
		if _, err := br.Peek(1); err != nil {
			return
		}
		// The head's time limit matters only when it has not all come
		// with its first byte (the common case needs no deadline).
		buf, _ := br.Peek(br.Buffered())
		plain, complete := parsePlainRequest(buf, &pr)
		sc.mu.Lock()
		sc.idle = false
		if !complete {
			_ = sc.c.SetReadDeadline(time.Now().Add(serveHeaderTimeout))
		}
		sc.mu.Unlock()
		if !complete {
			var err error
			if plain, err = readPlainHead(br, &pr); err != nil {
				return // as net/http: a head cut short or too slow closes the connection
			}
			_ = sc.c.SetReadDeadline(time.Time{})
		}
		var req *http.Request
		if plain {
			req = pr.request(base, remote)
		}
		if req == nil {
			handOff()
			return
		}
		_, _ = br.Discard(pr.headLen)
		if pr.length > 0 {
			body := make([]byte, pr.length)
			if _, err := io.ReadFull(br, body); err != nil {
				return
			}
			req.Body = io.NopCloser(bytes.NewReader(body))
		}
		req.TLS = state
		w.reset(req.Method, pr.closeAfter)
		f.served.Add(1)
		// A shutdown that times out ends the request through its watch.
		watch.start(cancel)
		ok := f.run(w, req)
		watch.stop()
		if !ok {
			_ = w.bw.Flush() // as net/http: what was written goes out, then the connection closes
			return
		}
		w.finish()
		if w.err == nil {
			w.fail(w.bw.Flush())
		}
		// ctx ended: the client went away (its requests share ctx).
		if w.err != nil || w.closeAfter || f.closing.Load() || ctx.Err() != nil {
			return
		}
	}
}

// readPlainHead waits until br holds a whole request head, or a first line
// that is not a plain request's, or is full, and says whether the head is
// plain (parsed into pr). An error is a read error: the connection ends.
func readPlainHead(br *bufio.Reader, pr *plainRequest) (plain bool, err error) {
	for {
		buf, _ := br.Peek(br.Buffered())
		ok, complete := parsePlainRequest(buf, pr)
		if complete {
			return ok, nil
		}
		if br.Buffered() == br.Size() || badFirstLine(buf) {
			return false, nil
		}
		if _, err := br.Peek(br.Buffered() + 1); err != nil {
			return false, err
		}
	}
}

// badFirstLine says whether buf holds a whole first line that no plain
// request starts with (net/http then answers 400 at once).
func badFirstLine(buf []byte) bool {
	i := bytes.Index(buf, []byte("\r\n"))
	if i < 0 {
		return false
	}
	fields := bytes.Split(buf[:i], []byte(" "))
	return len(fields) != 3 || string(fields[2]) != "HTTP/1.1"
}

// run serves req, recovering a panic (http.ErrAbortHandler when the replica
// or the client failed mid-answer): ok false means the connection must
// close.
func (f *serveFront) run(w *serveWriter, req *http.Request) (ok bool) {
	defer func() {
		if p := recover(); p != nil {
			ok = false
			if p != http.ErrAbortHandler {
				buf := make([]byte, 64<<10)
				buf = buf[:runtime.Stack(buf, false)]
				f.logger.Error("serve port: panic serving a request", "path", req.URL.Path, "panic", p, "stack", string(buf))
			}
		}
	}()
	f.rt.ServeHTTP(w, req)
	return true
}

// clientWatch notices, while a request runs, that its client went away:
// after watchAfter its timer starts a read of the connection (nothing else
// reads it while the handler runs) that ends the request's context on an
// error; stop ends that read. A byte read (the next request, pipelined)
// stays in the buffer and ends the watch.
type clientWatch struct {
	c     net.Conn
	br    *bufio.Reader
	timer *time.Timer

	mu       sync.Mutex
	running  bool // a request is being served
	watching bool // fire is reading
	stopping bool // stop interrupted the read
	cancel   context.CancelFunc
	done     chan struct{} // closed when fire's read ends
}

func (cw *clientWatch) start(cancel context.CancelFunc) {
	cw.mu.Lock()
	cw.running, cw.cancel = true, cancel
	cw.mu.Unlock()
	cw.timer.Reset(watchAfter)
}

func (cw *clientWatch) fire() {
	cw.mu.Lock()
	if !cw.running || cw.watching {
		cw.mu.Unlock()
		return
	}
	cw.watching, cw.stopping = true, false
	done, cancel, br := make(chan struct{}), cw.cancel, cw.br
	cw.done = done
	cw.mu.Unlock()
	_, err := br.Peek(1)
	cw.mu.Lock()
	gone := err != nil && !cw.stopping
	cw.watching = false
	cw.mu.Unlock()
	if gone {
		cancel()
	}
	close(done)
}

// abort ends the running request's context, if any (a shutdown that ran
// out of time).
func (cw *clientWatch) abort() {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	if cw.running {
		cw.cancel()
	}
}

func (cw *clientWatch) stop() {
	cw.timer.Stop()
	cw.mu.Lock()
	cw.running = false
	watching, done := cw.watching, cw.done
	if watching {
		cw.stopping = true
		_ = cw.c.SetReadDeadline(aLongTimeAgo)
	}
	cw.mu.Unlock()
	if watching {
		<-done
		_ = cw.c.SetReadDeadline(time.Time{})
	}
}

// handoffListener is the net.Listener hs serves: it yields the connections
// the front end hands over.
type handoffListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func (l *handoffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *handoffListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *handoffListener) Addr() net.Addr { return l.addr }

// give hands c to hs; false when hs no longer accepts (c is the caller's
// to close).
func (l *handoffListener) give(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

// ServeServices serves the service routes of router (from NewStaticRouter)
// on ln with the serve port's front end, as an agent's --serve port does,
// until ln is closed: for benchmarks and tests of the front end without a
// cluster.
func ServeServices(ln net.Listener, router http.Handler) error {
	f := newServeFront(ln, router, nil, hclog.NewNullLogger())
	err := f.serve()
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}
