package collective

import (
	"context"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// The inbound side of the data plane: the Link service.
//
// One bidirectional-streaming method, /gpumesh.collective.v1.DataPlane/Link,
// sets up every link from a sending rank to a receiving rank: one stream per
// (sender, receiver, channel). The stream's metadata says which job,
// generation, sender, receiver and channel it is for, so one Service
// multiplexes every communicator of the process. With DataPlaneTCP (the
// default) the stream answers with a lane token and the frames travel on
// the lane (lane.go); with DataPlaneGRPC they travel on the stream itself
// (streamcodec.go). Channel -1 is the control link: a rank's abort arrives
// there. A stream that ends with an error says why in its status
// (netstatus.go). The receiving rank reads its links itself (netrecv.go).

const (
	dataPlaneService = "gpumesh.collective.v1.DataPlane"
	linkMethod       = "/" + dataPlaneService + "/Link"
	mdJob            = "gpumesh-job"
	mdGen            = "gpumesh-generation"
	mdSrc            = "gpumesh-src-rank"
	mdDst            = "gpumesh-dst-rank"
	mdChan           = "gpumesh-channel"
	controlChannel   = -1
)

// Service is the receiving side of the data plane for every communicator
// of this process. Register it on the node's *grpc.Server; give the same
// Service to NewNetTransport.
type Service struct {
	cfg NetConfig
	log hclog.Logger

	mu      sync.Mutex
	eps     map[localKey]*netEndpoint
	latest  map[string]uint64
	waiters map[localKey]chan struct{}
	offers  map[laneToken]*laneOffer

	unixName string // same-host lane socket (lane_unix.go), under mu

	lanesServed       atomicBool
	lanesAccepted     atomic.Uint64
	unixLanesAccepted atomic.Uint64
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
	return &Service{cfg: cfg, log: log.Named("dataplane"), eps: map[localKey]*netEndpoint{}, latest: map[string]uint64{}, waiters: map[localKey]chan struct{}{}, offers: map[laneToken]*laneOffer{}}, nil
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
				md := metadata.Pairs(mdLaneToken, hex.EncodeToString(tok[:]))
				if name := s.unixLaneName(); name != "" {
					md.Append(mdLaneUnix, name)
				}
				if err := stream.SendHeader(md); err != nil {
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
				return linkStatus(codes.Aborted, abortClassOf(err), abortMessage(err))
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
func (s *Service) wait(ctx context.Context, k localKey) (*netEndpoint, error) {
	timer := time.NewTimer(s.cfg.RankWait)
	defer timer.Stop()
	for {
		s.mu.Lock()
		if latest, ok := s.latest[k.job]; ok && k.gen < latest {
			s.mu.Unlock()
			return nil, linkStatus(codes.FailedPrecondition, abortClassOf(ErrStaleGeneration),
				fmt.Sprintf("collective: stale generation %d of job %q refused: this node serves generation %d", k.gen, k.job, latest))
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

func (s *Service) add(ep *netEndpoint) error {
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

func (s *Service) remove(ep *netEndpoint) {
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
