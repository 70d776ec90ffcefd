package pipeline

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"net"
	"sync"
	"time"
	"unsafe"
)

// Wire format of a TCPLink message: a 48-byte header, then Rows×Cols
// float32 values, little-endian.
//
//	off size field
//	0   4    magic "GMP1"
//	4   1    version (1)
//	5   1    direction
//	6   2    zero
//	8   8    job (FNV-1a 64 of the job ID)
//	16  8    generation
//	24  8    step
//	32  4    micro-batch
//	36  4    rows
//	40  4    cols
//	44  4    chunk (interleaved schedules)
const (
	tcpHeaderSize = 48
	tcpMagic      = 0x31504d47 // "GMP1"
	helloMagic    = 0x48504d47 // "GMPH"
	tcpVersion    = 1
	// MaxMessageBytes bounds one message's payload.
	MaxMessageBytes = 1 << 30
)

func jobHash(job string) uint64 {
	h := fnv.New64a()
	h.Write([]byte(job))
	return h.Sum64()
}

// TCPLink is a Link over one TCP connection, for a given job and
// generation (checked in a handshake and on every message).
type TCPLink struct {
	conn       net.Conn
	r          *bufio.Reader
	jobID      string
	job        uint64
	generation uint64
	hdr        [tcpHeaderSize]byte
	closeOnce  sync.Once
	// free holds released receive buffers for reuse (a bufPool, or the
	// stage device's memory: useRecvBuffers).
	free recvBuffers
}

var (
	_ copyingLink    = (*TCPLink)(nil)
	_ recvMemoryUser = (*TCPLink)(nil)
)

// useRecvBuffers makes the link receive into b's memory; call it before
// the first Recv.
func (l *TCPLink) useRecvBuffers(b recvBuffers) { l.free = b }

// sendCopies: Send returns once the kernel has the bytes.
func (*TCPLink) sendCopies() {}

func newTCPLink(conn net.Conn, jobID string, gen uint64) *TCPLink {
	return &TCPLink{conn: conn, r: bufio.NewReaderSize(conn, 64<<10), jobID: jobID, job: jobHash(jobID), generation: gen, free: newBufPool()}
}

func f32bytes(d []float32) []byte {
	if len(d) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&d[0])), len(d)*4)
}

// Send writes m as one message (header and payload in one writev).
func (l *TCPLink) Send(m *Message) error {
	if err := m.Validate(); err != nil {
		return err
	}
	if len(m.Data)*4 > MaxMessageBytes {
		return fmt.Errorf("%w: %v is %d bytes, over the %d-byte limit", ErrProtocol, m.Tag, len(m.Data)*4, MaxMessageBytes)
	}
	h := l.hdr[:]
	clear(h)
	binary.LittleEndian.PutUint32(h[0:], tcpMagic)
	h[4] = tcpVersion
	h[5] = byte(m.Tag.Dir)
	binary.LittleEndian.PutUint64(h[8:], jobHash(m.Tag.JobID))
	binary.LittleEndian.PutUint64(h[16:], m.Tag.Generation)
	binary.LittleEndian.PutUint64(h[24:], uint64(m.Tag.Step))
	binary.LittleEndian.PutUint32(h[32:], uint32(m.Tag.MicroBatch))
	binary.LittleEndian.PutUint32(h[36:], uint32(m.Rows))
	binary.LittleEndian.PutUint32(h[40:], uint32(m.Cols))
	binary.LittleEndian.PutUint32(h[44:], uint32(m.Tag.Chunk))
	bufs := net.Buffers{h, f32bytes(m.Data)}
	if _, err := bufs.WriteTo(l.conn); err != nil {
		return l.ioErr(err)
	}
	return nil
}

// Recv reads the next message.
func (l *TCPLink) Recv() (*Message, error) {
	var h [tcpHeaderSize]byte
	if _, err := io.ReadFull(l.r, h[:]); err != nil {
		return nil, l.ioErr(err)
	}
	if binary.LittleEndian.Uint32(h[0:]) != tcpMagic || h[4] != tcpVersion {
		return nil, fmt.Errorf("%w: bad message header (magic %x, version %d)", ErrProtocol, h[0:4], h[4])
	}
	m := &Message{
		Tag: Tag{
			JobID:      l.jobID,
			Dir:        Direction(h[5]),
			Generation: binary.LittleEndian.Uint64(h[16:]),
			Step:       int(binary.LittleEndian.Uint64(h[24:])),
			MicroBatch: int(binary.LittleEndian.Uint32(h[32:])),
			Chunk:      int(binary.LittleEndian.Uint32(h[44:])),
		},
		Rows: int(binary.LittleEndian.Uint32(h[36:])),
		Cols: int(binary.LittleEndian.Uint32(h[40:])),
	}
	if jh := binary.LittleEndian.Uint64(h[8:]); jh != l.job {
		m.Tag.JobID = fmt.Sprintf("unknown job (hash %016x)", jh)
	}
	n := uint64(m.Rows) * uint64(m.Cols) * 4
	if n > MaxMessageBytes {
		return nil, fmt.Errorf("%w: %v announces %d bytes, over the %d-byte limit", ErrProtocol, m.Tag, n, MaxMessageBytes)
	}
	m.Data = l.buffer(m.Rows * m.Cols)
	m.release = l.recycle
	if _, err := io.ReadFull(l.r, f32bytes(m.Data)); err != nil {
		return nil, l.ioErr(err)
	}
	return m, nil
}

// buffer returns a receive buffer of n values, reused when one is free.
func (l *TCPLink) buffer(n int) []float32 { return l.free.get(n) }

func (l *TCPLink) recycle(b []float32) { l.free.put(b) }

func (l *TCPLink) ioErr(err error) error {
	if errors.Is(err, net.ErrClosed) || errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
		return fmt.Errorf("%w: %v", ErrLinkClosed, err)
	}
	return err
}

// Close closes the connection.
func (l *TCPLink) Close() error {
	var err error
	l.closeOnce.Do(func() { err = l.conn.Close() })
	return err
}

// TCPConfig says how ConnectTCP links a stage to its neighbours.
type TCPConfig struct {
	JobID      string
	Generation uint64
	Stage      int
	Stages     int
	// Addrs[s] is stage s's listen address ("host:port"); this stage dials
	// Addrs[Stage+1].
	Addrs []string
	// Listener accepts the previous stage's connection. Nil: ConnectTCP
	// listens on Addrs[Stage] and closes the listener once connected.
	Listener net.Listener
	// ConnectTimeout bounds the whole connection phase (the next stage may
	// start later: dials are retried until then). Default 30 s.
	ConnectTimeout time.Duration
	// Ring also links the last stage to the first (StageLinks.Ring), for
	// interleaved schedules: the last stage dials the first.
	Ring bool
}

// DefaultTCPConfig returns the defaults of the optional fields.
func DefaultTCPConfig() TCPConfig { return TCPConfig{ConnectTimeout: 30 * time.Second} }

// Validate checks the config.
func (c *TCPConfig) Validate() error {
	switch {
	case c.JobID == "":
		return fmt.Errorf("%w: TCP links need a job ID", ErrInvalidSpec)
	case c.Stages < 1 || c.Stage < 0 || c.Stage >= c.Stages:
		return fmt.Errorf("%w: stage %d of %d is out of range", ErrInvalidSpec, c.Stage, c.Stages)
	case len(c.Addrs) != c.Stages:
		return fmt.Errorf("%w: %d addresses for %d stages; give one per stage", ErrInvalidSpec, len(c.Addrs), c.Stages)
	case c.ConnectTimeout < 0:
		return fmt.Errorf("%w: connect timeout must be >= 0, got %v", ErrInvalidSpec, c.ConnectTimeout)
	}
	return nil
}

// ConnectTCP connects a stage to its neighbours: it accepts the previous
// stage's connection and dials the next stage, each checked by a handshake
// (job, generation, stage) so a stale or foreign peer is refused.
func ConnectTCP(ctx context.Context, cfg TCPConfig) (StageLinks, error) {
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = DefaultTCPConfig().ConnectTimeout
	}
	if err := cfg.Validate(); err != nil {
		return StageLinks{}, err
	}
	ctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
	defer cancel()
	var links StageLinks
	var errPrev, errNext error
	var wg sync.WaitGroup
	ring := cfg.Ring && cfg.Stages >= 2
	if cfg.Stage > 0 || ring {
		ln := cfg.Listener
		if ln == nil {
			var lc net.ListenConfig
			l, err := lc.Listen(ctx, "tcp", cfg.Addrs[cfg.Stage])
			if err != nil {
				return links, fmt.Errorf("stage %d: listen on %s: %w", cfg.Stage, cfg.Addrs[cfg.Stage], err)
			}
			defer l.Close()
			ln = l
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			var l *TCPLink
			l, errPrev = acceptStage(ctx, ln, cfg)
			if l != nil {
				if cfg.Stage == 0 {
					links.Ring = l
				} else {
					links.Prev = l
				}
			}
		}()
	}
	if cfg.Stage < cfg.Stages-1 || ring {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var l *TCPLink
			l, errNext = dialStage(ctx, cfg)
			if l != nil {
				if cfg.Stage == cfg.Stages-1 {
					links.Ring = l
				} else {
					links.Next = l
				}
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errPrev, errNext); err != nil {
		links.Close()
		return StageLinks{}, err
	}
	return links, nil
}

func writeHello(w io.Writer, cfg TCPConfig, from int) error {
	b := make([]byte, 18+len(cfg.JobID))
	binary.LittleEndian.PutUint32(b[0:], helloMagic)
	b[4] = tcpVersion
	binary.LittleEndian.PutUint64(b[5:], cfg.Generation)
	binary.LittleEndian.PutUint32(b[13:], uint32(from))
	b[17] = byte(len(cfg.JobID))
	copy(b[18:], cfg.JobID)
	_, err := w.Write(b)
	return err
}

func dialStage(ctx context.Context, cfg TCPConfig) (*TCPLink, error) {
	to := (cfg.Stage + 1) % cfg.Stages
	addr := cfg.Addrs[to]
	var d net.Dialer
	backoff := 10 * time.Millisecond
	for {
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			l, herr := clientHandshake(ctx, conn, cfg)
			if herr == nil {
				return l, nil
			}
			conn.Close()
			if errors.Is(herr, ErrProtocol) {
				return nil, herr
			}
			err = herr
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("stage %d: could not reach stage %d at %s: %w (last error: %v)", cfg.Stage, to, addr, ctx.Err(), err)
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 500*time.Millisecond)
	}
}

func clientHandshake(ctx context.Context, conn net.Conn, cfg TCPConfig) (*TCPLink, error) {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetDeadline(dl)
		defer conn.SetDeadline(time.Time{})
	}
	if len(cfg.JobID) > 255 {
		return nil, fmt.Errorf("%w: job ID longer than 255 bytes", ErrInvalidSpec)
	}
	if err := writeHello(conn, cfg, cfg.Stage); err != nil {
		return nil, err
	}
	var st [3]byte
	if _, err := io.ReadFull(conn, st[:]); err != nil {
		return nil, err
	}
	if st[0] != 0 {
		msg := make([]byte, binary.LittleEndian.Uint16(st[1:]))
		io.ReadFull(conn, msg)
		to := (cfg.Stage + 1) % cfg.Stages
		return nil, fmt.Errorf("%w: stage %d at %s refused the connection: %s", ErrProtocol, to, cfg.Addrs[to], msg)
	}
	return newTCPLink(conn, cfg.JobID, cfg.Generation), nil
}

func acceptStage(ctx context.Context, ln net.Listener, cfg TCPConfig) (*TCPLink, error) {
	d, canDeadline := ln.(interface{ SetDeadline(time.Time) error })
	fired := make(chan struct{})
	stop := context.AfterFunc(ctx, func() {
		defer close(fired)
		if canDeadline {
			d.SetDeadline(time.Unix(1, 0))
		}
	})
	defer func() {
		if !stop() {
			<-fired
			if canDeadline {
				d.SetDeadline(time.Time{}) // the caller's listener stays usable
			}
		}
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil, fmt.Errorf("stage %d: stage %d did not connect: %w", cfg.Stage, (cfg.Stage-1+cfg.Stages)%cfg.Stages, ctx.Err())
			}
			return nil, fmt.Errorf("stage %d: accept: %w", cfg.Stage, err)
		}
		l, err := serverHandshake(ctx, conn, cfg)
		if err == nil {
			return l, nil
		}
		conn.Close()
		// A foreign or stale dialer is refused; keep waiting for ours.
	}
}

func serverHandshake(ctx context.Context, conn net.Conn, cfg TCPConfig) (*TCPLink, error) {
	dl := time.Now().Add(5 * time.Second)
	if d, ok := ctx.Deadline(); ok && d.Before(dl) {
		dl = d
	}
	conn.SetDeadline(dl)
	defer conn.SetDeadline(time.Time{})
	var b [18]byte
	if _, err := io.ReadFull(conn, b[:]); err != nil {
		return nil, err
	}
	job := make([]byte, b[17])
	if _, err := io.ReadFull(conn, job); err != nil {
		return nil, err
	}
	gen := binary.LittleEndian.Uint64(b[5:])
	from := int(binary.LittleEndian.Uint32(b[13:]))
	var refusal string
	switch {
	case binary.LittleEndian.Uint32(b[0:]) != helloMagic || b[4] != tcpVersion:
		refusal = "not a gpumesh pipeline connection (or another version)"
	case string(job) != cfg.JobID:
		refusal = fmt.Sprintf("this is stage %d of job %q, not of job %q", cfg.Stage, cfg.JobID, job)
	case gen != cfg.Generation:
		refusal = fmt.Sprintf("job %q runs generation %d here, the dialer has generation %d", cfg.JobID, cfg.Generation, gen)
	case from != (cfg.Stage-1+cfg.Stages)%cfg.Stages:
		refusal = fmt.Sprintf("stage %d accepts stage %d, not stage %d", cfg.Stage, (cfg.Stage-1+cfg.Stages)%cfg.Stages, from)
	}
	if refusal != "" {
		out := make([]byte, 3+len(refusal))
		out[0] = 1
		binary.LittleEndian.PutUint16(out[1:], uint16(len(refusal)))
		copy(out[3:], refusal)
		conn.Write(out)
		return nil, fmt.Errorf("%w: %s", ErrProtocol, refusal)
	}
	if _, err := conn.Write([]byte{0, 0, 0}); err != nil {
		return nil, err
	}
	return newTCPLink(conn, cfg.JobID, cfg.Generation), nil
}
