package collective

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"crypto/tls"
	"encoding/hex"
	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The gRPC data plane. One bidirectional-streaming method,
// /gpumesh.collective.v1.DataPlane/Link, carries frames from a sending rank
// to a receiving rank: one stream per (sender, receiver, channel), each
// channel on its own ClientConn and so its own HTTP/2 connection and TCP flow.
// Frames travel with the raw codec registered under the content-subtype
// CodecName, so tensor bytes are never inside protobuf messages and the
// service can share a *grpc.Server with protobuf services. The stream's
// metadata says which job, generation, sender, receiver and channel it is
// for, so one server multiplexes every communicator of the process.

// CodecName is the gRPC content-subtype of data-plane frames
// ("application/grpc+gpumesh-frame").
const CodecName = "gpumesh-frame"

const (
	dataPlaneService = "gpumesh.collective.v1.DataPlane"
	linkMethod       = "/" + dataPlaneService + "/Link"
	mdJob            = "gpumesh-job"
	mdGen            = "gpumesh-generation"
	mdSrc            = "gpumesh-src-rank"
	mdDst            = "gpumesh-dst-rank"
	mdChan           = "gpumesh-channel"
	mdAbortClass     = "gpumesh-abort-class"
	controlChannel   = -1
	staleReason      = "stale generation"
)

func init() { encoding.RegisterCodecV2(frameCodec{}) }

// outMsg is a frame being sent: its header bytes and a borrowed payload.
// It is also the mem.BufferPool of its payload buffer, so gRPC's final Free
// of the payload (after the bytes are written to the socket) reaches Put,
// which reports SendDone.
type outMsg struct {
	hdr    [HeaderSize]byte
	hdrBuf mem.Buffer
	data   []byte
	done   SendDone
	bs     [2]mem.Buffer
	whole  []byte // small frames: header and payload copied together
}

var outMsgPool = sync.Pool{New: func() any {
	m := new(outMsg)
	m.hdrBuf = mem.SliceBuffer(m.hdr[:])
	return m
}}

// Get implements mem.BufferPool (never used).
func (m *outMsg) Get(int) *[]byte { return nil }

// Put implements mem.BufferPool: gRPC is done with the payload.
func (m *outMsg) Put(*[]byte) {
	d := m.done
	m.done, m.data, m.bs[0], m.bs[1] = nil, nil, nil, nil
	outMsgPool.Put(m)
	if d != nil {
		d.SendDone()
	}
}

type frameCodec struct{}

func (frameCodec) Name() string { return CodecName }

func (frameCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(*outMsg)
	if !ok {
		return nil, fmt.Errorf("collective codec: cannot marshal %T", v)
	}
	if m.whole != nil {
		return mem.BufferSlice{mem.SliceBuffer(m.whole)}, nil
	}
	m.bs[0] = m.hdrBuf
	m.bs[1] = mem.NewBuffer(&m.data, m)
	return m.bs[:], nil
}

func (frameCodec) Unmarshal(data mem.BufferSlice, v any) error {
	f, ok := v.(*InFrame)
	if !ok {
		return fmt.Errorf("collective codec: cannot unmarshal into %T", v)
	}
	var hb [HeaderSize]byte
	var hdr []byte
	if len(data) > 0 && data[0].Len() >= HeaderSize {
		hdr = data[0].ReadOnlyData()[:HeaderSize]
	} else {
		n := 0
		for _, b := range data {
			n += copy(hb[n:], b.ReadOnlyData())
			if n == HeaderSize {
				break
			}
		}
		hdr = hb[:n]
	}
	h, err := DecodeHeader(hdr)
	if err != nil {
		return err
	}
	if rest := data.Len() - HeaderSize; rest != int(h.Length) {
		return fmt.Errorf("%w: header says %d payload bytes, message has %d", ErrBadFrame, h.Length, rest)
	}
	f.Header = h
	skip := HeaderSize
	f.Payload = f.Payload[:0]
	for _, b := range data {
		d := b.ReadOnlyData()
		if skip >= len(d) {
			skip -= len(d)
			continue
		}
		f.Payload = append(f.Payload, d[skip:])
		skip = 0
	}
	data.Ref()
	f.bufs = append(f.bufs[:0], data...)
	f.release = releaseGRPC
	return nil
}

var grpcFramePool = sync.Pool{New: func() any { return new(InFrame) }}

func releaseGRPC(f *InFrame) {
	for i, b := range f.bufs {
		b.Free()
		f.bufs[i] = nil
	}
	for i := range f.Payload {
		f.Payload[i] = nil
	}
	f.bufs, f.Payload = f.bufs[:0], f.Payload[:0]
	f.Peer, f.release = PeerRef{}, nil
	grpcFramePool.Put(f)
}

// NetConfig tunes the gRPC data plane.
type NetConfig struct {
	// WindowBytes is the initial HTTP/2 flow-control window of each stream
	// and connection (it also turns off gRPC's BDP probing). Default 16 MiB.
	WindowBytes int32
	// ReadBufferBytes and WriteBufferBytes size each connection's socket
	// read buffer and write batching buffer. Default 256 KiB each.
	ReadBufferBytes  int
	WriteBufferBytes int
	// RankWait is how long an inbound stream waits for its receiving rank to
	// open its endpoint (ranks start at slightly different times).
	// Default 30 s.
	RankWait time.Duration
	// NoLocalShortcut makes ranks of this process (same address) talk over
	// TCP like remote ones instead of handing frames over in memory.
	NoLocalShortcut bool
	// CloseWait bounds how long closing an endpoint waits for peers to read
	// what it sent (they normally close at the same time). Default 2 s.
	CloseWait time.Duration
	// DialOptions are appended to the data plane's own (for example
	// transport credentials, which default to insecure).
	DialOptions []grpc.DialOption
	// DataPlane is DataPlaneTCP (frames on TCP lanes beside the gRPC
	// streams; see lane.go) or DataPlaneGRPC (frames on the gRPC streams).
	// Lanes are used only where the receiving Service serves them (its
	// port is wrapped by Service.Listener); otherwise a link stays on its
	// stream. Default DataPlaneTCP.
	DataPlane string
	// LaneSocketBuffer sets SO_SNDBUF/SO_RCVBUF of each lane in bytes
	// (the kernel doubles the figure and caps it at net.core.rmem_max and
	// wmem_max); 0 leaves them to the kernel's autotuning, which grows them
	// up to net.ipv4.tcp_rmem/tcp_wmem's maximum (4 to 32 MiB). Default
	// 512 KiB: enough for a flow's bandwidth-delay product inside a
	// placement group or availability zone, and it keeps the bytes in
	// flight in the CPU cache. Autotuned, every flow's buffers grow to
	// several MiB: four 256 MiB ranks with 8 flows each on one 32-core
	// host then reached 9.1-9.8 GB/s busbw against 11.0-11.4 with 512 KiB
	// (bench/results/wave.md). Use 0 across regions or other long paths.
	LaneSocketBuffer int
	// LaneHandshakeTimeout bounds a lane's connection handshake (and how
	// long an accepted connection may take to say whether it is gRPC or a
	// lane). Default 10 s.
	LaneHandshakeTimeout time.Duration
	// LaneServerTLS and LaneClientTLS wrap lanes in TLS (both or neither).
	// Give the same configs as the node's gRPC credentials: a node whose
	// RPC port uses mutual TLS must set them (or use DataPlaneGRPC), or
	// its lanes would travel in plaintext.
	LaneServerTLS, LaneClientTLS *tls.Config
	// Logger receives structured logs; nil means none.
	Logger hclog.Logger
}

// DefaultNetConfig returns defaults tuned on loopback and 2 to 32 cores.
func DefaultNetConfig() NetConfig {
	return NetConfig{
		WindowBytes:      16 << 20,
		ReadBufferBytes:  256 << 10,
		WriteBufferBytes: 256 << 10,
		RankWait:         30 * time.Second,
		CloseWait:        2 * time.Second,
		DataPlane:        DataPlaneTCP,
		LaneSocketBuffer: 512 << 10,

		LaneHandshakeTimeout: 10 * time.Second,
	}
}

// Validate checks the configuration.
func (c NetConfig) Validate() error {
	switch {
	case c.WindowBytes < 64<<10:
		return fmt.Errorf("%w: data-plane config: window must be >= 64KiB, got %d", ErrBadArgument, c.WindowBytes)
	case c.ReadBufferBytes < 0 || c.WriteBufferBytes < 0:
		return fmt.Errorf("%w: data-plane config: buffer sizes must be >= 0", ErrBadArgument)
	case c.RankWait <= 0:
		return fmt.Errorf("%w: data-plane config: rank wait must be > 0, got %v", ErrBadArgument, c.RankWait)
	case c.CloseWait < 0:
		return fmt.Errorf("%w: data-plane config: close wait must be >= 0, got %v", ErrBadArgument, c.CloseWait)
	case c.DataPlane != DataPlaneTCP && c.DataPlane != DataPlaneGRPC:
		return fmt.Errorf("%w: data-plane config: data plane must be %q or %q, got %q", ErrBadArgument, DataPlaneTCP, DataPlaneGRPC, c.DataPlane)
	case c.LaneSocketBuffer < 0:
		return fmt.Errorf("%w: data-plane config: lane socket buffer must be >= 0 (0: kernel autotuning), got %d", ErrBadArgument, c.LaneSocketBuffer)
	case c.LaneHandshakeTimeout <= 0:
		return fmt.Errorf("%w: data-plane config: lane handshake timeout must be > 0, got %v", ErrBadArgument, c.LaneHandshakeTimeout)
	case (c.LaneServerTLS == nil) != (c.LaneClientTLS == nil):
		return fmt.Errorf("%w: data-plane config: give both lane TLS configs (server and client) or neither", ErrBadArgument)
	}
	return nil
}

// ServerOptions are the grpc.ServerOptions the data plane needs (windows,
// buffers, message size). A node that serves other services on the same
// *grpc.Server passes them to grpc.NewServer.
func ServerOptions(c NetConfig) []grpc.ServerOption {
	return []grpc.ServerOption{
		grpc.InitialWindowSize(c.WindowBytes),
		grpc.InitialConnWindowSize(c.WindowBytes),
		grpc.ReadBufferSize(c.ReadBufferBytes),
		grpc.WriteBufferSize(c.WriteBufferBytes),
		grpc.MaxRecvMsgSize(MaxFrameBytes + HeaderSize + 1024),
		experimental.BufferPool(sharedDirtyPool),
	}
}

func (c NetConfig) dialOptions() []grpc.DialOption {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(c.WindowBytes),
		grpc.WithInitialConnWindowSize(c.WindowBytes),
		grpc.WithReadBufferSize(c.ReadBufferBytes),
		grpc.WithWriteBufferSize(c.WriteBufferBytes),
		grpc.WithDisableRetry(),
		experimental.WithBufferPool(sharedDirtyPool),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 20 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second},
			MinConnectTimeout: 5 * time.Second,
		}),
		// No replay buffer: gRPC would otherwise hold the first 256 KiB of a
		// stream for transparent retries, delaying SendDone.
		grpc.WithDefaultCallOptions(grpc.MaxCallSendMsgSize(MaxFrameBytes+HeaderSize+1024), grpc.CallContentSubtype(CodecName), grpc.MaxRetryRPCBufferSize(0)),
	}
	return append(opts, c.DialOptions...)
}

// Service is the receiving side of the data plane for every communicator
// of this process. Register it on the node's *grpc.Server; give the same
// Service to NewNetTransport.
type Service struct {
	cfg NetConfig
	log hclog.Logger

	mu      sync.Mutex
	eps     map[localKey]*grpcEndpoint
	latest  map[string]uint64
	waiters map[localKey]chan struct{}
	offers  map[laneToken]*laneOffer

	lanesServed   atomicBool
	lanesAccepted atomic.Uint64
}

// LanesAccepted is the number of TCP lanes this Service has accepted since
// it started (for metrics and tests; see lane.go).
func (s *Service) LanesAccepted() uint64 { return s.lanesAccepted.Load() }

// NewService creates the data-plane service.
func NewService(cfg NetConfig) (*Service, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = hclog.NewNullLogger()
	}
	return &Service{cfg: cfg, log: log.Named("dataplane"), eps: map[localKey]*grpcEndpoint{}, latest: map[string]uint64{}, waiters: map[localKey]chan struct{}{}, offers: map[laneToken]*laneOffer{}}, nil
}

// Register adds the data-plane service to s.
func (s *Service) Register(gs *grpc.Server) {
	gs.RegisterService(&grpc.ServiceDesc{
		ServiceName: dataPlaneService,
		HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{
			StreamName:    "Link",
			Handler:       func(_ any, stream grpc.ServerStream) error { return s.link(stream) },
			ServerStreams: true,
			ClientStreams: true,
		}},
		Metadata: "gpumesh/collective/dataplane",
	}, s)
}

var linkDesc = &grpc.StreamDesc{StreamName: "Link", ServerStreams: true, ClientStreams: true}

func mdInt(md metadata.MD, k string) (int64, error) {
	v := md.Get(k)
	if len(v) != 1 {
		return 0, fmt.Errorf("missing %s", k)
	}
	return strconv.ParseInt(v[0], 10, 64)
}

func (s *Service) link(stream grpc.ServerStream) error {
	md, _ := metadata.FromIncomingContext(stream.Context())
	jobs := md.Get(mdJob)
	gen, e1 := mdInt(md, mdGen)
	src, e2 := mdInt(md, mdSrc)
	dst, e3 := mdInt(md, mdDst)
	ch, e4 := mdInt(md, mdChan)
	if len(jobs) != 1 || errors.Join(e1, e2, e3, e4) != nil {
		return status.Errorf(codes.InvalidArgument, "collective: data-plane stream without job/generation/rank/channel metadata: %v", errors.Join(e1, e2, e3, e4))
	}
	ep, err := s.wait(stream.Context(), localKey{jobs[0], uint64(gen), int(dst)})
	if err != nil {
		return err
	}
	if src < 0 || int(src) >= ep.n || int(src) == ep.spec.Rank || ch < controlChannel || ch >= int64(ep.spec.Channels) {
		return status.Errorf(codes.InvalidArgument, "collective: rank %d sent on channel %d but rank %d has %d ranks and %d channels: give every rank the same group and collective config", src, ch, dst, ep.n, ep.spec.Channels)
	}
	if ch != controlChannel {
		// A data link: the receiving rank reads this stream (or its lane)
		// itself (Endpoint.Recv), one goroutine hand-off fewer than a
		// queue. The handler only keeps the stream open until the endpoint
		// fails or closes, or the reader saw the link end.
		sl := ep.slot(int(src), int(ch))
		if !sl.claim() {
			return status.Errorf(codes.AlreadyExists, "collective: rank %d already has a link from rank %d on channel %d", dst, src, ch)
		}
		if lane := md.Get(mdLane); len(lane) == 1 && lane[0] == "1" {
			if !s.servesLanes() {
				if err := stream.SendHeader(metadata.Pairs(mdLaneToken, laneNone)); err != nil {
					return err
				}
				sl.attachStream(stream)
			} else {
				tok, err := s.offerLane(ep, sl, int(src), int(ch))
				if err != nil {
					return status.Errorf(codes.Internal, "collective: lane token: %v", err)
				}
				defer func() {
					// A failed rank keeps its offers until it is removed,
					// to answer late lanes with its failure (serveLane).
					if ep.fail.Err() == nil {
						s.withdrawLane(tok)
					}
				}()
				if err := stream.SendHeader(metadata.Pairs(mdLaneToken, hex.EncodeToString(tok[:]))); err != nil {
					return err
				}
			}
		} else {
			sl.attachStream(stream)
		}
		select {
		case <-ep.fail.ch:
			// A failed (not closed) rank ends its inbound links with the
			// failure, so a sender learns it as fast as from the abort
			// (which may still be on its way) and fails with the same
			// class, not with "the peer closed its endpoint".
			if err := ep.fail.Err(); err != nil && !errors.Is(err, ErrClosed) {
				stream.SetTrailer(metadata.Pairs(mdAbortClass, strconv.FormatUint(abortClassOf(err), 10)))
				return status.Error(codes.Aborted, abortMessage(err))
			}
		case <-stream.Context().Done():
			select {
			case <-sl.ready:
			default:
				ep.fail.fail(fmt.Errorf("%w: the link from rank %d on channel %d ended before its data lane connected", ErrPeerFailed, src, ch))
			}
		case <-sl.readerDone:
		}
		return nil
	}
	for {
		f := grpcFramePool.Get().(*InFrame)
		if err := stream.RecvMsg(f); err != nil {
			grpcFramePool.Put(f)
			return nil
		}
		if f.Header.Kind == FrameAbort {
			msg := strings.ToValidUTF8(string(concat(f.Payload)), "?")
			f.Release()
			ep.fail.fail(&RemoteError{Rank: int(src), Class: abortClassErr(f.Header.Tag), Msg: msg})
			continue
		}
		f.Release()
		ep.fail.fail(fmt.Errorf("%w: rank %d sent a data frame on the control link", ErrBadFrame, src))
		return nil
	}
}

// inSlot is the inbound link of one (sender, channel): its stream, or the
// lane that carries its frames. ready closes once one of them is set.
type inSlot struct {
	ready      chan struct{}
	readerDone chan struct{}
	doneOnce   sync.Once
	readyOnce  sync.Once
	attached   atomicBool
	stream     grpc.ServerStream
	lane       *laneConn
}

// claim reserves the slot for one stream.
func (s *inSlot) claim() bool { return !s.attached.Swap(true) }

// attachStream makes the claimed slot read frames from st.
func (s *inSlot) attachStream(st grpc.ServerStream) {
	s.readyOnce.Do(func() {
		s.stream = st
		close(s.ready)
	})
}

// attachLane makes the claimed slot read frames from l.
func (s *inSlot) attachLane(l *laneConn) bool {
	ok := false
	s.readyOnce.Do(func() {
		s.lane = l
		close(s.ready)
		ok = true
	})
	return ok
}

func (s *inSlot) finish() { s.doneOnce.Do(func() { close(s.readerDone) }) }

func concat(s Segments) []byte {
	b := make([]byte, s.Len())
	s.CopyTo(b)
	return b
}

// wait finds the endpoint of key, waiting up to RankWait for it to open.
func (s *Service) wait(ctx context.Context, k localKey) (*grpcEndpoint, error) {
	timer := time.NewTimer(s.cfg.RankWait)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if latest, ok := s.latest[k.job]; ok && k.gen < latest {
			s.mu.Unlock()
			return nil, status.Errorf(codes.FailedPrecondition, "collective: %s %d of job %q refused: this node serves generation %d", staleReason, k.gen, k.job, latest)
		}
		if ep := s.eps[k]; ep != nil {
			s.mu.Unlock()
			return ep, nil
		}
		w := s.waiters[k]
		if w == nil {
			w = make(chan struct{})
			s.waiters[k] = w
		}
		s.mu.Unlock()
		select {
		case <-w:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		case <-timer.C:
			return nil, status.Errorf(codes.NotFound, "collective: rank %d of job %q generation %d is not open on this node (waited %v)", k.rank, k.job, k.gen, s.cfg.RankWait)
		}
	}
}

func (s *Service) add(ep *grpcEndpoint) error {
	k := localKey{ep.spec.Job, ep.spec.Generation, ep.spec.Rank}
	s.mu.Lock()
	defer s.mu.Unlock()
	if latest, ok := s.latest[k.job]; ok && k.gen < latest {
		return fmt.Errorf("%w: job %q generation %d: this node already serves generation %d", ErrStaleGeneration, k.job, k.gen, latest)
	}
	if s.eps[k] != nil {
		return fmt.Errorf("%w: rank %d of job %q generation %d is already open on this node", ErrBadArgument, k.rank, k.job, k.gen)
	}
	s.latest[k.job] = k.gen
	s.eps[k] = ep
	if w := s.waiters[k]; w != nil {
		close(w)
		delete(s.waiters, k)
	}
	return nil
}

func (s *Service) remove(ep *grpcEndpoint) {
	k := localKey{ep.spec.Job, ep.spec.Generation, ep.spec.Rank}
	s.mu.Lock()
	if s.eps[k] == ep {
		delete(s.eps, k)
	}
	for tok, o := range s.offers {
		if o.ep == ep {
			delete(s.offers, tok)
		}
	}
	s.mu.Unlock()
}

// NetTransport opens endpoints whose inbound side is served by a Service
// and whose outbound links are gRPC client streams.
type NetTransport struct {
	svc  *Service
	opts []grpc.DialOption
}

var _ Transport = (*NetTransport)(nil)

// NewNetTransport returns a transport that receives through svc (which
// must be registered on a running *grpc.Server reachable at this node's
// address in every group's Addrs).
func NewNetTransport(svc *Service) *NetTransport {
	return &NetTransport{svc: svc, opts: svc.cfg.dialOptions()}
}

// Open implements Transport.
func (t *NetTransport) Open(spec EndpointSpec) (Endpoint, error) {
	n := len(spec.Addrs)
	if spec.Rank < 0 || spec.Rank >= n || spec.Channels < 1 {
		return nil, fmt.Errorf("%w: endpoint rank %d of %d ranks, %d channels", ErrBadArgument, spec.Rank, n, spec.Channels)
	}
	ep := &grpcEndpoint{
		t: t, spec: spec, n: n, fail: newFailState(),
		slots: make([]*inSlot, n*spec.Channels),
		links: make([]grpcLink, n*spec.Channels),
		log:   t.svc.log.With("job", spec.Job, "generation", spec.Generation, "rank", spec.Rank),
	}
	ep.local = make([]bool, n)
	for p := range ep.local {
		ep.local[p] = p != spec.Rank && !t.svc.cfg.NoLocalShortcut && spec.Addrs[p] == spec.Addrs[spec.Rank]
	}
	ep.lq = make([]chan *InFrame, n*spec.Channels)
	ep.lpeers = make([]*grpcEndpoint, n)
	for p, l := range ep.local {
		if l {
			for ch := 0; ch < spec.Channels; ch++ {
				ep.lq[p*spec.Channels+ch] = make(chan *InFrame, 8)
			}
		}
	}
	if err := t.svc.add(ep); err != nil {
		return nil, err
	}
	return ep, nil
}

type grpcLink struct {
	mu         sync.Mutex
	cc         *grpc.ClientConn
	stream     grpc.ClientStream
	lane       *laneConn // frames go here when set
	cancel     context.CancelFunc
	watchDone  chan struct{}
	peerClosed atomicBool
}

type grpcEndpoint struct {
	t      *NetTransport
	spec   EndpointSpec
	n      int
	fail   *failState
	closed atomicBool
	log    hclog.Logger

	qmu   sync.Mutex
	slots []*inSlot
	links []grpcLink
	// Ranks served by this same process (same address) exchange frames in
	// memory, by reference, instead of over TCP: local[p] says which.
	local   []bool
	lq      []chan *InFrame
	lpeers  []*grpcEndpoint
	cancels []context.CancelFunc
	wg      sync.WaitGroup

	// lanes are every lane of this endpoint, both directions (under qmu);
	// lanesShut says they were closed (the endpoint failed or closed).
	lanes     []*laneConn
	lanesShut bool
}

// addLane records l so that a failure closes it; it reports false (and
// closes l) when the endpoint has already failed.
func (e *grpcEndpoint) addLane(l *laneConn) bool {
	e.qmu.Lock()
	shut := e.lanesShut
	if !shut {
		e.lanes = append(e.lanes, l)
	}
	e.qmu.Unlock()
	if shut {
		_ = l.close()
	}
	return !shut
}

// attachLane is the Service's side: l carries the frames of slot sl.
func (e *grpcEndpoint) attachLane(sl *inSlot, l *laneConn) bool {
	if !e.addLane(l) {
		return false
	}
	if !sl.attachLane(l) {
		_ = l.close()
		return false
	}
	return true
}

// shutLanes closes every lane (teardown, after the peers were told why):
// blocked reads and writes return at once. A
// sender's data already written stays in the kernel and is still
// delivered (a lane carries data one way only).
func (e *grpcEndpoint) shutLanes() {
	e.qmu.Lock()
	lanes := e.lanes
	e.lanes, e.lanesShut = nil, true
	e.qmu.Unlock()
	for _, l := range lanes {
		_ = l.close()
	}
}

func (e *grpcEndpoint) slot(src, ch int) *inSlot {
	e.qmu.Lock()
	defer e.qmu.Unlock()
	i := src*e.spec.Channels + ch
	if e.slots[i] == nil {
		e.slots[i] = &inSlot{ready: make(chan struct{}), readerDone: make(chan struct{})}
	}
	return e.slots[i]
}

func (e *grpcEndpoint) dial(ctx, streamParent context.Context, peer, ch int) (*grpc.ClientConn, grpc.ClientStream, context.CancelFunc, error) {
	addr := e.spec.Addrs[peer]
	cc, err := grpc.NewClient("passthrough:///"+addr, e.t.opts...)
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%w: rank %d address %q: %v", ErrBadArgument, peer, addr, err)
	}
	cc.Connect()
	for {
		st := cc.GetState()
		if st.String() == "READY" {
			break
		}
		if !cc.WaitForStateChange(ctx, st) {
			_ = cc.Close()
			return nil, nil, nil, fmt.Errorf("%w: cannot reach rank %d at %s: %v", ErrPeerFailed, peer, addr, context.Cause(ctx))
		}
	}
	sctx, cancel := context.WithCancel(streamParent)
	md := metadata.Pairs(mdJob, e.spec.Job, mdGen, strconv.FormatUint(e.spec.Generation, 10),
		mdSrc, strconv.Itoa(e.spec.Rank), mdDst, strconv.Itoa(peer), mdChan, strconv.Itoa(ch))
	if ch != controlChannel && e.t.svc.cfg.DataPlane == DataPlaneTCP {
		md.Append(mdLane, "1")
	}
	stream, err := cc.NewStream(metadata.NewOutgoingContext(sctx, md), linkDesc, linkMethod)
	if err != nil {
		cancel()
		_ = cc.Close()
		return nil, nil, nil, fmt.Errorf("%w: opening link to rank %d at %s: %v", ErrPeerFailed, peer, addr, err)
	}
	return cc, stream, cancel, nil
}

// openLane completes a data link's lane: it waits for the receiver's
// answer on stream (bounded by ctx, which cancels the stream) and connects
// the lane it offers. A nil lane and nil error mean the receiver serves no
// lanes: the link stays on its stream.
//
// If ctx ends first, the stream is left open: the caller hands its cancel
// to teardown, so the receiver sees it end only after this rank's abort.
func (e *grpcEndpoint) openLane(ctx context.Context, stream grpc.ClientStream, peer int) (*laneConn, error) {
	addr := e.spec.Addrs[peer]
	type answer struct {
		token string
		err   error
	}
	ans := make(chan answer, 1)
	e.wg.Add(1)
	go func() { // ends with the stream (teardown cancels it at the latest)
		defer e.wg.Done()
		md, err := stream.Header()
		if err != nil {
			ans <- answer{err: err}
			return
		}
		if v := md.Get(mdLaneToken); len(v) == 1 {
			ans <- answer{token: v[0]}
			return
		}
		// No answer: the stream ended (refused) before it was accepted.
		var f InFrame
		err = stream.RecvMsg(&f)
		if err == nil || err == io.EOF {
			err = errors.New("it ended the link without answering the lane request")
		}
		ans <- answer{err: err}
	}()
	var a answer
	select {
	case a = <-ans:
	case <-ctx.Done():
		return nil, context.Cause(ctx)
	case <-e.fail.ch:
		return nil, e.fail.Err()
	}
	if a.err != nil {
		return nil, streamErr(peer, addr, a.err)
	}
	v := []string{a.token}
	if v[0] == laneNone {
		return nil, nil
	}
	tok, ok := parseLaneToken(v[0])
	if !ok {
		return nil, fmt.Errorf("%w: rank %d at %s answered the lane request with a malformed token", ErrPeerFailed, peer, addr)
	}
	lane, err := dialLane(ctx, &e.t.svc.cfg, addr, tok, func(c net.Conn) { e.addLane(newLaneConn(c, c)) })
	if err != nil {
		if ctx.Err() != nil {
			return nil, context.Cause(ctx)
		}
		var lf *laneFailed
		if errors.As(err, &lf) {
			return nil, &RemoteError{Rank: peer, Class: abortClassErr(uint64(lf.class)), Msg: lf.msg}
		}
		return nil, fmt.Errorf("%w: data lane to rank %d at %s: %v (to run the data plane over gRPC only, use --data-plane grpc)", ErrPeerFailed, peer, addr, err)
	}
	return lane, nil
}

// laneErr turns a lane I/O error into the endpoint's error; a lane cut in
// the middle of a frame, or broken, fails the endpoint.
func (e *grpcEndpoint) laneErr(ctx context.Context, what string, peer, ch int, err error) error {
	if ferr := e.fail.Err(); ferr != nil {
		return ferr
	}
	var lb *laneBroken
	broken := errors.As(err, &lb)
	if ctx.Err() != nil && (!broken || errors.Is(err, context.Cause(ctx))) {
		// Cancelled. A lane cut mid-frame stays marked broken: using it
		// again fails the endpoint (a cancelled collective aborts the
		// communicator anyway).
		return context.Cause(ctx)
	}
	if !broken && errors.Is(err, io.EOF) {
		err = errors.New("the sender closed it")
	}
	ferr := fmt.Errorf("%w: data lane %s rank %d at %s (channel %d): %w", ErrPeerFailed, what, peer, e.spec.Addrs[peer], ch, err)
	e.fail.fail(ferr)
	if f := e.fail.Err(); f != nil {
		return f
	}
	return ferr
}

// streamErr maps the status that ended a link to our errors.
func streamErr(peer int, addr string, err error) error {
	if st, ok := status.FromError(err); ok {
		if st.Code() == codes.FailedPrecondition && strings.Contains(st.Message(), staleReason) {
			return fmt.Errorf("%w: rank %d at %s: %s", ErrStaleGeneration, peer, addr, st.Message())
		}
	}
	return fmt.Errorf("%w: link to rank %d at %s ended: %v", ErrPeerFailed, peer, addr, err)
}

// watch waits for the end of an outbound link. A clean end (the peer
// closed its endpoint) only marks the link closed; anything else (the peer's
// node went away, refused the generation, ...) fails the endpoint.
func (e *grpcEndpoint) watch(l *grpcLink, stream grpc.ClientStream, peer int, done chan struct{}) {
	defer e.wg.Done()
	defer close(done)
	var f InFrame
	err := stream.RecvMsg(&f)
	if e.closed.Load() {
		return
	}
	if err == nil || err == io.EOF {
		l.peerClosed.Store(true)
		return
	}
	if st, ok := status.FromError(err); ok && st.Code() == codes.Aborted {
		if v := stream.Trailer().Get(mdAbortClass); len(v) == 1 {
			c, _ := strconv.ParseUint(v[0], 10, 8)
			e.fail.fail(&RemoteError{Rank: peer, Class: abortClassErr(c), Msg: st.Message()})
			return
		}
	}
	e.fail.fail(streamErr(peer, e.spec.Addrs[peer], err))
}

// sendLocal hands a frame to a rank of this process by reference: the
// receiver reads the sender's memory (or peer-copies through PeerReducer) and
// its Release reports SendDone.
func (e *grpcEndpoint) sendLocal(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	e.qmu.Lock()
	pe := e.lpeers[peer]
	e.qmu.Unlock()
	if pe == nil {
		var err error
		pe, err = e.t.svc.wait(ctx, localKey{e.spec.Job, e.spec.Generation, peer})
		if err != nil {
			done.SendDone()
			return streamErr(peer, e.spec.Addrs[peer], err)
		}
		e.qmu.Lock()
		e.lpeers[peer] = pe
		e.qmu.Unlock()
	}
	if pe.spec.Channels != e.spec.Channels || pe.n != e.n {
		done.SendDone()
		return &MismatchError{Msg: fmt.Sprintf("rank %d uses %d ranks and %d channels but rank %d uses %d ranks and %d channels: give every rank the same group and collective config",
			e.spec.Rank, e.n, e.spec.Channels, peer, pe.n, pe.spec.Channels)}
	}
	f := localFrame(h, e.spec.Rank, payload, ref, done)
	return deliverLocal(ctx, pe.lq[e.spec.Rank*pe.spec.Channels+ch], f, e.fail, pe.fail, peer, " (this process)")
}

// Send implements Endpoint.
func (e *grpcEndpoint) Send(ctx context.Context, peer, ch int, h *Header, payload []byte, ref PeerRef, done SendDone) error {
	if e.local[peer] {
		if err := e.fail.Err(); err != nil {
			done.SendDone()
			return err
		}
		return e.sendLocal(ctx, peer, ch, h, payload, ref, done)
	}
	l := &e.links[peer*e.spec.Channels+ch]
	l.mu.Lock()
	defer l.mu.Unlock()
	if err := e.fail.Err(); err != nil {
		done.SendDone()
		return err
	}
	if l.stream == nil {
		cc, stream, cancel, err := e.dial(ctx, context.Background(), peer, ch)
		if err != nil {
			done.SendDone()
			return err
		}
		var lane *laneConn
		if e.t.svc.cfg.DataPlane == DataPlaneTCP {
			if lane, err = e.openLane(ctx, stream, peer); err != nil {
				// The stream ends in teardown, after the abort (the
				// receiver would otherwise see a broken link first).
				e.qmu.Lock()
				e.cancels = append(e.cancels, func() { cancel(); _ = cc.Close() })
				e.qmu.Unlock()
				done.SendDone()
				return err
			}
		}
		if e.closed.Load() || (lane != nil && !e.addLane(lane)) {
			if lane != nil {
				_ = lane.close()
			}
			cancel()
			_ = cc.Close()
			done.SendDone()
			if err := e.fail.Err(); err != nil && !errors.Is(err, ErrClosed) {
				return err
			}
			return ErrClosed
		}
		l.cc, l.stream, l.cancel, l.lane = cc, stream, cancel, lane
		e.qmu.Lock()
		e.cancels = append(e.cancels, cancel)
		e.qmu.Unlock()
		l.watchDone = make(chan struct{})
		e.wg.Add(1)
		go e.watch(l, stream, peer, l.watchDone)
	}
	if l.peerClosed.Load() {
		done.SendDone()
		return fmt.Errorf("%w: rank %d at %s closed its endpoint", ErrPeerFailed, peer, e.spec.Addrs[peer])
	}
	hh := *h
	hh.Src = int32(e.spec.Rank)
	hh.Length = uint32(len(payload))
	if l.lane != nil {
		// Synchronous: when writeFrame returns, the kernel has the bytes.
		err := l.lane.writeFrame(ctx, &hh, payload)
		done.SendDone()
		if err != nil {
			return e.laneErr(ctx, "to", peer, ch, err)
		}
		return nil
	}
	m := outMsgPool.Get().(*outMsg)
	if mem.IsBelowBufferPoolingThreshold(cap(payload)) {
		m.whole = make([]byte, HeaderSize+len(payload))
		PutHeader(m.whole, &hh)
		copy(m.whole[HeaderSize:], payload)
		err := l.stream.SendMsg(m)
		m.whole = nil
		outMsgPool.Put(m)
		done.SendDone()
		return e.sendErr(peer, err)
	}
	PutHeader(m.hdr[:], &hh)
	m.data = payload
	m.done = done
	return e.sendErr(peer, l.stream.SendMsg(m))
}

func (e *grpcEndpoint) sendErr(peer int, err error) error {
	if err == nil {
		return nil
	}
	if ferr := e.fail.Err(); ferr != nil {
		return ferr
	}
	return fmt.Errorf("%w: sending to rank %d at %s: %v", ErrPeerFailed, peer, e.spec.Addrs[peer], err)
}

// Recv implements Endpoint: it reads the inbound stream (or lane)
// directly.
func (e *grpcEndpoint) Recv(ctx context.Context, peer, ch int) (*InFrame, error) {
	f, _, err := e.RecvTo(ctx, peer, ch, nil)
	return f, err
}

var laneFramePool = sync.Pool{New: func() any { return new(InFrame) }}

func releaseLane(f *InFrame) {
	if bp, ok := f.owner.(*[]byte); ok {
		sharedDirtyPool.Put(bp)
	}
	f.segs[0] = nil
	f.Payload, f.owner, f.release = nil, nil, nil
	laneFramePool.Put(f)
}

// RecvTo implements StreamReceiver. With a nil sink it is Recv: a lane's
// payload is read into a pooled buffer.
func (e *grpcEndpoint) RecvTo(ctx context.Context, peer, ch int, sink FrameSink) (*InFrame, Header, error) {
	if e.local[peer] {
		f, err := receiveLocal(ctx, e.lq[peer*e.spec.Channels+ch], e.fail)
		if err != nil {
			return nil, Header{}, err
		}
		return f, f.Header, nil
	}
	sl := e.slot(peer, ch)
	select {
	case <-sl.ready:
	default:
		select {
		case <-sl.ready:
		case <-ctx.Done():
			return nil, Header{}, context.Cause(ctx)
		case <-e.fail.ch:
			return nil, Header{}, e.fail.Err()
		}
	}
	if err := e.fail.Err(); err != nil {
		return nil, Header{}, err
	}
	if sl.lane == nil {
		f, err := e.recvStream(sl, peer, ch)
		if err != nil {
			return nil, Header{}, err
		}
		return f, f.Header, nil
	}
	l := sl.lane
	h, err := l.readHeader(ctx)
	if err != nil {
		if !errors.As(err, new(*laneBroken)) && !errors.Is(err, context.Cause(ctx)) {
			sl.finish()
		}
		return nil, h, e.laneErr(ctx, "from", peer, ch, err)
	}
	n := int(h.Length)
	if sink == nil {
		f := laneFramePool.Get().(*InFrame)
		f.Header = h
		f.Payload = f.segs[:0]
		if n > 0 {
			bp := sharedDirtyPool.Get(n)
			if err := l.readFull(ctx, *bp, true); err != nil {
				sharedDirtyPool.Put(bp)
				laneFramePool.Put(f)
				return nil, h, e.laneErr(ctx, "from", peer, ch, err)
			}
			f.segs[0] = *bp
			f.Payload = f.segs[:1]
			f.owner = bp
		}
		f.release = releaseLane
		return f, h, nil
	}
	l.rh = h // a field, not &h: the header would escape to the heap per frame
	dst, err := sink.Begin(&l.rh)
	if err != nil {
		l.rbroken = true // the rest of the frame stays unread
		return nil, h, err
	}
	if dst != nil {
		if len(dst) != n {
			l.rbroken = true
			return nil, h, fmt.Errorf("%w: frame sink gave %d bytes for a %d-byte payload", ErrBadArgument, len(dst), n)
		}
		err = l.readFull(ctx, dst, true)
	} else {
		err = l.readPieces(ctx, n, sink)
	}
	if err != nil {
		return nil, h, e.laneErr(ctx, "from", peer, ch, err)
	}
	return nil, h, nil
}

func (e *grpcEndpoint) recvStream(sl *inSlot, peer, ch int) (*InFrame, error) {
	f := grpcFramePool.Get().(*InFrame)
	if err := sl.stream.RecvMsg(f); err != nil {
		grpcFramePool.Put(f)
		sl.finish()
		if ferr := e.fail.Err(); ferr != nil {
			return nil, ferr
		}
		if err == io.EOF {
			err = errors.New("the sender closed it")
		}
		ferr := fmt.Errorf("%w: link from rank %d (channel %d) ended: %v", ErrPeerFailed, peer, ch, err)
		e.fail.fail(ferr)
		return nil, ferr
	}
	return f, nil
}

// Abort implements Endpoint: one short control stream to every peer.
func (e *grpcEndpoint) Abort(ctx context.Context, cause error) {
	e.fail.fail(cause)
	msg := []byte(abortMessage(cause))
	h := Header{Kind: FrameAbort, Tag: abortClassOf(cause), Generation: e.spec.Generation, Group: GroupHash(e.spec.Job), Src: int32(e.spec.Rank), Length: uint32(len(msg))}
	frame := AppendFrame(nil, &h, msg)
	var wg sync.WaitGroup
	for p := 0; p < e.n; p++ {
		if p == e.spec.Rank {
			continue
		}
		wg.Add(1)
		go func(p int) {
			defer wg.Done()
			cc, stream, cancel, err := e.dial(ctx, ctx, p, controlChannel)
			if err != nil {
				return
			}
			defer func() { cancel(); _ = cc.Close() }()
			m := &outMsg{whole: frame}
			if stream.SendMsg(m) == nil && stream.CloseSend() == nil {
				var f InFrame
				_ = stream.RecvMsg(&f) // until the peer has read it (or ctx ends)
			}
		}(p)
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		<-done // dial and streams end with ctx
	}
	e.teardown()
}

// teardown cancels every link's stream, which unblocks senders stuck on
// flow control, and closes every lane; the links are unusable afterwards.
func (e *grpcEndpoint) teardown() {
	e.qmu.Lock()
	cancels := e.cancels
	e.cancels = nil
	e.qmu.Unlock()
	for _, c := range cancels {
		c()
	}
	e.shutLanes()
}

func (e *grpcEndpoint) Failed() <-chan struct{} { return e.fail.ch }
func (e *grpcEndpoint) Err() error              { return e.fail.Err() }

// Close implements Endpoint.
func (e *grpcEndpoint) Close() error {
	if e.closed.Swap(true) {
		return nil
	}
	e.t.svc.remove(e)
	e.fail.fail(ErrClosed) // our inbound handlers return: peers see a clean end
	// Half-close every outbound link and give the receivers until they close
	// their endpoints (at most CloseWait) to read what is still buffered:
	// cancelling a stream discards its unread data.
	wctx, wcancel := context.WithTimeout(context.Background(), e.t.svc.cfg.CloseWait)
	defer wcancel()
	for i := range e.links {
		l := &e.links[i]
		l.mu.Lock()
		if l.stream != nil {
			_ = l.stream.CloseSend()
		}
		l.mu.Unlock()
	}
	for i := range e.links {
		l := &e.links[i]
		if l.watchDone == nil {
			continue
		}
		select {
		case <-l.watchDone:
		case <-wctx.Done():
		}
	}
	for i := range e.links {
		l := &e.links[i]
		l.mu.Lock()
		if l.stream != nil {
			l.cancel()
			_ = l.cc.Close()
			l.stream = nil
		}
		if l.lane != nil {
			_ = l.lane.close()
			l.lane = nil
		}
		l.mu.Unlock()
	}
	e.teardown()
	e.wg.Wait()
	for _, q := range e.lq { // give queued in-process frames back to their senders
		if q == nil {
			continue
		}
	drain:
		for {
			select {
			case f := <-q:
				f.Release()
			default:
				break drain
			}
		}
	}
	return nil
}

// Server is a standalone data-plane server (benchmarks, tests, and
// processes that serve no other gRPC service).
type Server struct {
	gs   *grpc.Server
	lis  net.Listener
	svc  *Service
	wg   sync.WaitGroup
	tr   *NetTransport
	once sync.Once
}

// Listen starts a data-plane server on addr ("127.0.0.1:0" for a free port).
func Listen(addr string, cfg NetConfig) (*Server, error) {
	svc, err := NewService(cfg)
	if err != nil {
		return nil, err
	}
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("collective: listen on %s: %w", addr, err)
	}
	if cfg.DataPlane == DataPlaneTCP {
		lis = svc.Listener(lis) // lanes share the port
	}
	gs := grpc.NewServer(ServerOptions(cfg)...)
	svc.Register(gs)
	s := &Server{gs: gs, lis: lis, svc: svc, tr: NewNetTransport(svc)}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		_ = gs.Serve(lis)
	}()
	return s, nil
}

// Addr is the listening address ("host:port").
func (s *Server) Addr() string { return s.lis.Addr().String() }

// Service returns the server's data-plane service.
func (s *Server) Service() *Service { return s.svc }

// Transport returns a transport whose inbound side is this server.
func (s *Server) Transport() *NetTransport { return s.tr }

// Close stops the server: open streams and the lanes of its endpoints are
// cut, as if the node went away. Safe to call twice.
func (s *Server) Close() {
	s.once.Do(func() {
		s.gs.Stop()
		s.wg.Wait()
		s.svc.mu.Lock()
		eps := make([]*grpcEndpoint, 0, len(s.svc.eps))
		for _, ep := range s.svc.eps {
			eps = append(eps, ep)
		}
		s.svc.mu.Unlock()
		for _, ep := range eps {
			ep.shutLanes()
		}
	})
}
