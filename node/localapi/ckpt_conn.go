package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"time"

	"golang.org/x/sys/unix"

	"github.com/gpumesh/gpumesh/checkpoint"
)

// RankID names the rank a checkpoint connection speaks for (authenticated
// by its hello).
type RankID struct {
	Job        string
	Generation uint64
	Rank       int
}

// Checkpointer stores and finds the checkpoints of the jobs whose ranks run
// here (the node implements it over package checkpoint, with the job's
// checkpoint block and the agent's prefetch). Methods are called from
// connection goroutines, concurrently, and may block on storage I/O until
// ctx ends.
type Checkpointer interface {
	// CreatePart starts the rank's part of the checkpoint of step.
	CreatePart(ctx context.Context, r RankID, step int64) (CheckpointPart, error)
	// Commit writes the manifest of a checkpoint whose parts are stored
	// (the Checkpointer fills in the job and generation).
	Commit(ctx context.Context, r RankID, m checkpoint.Manifest) error
	// Latest returns the newest complete checkpoint, or wraps
	// checkpoint.ErrNoCheckpoint.
	Latest(ctx context.Context, r RankID) (checkpoint.Manifest, error)
	// List returns the complete checkpoints, oldest first.
	List(ctx context.Context, r RankID) ([]checkpoint.Manifest, error)
	// Open returns a part of a checkpoint as a checked local file (see
	// OPEN in ckpt_proto.go; step -1 the newest, part -1 the rank's);
	// wraps checkpoint.ErrNoCheckpoint when there is none. The caller
	// closes OpenedPart.File.
	Open(ctx context.Context, r RankID, step int64, part, world int) (OpenedPart, error)
}

// CheckpointPart is a part being written (checkpoint.PartFile).
type CheckpointPart interface {
	File() *os.File
	Commit(ctx context.Context) (checkpoint.Part, error)
	Abort()
}

var _ CheckpointPart = (*checkpoint.PartFile)(nil)

// OpenedPart is a part handed to a rank.
type OpenedPart struct {
	Manifest checkpoint.Manifest
	Part     int
	File     *os.File
	// Prefetched: the copy the agent fetched when the rank started.
	Prefetched      bool
	WaitSeconds     float64
	PrefetchSeconds float64
}

// serveCheckpoint runs a checkpoint connection after its first packet.
func (cn *conn) serveCheckpoint(first []byte, buf, oob []byte) {
	h, err := DecodeCkptHello(first)
	if err == nil && h.Version != Version {
		err = fmt.Errorf("%w: client speaks protocol version %d, this agent %d (install the gpumesh Python package of the same release as the agent)", ErrProtocol, h.Version, Version)
	}
	if err == nil && cn.s.cfg.Checkpointer == nil {
		err = fmt.Errorf("%w: this agent serves no checkpoints", ErrDenied)
	}
	if err != nil {
		cn.fatal(StatusBadRequest, err)
		return
	}
	ctx, cancel := context.WithTimeout(cn.ctx, cn.s.cfg.HelloTimeout)
	_, err = cn.s.cfg.Authorizer.Authorize(ctx, &Hello{Version: h.Version, Rank: h.Rank, GroupSize: 1, Generation: h.Generation, Job: h.Job, GroupID: "checkpoint", Secret: h.Secret, Ranks: []int{h.Rank}})
	cancel()
	if err != nil {
		status := uint8(StatusBadRequest)
		if errors.Is(err, ErrDenied) {
			status = StatusDenied
		}
		cn.s.log.Warn("local API checkpoint client refused", "job", h.Job, "rank", h.Rank, "error", err)
		cn.fatal(status, err)
		return
	}
	if err := cn.reply(Reply{Type: MsgWelcome}); err != nil {
		return
	}
	_ = cn.c.SetReadDeadline(time.Time{})
	cs := &ckptConn{cn: cn, r: RankID{Job: h.Job, Generation: h.Generation, Rank: h.Rank}, parts: map[uint64]CheckpointPart{}}
	defer cs.abortAll()
	for {
		pkt, fds, err := recvPacket(cn.c, buf, oob)
		if err != nil {
			if !errors.Is(err, errEOF) && !errors.Is(err, net.ErrClosed) && cn.ctx.Err() == nil {
				cn.fatal(StatusBadRequest, err)
			}
			return
		}
		if err := cs.handle(pkt, fds); err != nil {
			cn.s.log.Warn("local API checkpoint client sent a bad message; closing", "job", h.Job, "rank", h.Rank, "error", err)
			cn.fatal(StatusBadRequest, err)
			return
		}
	}
}

// ckptConn is one checkpoint connection's state, owned by its read loop.
type ckptConn struct {
	cn    *conn
	r     RankID
	parts map[uint64]CheckpointPart // begun, by PUT_BEGIN request id
}

func (cs *ckptConn) abortAll() {
	for id, p := range cs.parts {
		p.Abort()
		delete(cs.parts, id)
	}
}

// handle answers one request; an error is a protocol violation that
// closes the connection.
func (cs *ckptConn) handle(pkt []byte, fds []int) error {
	req, err := DecodeCkptRequest(pkt)
	if err != nil {
		closeFDs(fds)
		return err
	}
	raw := req.Body
	if req.Flags&FlagBodyInFD != 0 {
		if len(fds) != 1 {
			closeFDs(fds)
			return fmt.Errorf("%w: a body in a descriptor needs exactly one, got %d", ErrProtocol, len(fds))
		}
		raw, err = readFD(fds[0], int(req.Len))
		if err != nil {
			return err
		}
	} else {
		closeFDs(fds)
	}
	body, err := decodeBody(raw)
	if err != nil {
		return err
	}
	out, file, err := cs.do(req, body)
	if file != nil {
		defer file.Close()
	}
	if err != nil {
		return cs.send(req.ID, ckptStatus(err), []byte(err.Error()), nil)
	}
	b, err := json.Marshal(out)
	if err != nil {
		return err
	}
	return cs.send(req.ID, StatusOK, b, file)
}

// ckptStatus is the reply status of a failed checkpoint request.
func ckptStatus(err error) uint8 {
	switch {
	case errors.Is(err, checkpoint.ErrInvalidConfig), errors.Is(err, checkpoint.ErrIncomplete), errors.Is(err, ErrProtocol), errors.Is(err, checkpoint.ErrNotFound):
		return StatusBadRequest
	}
	return StatusFailed
}

func (cs *ckptConn) do(req CkptRequest, b CkptBody) (CkptBody, *os.File, error) {
	ctx, cp := cs.cn.ctx, cs.cn.s.cfg.Checkpointer
	switch req.Kind {
	case CkptPutBegin:
		if b.Step == nil || *b.Step < 0 {
			return CkptBody{}, nil, fmt.Errorf("%w: put_begin needs a step >= 0", checkpoint.ErrInvalidConfig)
		}
		if _, dup := cs.parts[req.ID]; dup {
			return CkptBody{}, nil, fmt.Errorf("%w: request id %d already names a part", ErrProtocol, req.ID)
		}
		p, err := cp.CreatePart(ctx, cs.r, *b.Step)
		if err != nil {
			return CkptBody{}, nil, err
		}
		// The descriptor the rank gets is a duplicate: the part keeps its own.
		fd, err := unix.Dup(int(p.File().Fd()))
		if err != nil {
			p.Abort()
			return CkptBody{}, nil, err
		}
		cs.parts[req.ID] = p
		return CkptBody{}, os.NewFile(uintptr(fd), p.File().Name()), nil
	case CkptPutEnd, CkptPutAbort:
		p := cs.parts[b.ID]
		if p == nil {
			return CkptBody{}, nil, fmt.Errorf("%w: no part begun by request %d on this connection", checkpoint.ErrInvalidConfig, b.ID)
		}
		delete(cs.parts, b.ID)
		if req.Kind == CkptPutAbort {
			p.Abort()
			return CkptBody{}, nil, nil
		}
		part, err := p.Commit(ctx)
		if err != nil {
			return CkptBody{}, nil, err
		}
		return CkptBody{Parts: []checkpoint.Part{part}}, nil, nil
	case CkptCommit:
		if b.Step == nil {
			return CkptBody{}, nil, fmt.Errorf("%w: commit needs a step", checkpoint.ErrInvalidConfig)
		}
		m := checkpoint.Manifest{Step: *b.Step, WorldSize: b.WorldSize, Parts: b.Parts, Meta: b.Meta}
		return CkptBody{}, nil, cp.Commit(ctx, cs.r, m)
	case CkptLatest:
		m, err := cp.Latest(ctx, cs.r)
		found := err == nil
		if errors.Is(err, checkpoint.ErrNoCheckpoint) {
			return CkptBody{Found: &found}, nil, nil
		}
		if err != nil {
			return CkptBody{}, nil, err
		}
		return CkptBody{Found: &found, Manifest: &m}, nil, nil
	case CkptList:
		ms, err := cp.List(ctx, cs.r)
		if err != nil {
			return CkptBody{}, nil, err
		}
		if ms == nil {
			ms = []checkpoint.Manifest{}
		}
		return CkptBody{Manifests: ms}, nil, nil
	case CkptOpen:
		step, part := int64(-1), -1
		if b.Step != nil {
			step = *b.Step
		}
		if b.Part != nil {
			part = *b.Part
		}
		o, err := cp.Open(ctx, cs.r, step, part, b.WorldSize)
		found := err == nil
		if errors.Is(err, checkpoint.ErrNoCheckpoint) {
			return CkptBody{Found: &found}, nil, nil
		}
		if err != nil {
			return CkptBody{}, nil, err
		}
		src := "store"
		if o.Prefetched {
			src = "prefetch"
		}
		return CkptBody{Found: &found, Manifest: &o.Manifest, Part: &o.Part, Source: src,
			WaitSeconds: &o.WaitSeconds, PrefetchSeconds: &o.PrefetchSeconds}, o.File, nil
	}
	return CkptBody{}, nil, fmt.Errorf("%w: unknown checkpoint request kind %d", ErrProtocol, req.Kind)
}

// send writes one reply, its body in a memfd when it does not fit a
// packet, and file's descriptor after it.
func (cs *ckptConn) send(id uint64, status uint8, body []byte, file *os.File) error {
	var flags uint8
	var fds []int
	if len(body) > maxInlineBody {
		fd, err := memfdWith(body)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		flags |= FlagBodyInFD
		fds = append(fds, fd)
	}
	if file != nil {
		flags |= FlagFile
		fds = append(fds, int(file.Fd()))
	}
	pkt := EncodeCkptPacket(MsgCkptReply, status, flags, id, body)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	cs.cn.wmu.Lock()
	defer cs.cn.wmu.Unlock()
	_ = cs.cn.c.SetWriteDeadline(time.Now().Add(cs.cn.s.cfg.Collective.Timeout))
	_, _, err := cs.cn.c.WriteMsgUnix(pkt, oob, nil)
	return err
}

// readFD reads n bytes from the start of fd (a body in a memfd) and closes
// it.
func readFD(fd, n int) ([]byte, error) {
	defer unix.Close(fd)
	b := make([]byte, n)
	for off := 0; off < n; {
		k, err := unix.Pread(fd, b[off:], int64(off))
		if err != nil {
			return nil, fmt.Errorf("%w: reading a body from its descriptor: %v", ErrProtocol, err)
		}
		if k == 0 {
			return nil, fmt.Errorf("%w: the body's descriptor holds %d bytes, fewer than the %d announced", ErrProtocol, off, n)
		}
		off += k
	}
	return b, nil
}
