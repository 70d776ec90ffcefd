package localapi

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// conn is one client connection: one rank of one process group. Its read
// loop (serve) owns the region table; operations run on worker goroutines
// (one for the collectives, one per peer and direction for sends and
// receives), in issue order across them (order.go), and hold references on
// the regions they use, so a region is unmapped only when no operation
// uses it.
type conn struct {
	s   *Server
	c   *net.UnixConn
	sio *sockIO // c's raw reads (read loop) and writes (under wmu); nil: c is unusable

	ctx    context.Context
	cancel context.CancelCauseFunc

	hello *Hello
	comm  *collective.Communicator
	bye   bool // the client said BYE (read loop only)

	wmu  sync.Mutex // one reply at a time
	wbuf []byte     // the reply being written (under wmu)

	rmu       sync.Mutex
	regions   map[uint64]*region
	events    map[[16]byte]deviceEvent // CUDA stream-order events by GPU (cuda.go)
	oldEvents []deviceEvent            // every event registered, closed at the end

	queues  map[queueKey]chan *work
	order   issueOrder // what the next operation waits for (read loop only)
	workers sync.WaitGroup

	smu sync.Mutex
	st  RankStats
}

type region struct {
	mem  []byte
	dev  deviceMem // device memory by CUDA IPC handle instead of mem (cuda.go)
	refs int       // operations using it, plus one while registered
	dead bool      // unregistered or connection ended
}

// unmap releases the region's memory (its last reference went).
func (cn *conn) unmap(r *region) {
	if r.dev != nil {
		if err := r.dev.Close(); err != nil {
			cn.s.log.Warn("closing a CUDA IPC mapping", "error", err)
		}
		r.dev = nil
		cn.s.cudaMaps.Add(-1)
	} else {
		unmapRegion(r.mem)
		r.mem = nil
	}
	cn.s.regCount.Add(-1)
}

type queueKey struct {
	peer int
	dir  uint8 // 0 collective, OpSend, OpRecv
}

// work is one accepted operation.
type work struct {
	op   Op
	a, b collective.Buffer
	// sends, recvs: the blocks of a table operation, by group rank (nil:
	// none with that rank).
	sends, recvs []collective.Buffer
	regs         []*region
	dev          bool        // a and b are device memory (cuda.go)
	ev           deviceEvent // wait for it before running (a CUDA op)
	rels         []func()    // release the device buffers
	started      time.Time
	bytes        uint64
	// after: the operations it must wait for (issueOrder); done fires
	// when it has finished.
	after []<-chan struct{}
	done  doneSignal

	// holds counts the frames sent from a and b that a transport or a
	// peer may still read, plus one while the operation runs; the last
	// one gone releases the work's regions (see frameHold).
	holds atomic.Int64
	cn    *conn
}

// frameHold is the work's collective.FrameHold: the operation's regions
// stay mapped until it has returned and every frame it sent was released.
// When the operation fails, a rank of this agent (another client's
// operation) may still hold a frame that reads this client's memory; the
// memory is unmapped (or the CUDA IPC mapping closed) only after that
// rank let go of it, on whichever goroutine releases the last frame.
type frameHold work

func (h *frameHold) Hold() { h.holds.Add(1) }

func (h *frameHold) Release() {
	if h.holds.Add(-1) == 0 {
		h.cn.release((*work)(h))
	}
}

func newConn(s *Server, c *net.UnixConn) *conn {
	cn := &conn{s: s, c: c, regions: map[uint64]*region{}, queues: map[queueKey]chan *work{}}
	cn.ctx, cn.cancel = context.WithCancelCause(context.Background())
	if sio, err := newSockIO(c, s.cfg.Collective.Timeout); err == nil {
		cn.sio = sio
	} else {
		s.log.Warn("local API connection unusable", "error", err)
	}
	return cn
}

// shutdown aborts the connection from outside (server closing).
func (cn *conn) shutdown() {
	cn.cancel(ErrClosed)
	_ = cn.c.Close()
}

// reply writes one answer; a client that does not read its answers gets
// the collective timeout before the write fails (sockIO.send).
func (cn *conn) reply(r Reply) error {
	if cn.sio == nil {
		return net.ErrClosed
	}
	cn.wmu.Lock()
	defer cn.wmu.Unlock()
	cn.wbuf = appendReply(cn.wbuf[:0], r)
	return cn.sio.send(cn.wbuf)
}

func (cn *conn) fatal(status uint8, err error) {
	_ = cn.reply(Reply{Type: MsgError, Status: status, Message: err.Error()})
}

func (cn *conn) serve() {
	cn.s.goCount.Add(1)
	defer cn.s.goCount.Add(-1)
	var key *groupKey
	defer func() {
		cn.cancel(errEOF)
		_ = cn.c.Close()
		for _, q := range cn.queues {
			close(q)
		}
		cn.workers.Wait()
		if cn.comm != nil {
			if !cn.bye {
				// The process died (or dropped the connection) without
				// destroying its group: the peers must not wait for it
				// until their collective timeout.
				why := "its process ended without destroying the process group (it died or was killed)"
				if errors.Is(context.Cause(cn.ctx), ErrClosed) {
					why = "its agent is shutting down"
				}
				cn.comm.Abort(fmt.Errorf("%w: rank %d (group %q rank %d) of job %s: %s",
					collective.ErrPeerFailed, cn.hello.Rank, cn.hello.GroupID, cn.hello.GroupRank, cn.hello.Job, why))
			}
			_ = cn.comm.Close()
		}
		cn.rmu.Lock()
		for id, r := range cn.regions {
			delete(cn.regions, id)
			cn.dropLocked(r)
		}
		cn.rmu.Unlock()
		cn.closeEvents()
		cn.s.ended_(cn, key)
	}()
	buf := make([]byte, MaxMessage)
	oob := make([]byte, 256)
	if cn.sio == nil {
		return
	}
	_ = cn.c.SetReadDeadline(time.Now().Add(cn.s.cfg.HelloTimeout))
	pkt, fds, err := cn.sio.recv(buf, oob)
	if err != nil {
		return
	}
	closeFDs(fds)
	if pkt[0] == MsgCkptHello {
		cn.serveCheckpoint(pkt, buf, oob)
		return
	}
	req, err := DecodeRequest(pkt)
	if err == nil && req.Hello == nil {
		err = fmt.Errorf("%w: the first message must be a hello", ErrProtocol)
	}
	if err != nil {
		cn.fatal(StatusBadRequest, err)
		return
	}
	k, err := cn.attach(req.Hello)
	if err != nil {
		status := uint8(StatusBadRequest)
		if errors.Is(err, ErrDenied) {
			status = StatusDenied
		}
		cn.s.log.Warn("local API client refused", "job", req.Hello.Job, "rank", req.Hello.Rank, "error", err)
		cn.fatal(status, err)
		return
	}
	key = &k
	if err := cn.reply(Reply{Type: MsgWelcome}); err != nil {
		return
	}
	cn.workers.Add(1)
	cn.s.goCount.Add(1)
	go cn.watchComm()
	_ = cn.c.SetReadDeadline(time.Time{})
	for {
		pkt, fds, err := cn.sio.recv(buf, oob)
		if err != nil {
			if !errors.Is(err, errEOF) && !errors.Is(err, net.ErrClosed) && cn.ctx.Err() == nil {
				cn.fatal(StatusBadRequest, err)
			}
			return
		}
		if err := cn.handle(pkt, fds); err != nil {
			cn.s.log.Warn("local API client sent a bad message; closing", "job", cn.hello.Job, "rank", cn.hello.Rank, "error", err)
			cn.fatal(StatusBadRequest, err)
			return
		}
	}
}

// watchComm tells the client when its group fails while the connection is
// open, in flight or idle (a peer died or aborted): FAILED, unasked, so
// that the client fails at once instead of at its next operation's
// timeout.
func (cn *conn) watchComm() {
	defer cn.workers.Done()
	defer cn.s.goCount.Add(-1)
	select {
	case <-cn.comm.Done():
	case <-cn.ctx.Done():
		return
	}
	err := cn.comm.Err()
	if err == nil || errors.Is(err, collective.ErrClosed) || cn.ctx.Err() != nil {
		return
	}
	_ = cn.reply(Reply{Type: MsgFailed, Status: StatusFailed, Message: err.Error()})
}

// attach authorizes the hello and creates the group's communicator.
func (cn *conn) attach(h *Hello) (groupKey, error) {
	if h.Version != Version {
		return groupKey{}, fmt.Errorf("%w: client speaks protocol version %d, this agent %d (install the gpumesh Python package of the same release as the agent)", ErrProtocol, h.Version, Version)
	}
	if h.GroupRank < 0 || h.GroupRank >= h.GroupSize || len(h.Ranks) != h.GroupSize || h.Ranks[h.GroupRank] != h.Rank {
		return groupKey{}, fmt.Errorf("%w: group rank %d of %d does not name global rank %d in %v", ErrProtocol, h.GroupRank, h.GroupSize, h.Rank, h.Ranks)
	}
	ctx, cancel := context.WithTimeout(cn.ctx, cn.s.cfg.HelloTimeout)
	defer cancel()
	addrs, err := cn.s.cfg.Authorizer.Authorize(ctx, h)
	if err != nil {
		return groupKey{}, err
	}
	seen := make(map[int]bool, len(h.Ranks))
	gaddrs := make([]string, len(h.Ranks))
	for i, r := range h.Ranks {
		if r < 0 || r >= len(addrs) || seen[r] {
			return groupKey{}, fmt.Errorf("%w: group ranks %v must be distinct ranks of the job's %d", ErrProtocol, h.Ranks, len(addrs))
		}
		seen[r] = true
		gaddrs[i] = addrs[r]
	}
	k := groupKey{job: h.Job, gen: h.Generation, group: h.GroupID, grpRank: h.GroupRank}
	if !cn.s.attach(k) {
		return groupKey{}, fmt.Errorf("%w: rank %d of group %q of job %s generation %d is already attached by another connection", ErrDenied, h.GroupRank, h.GroupID, h.Job, h.Generation)
	}
	cfg := cn.s.cfg.Collective
	cfg.Logger = cn.s.log
	comm, err := collective.New(cn.s.cfg.Transport, collective.Group{
		Job: h.Job + "/pg/" + h.GroupID, Generation: h.Generation, Rank: h.GroupRank, Addrs: gaddrs,
	}, cfg)
	if err != nil {
		cn.s.mu.Lock()
		delete(cn.s.attached, k)
		cn.s.mu.Unlock()
		return groupKey{}, err
	}
	cn.hello, cn.comm = h, comm
	cn.smu.Lock()
	cn.st = RankStats{Job: h.Job, Generation: h.Generation, Group: h.GroupID, Rank: h.Rank, GroupRank: h.GroupRank, Open: true,
		Ops: map[string]uint64{}, Bytes: map[string]uint64{}, LatencySeconds: map[string]float64{}, MaxLatencySeconds: map[string]float64{}}
	cn.smu.Unlock()
	cn.s.log.Info("local API client attached", "job", h.Job, "generation", h.Generation, "group", h.GroupID, "rank", h.Rank, "group_rank", h.GroupRank, "group_size", h.GroupSize)
	return k, nil
}

func (cn *conn) stats() (RankStats, bool) {
	cn.smu.Lock()
	defer cn.smu.Unlock()
	if cn.st.Ops == nil {
		return RankStats{}, false
	}
	st := cn.st
	st.Ops, st.Bytes = cloneMap(st.Ops), cloneMap(st.Bytes)
	st.LatencySeconds, st.MaxLatencySeconds = cloneMap(st.LatencySeconds), cloneMap(st.MaxLatencySeconds)
	return st, true
}

func cloneMap[V any](m map[string]V) map[string]V {
	out := make(map[string]V, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

// handle processes one packet after the hello. An error closes the
// connection (protocol violation); a bad operation is answered instead.
func (cn *conn) handle(pkt []byte, fds []int) error {
	req, err := DecodeRequest(pkt)
	if err != nil {
		closeFDs(fds)
		return err
	}
	if req.Register == nil {
		closeFDs(fds)
	}
	switch {
	case req.Hello != nil:
		return fmt.Errorf("%w: a second hello", ErrProtocol)
	case req.Register != nil:
		return cn.register(req.Register, fds)
	case req.RegisterCUDA != nil:
		return cn.registerCUDA(req.RegisterCUDA)
	case req.Bye:
		cn.bye = true
		return nil
	case req.Unregister != nil:
		cn.rmu.Lock()
		if r := cn.regions[*req.Unregister]; r != nil {
			delete(cn.regions, *req.Unregister)
			cn.dropLocked(r)
		}
		cn.rmu.Unlock()
		return nil
	}
	w, err := cn.accept(req.Op)
	if err != nil {
		return cn.reply(Reply{Type: MsgDone, Status: errorStatus(err), ID: req.Op.ID, Message: err.Error()})
	}
	k := queueOf(w.op)
	w.after = cn.order.admit(k, &w.done)
	q := cn.queue(k)
	select {
	case q <- w:
		return nil
	case <-cn.ctx.Done():
		w.done.fire()
		cn.release(w)
		return nil
	}
}

func (cn *conn) register(r *Register, fds []int) error {
	if len(fds) != 1 {
		closeFDs(fds)
		return cn.reply(Reply{Type: MsgRegistered, Status: StatusBadRequest, ID: r.ID,
			Message: fmt.Sprintf("%v: register needs exactly one file descriptor, got %d", ErrBadRegion, len(fds))})
	}
	cn.rmu.Lock()
	n, dup := len(cn.regions), cn.regions[r.ID] != nil
	cn.rmu.Unlock()
	if dup || n >= cn.s.cfg.MaxRegions {
		closeFDs(fds)
		return cn.reply(Reply{Type: MsgRegistered, Status: StatusBadRequest, ID: r.ID,
			Message: fmt.Sprintf("%v: region %d is already registered, or the connection has %d regions (the limit)", ErrBadRegion, r.ID, n)})
	}
	mem, err := mapRegion(fds[0], r.Size, cn.s.cfg.MaxRegionBytes)
	if err != nil {
		return cn.reply(Reply{Type: MsgRegistered, Status: StatusBadRequest, ID: r.ID, Message: err.Error()})
	}
	cn.s.regCount.Add(1)
	cn.rmu.Lock()
	cn.regions[r.ID] = &region{mem: mem, refs: 1}
	cn.rmu.Unlock()
	return cn.reply(Reply{Type: MsgRegistered, ID: r.ID})
}

// dropLocked removes a reference (under rmu); the last one unmaps.
func (cn *conn) dropLocked(r *region) {
	if r.dead && r.refs == 0 {
		return
	}
	r.refs--
	r.dead = true
	if r.refs == 0 {
		cn.unmap(r)
	}
}

func (cn *conn) releaseRegion(r *region) {
	cn.rmu.Lock()
	defer cn.rmu.Unlock()
	r.refs--
	if r.refs == 0 {
		cn.unmap(r)
	}
}

func (cn *conn) release(w *work) {
	for _, f := range w.rels {
		f()
	}
	w.rels = nil
	for _, r := range w.regs {
		cn.releaseRegion(r)
	}
	w.regs = nil
	w.a, w.b = nil, nil
	w.sends, w.recvs = nil, nil
}

// buffer resolves ref to a buffer over its region, taking a reference.
// Both buffers of an operation must be of one kind (host or device).
func (cn *conn) buffer(w *work, ref BufRef, dt collective.DType) (collective.Buffer, error) {
	es := uint64(dt.Size())
	cn.rmu.Lock()
	r := cn.regions[ref.Region]
	if r == nil {
		cn.rmu.Unlock()
		return nil, fmt.Errorf("%w: region %d is not registered", ErrBadRegion, ref.Region)
	}
	size := uint64(len(r.mem))
	if r.dev != nil {
		size = r.dev.Size()
	}
	if ref.Count > size/es || ref.Offset > size || ref.Offset+ref.Count*es > size || ref.Offset%es != 0 {
		cn.rmu.Unlock()
		return nil, fmt.Errorf("%w: %d elements of %v at byte %d do not fit region %d of %d bytes (or are not aligned)", ErrBadRegion, ref.Count, dt, ref.Offset, ref.Region, size)
	}
	if len(w.regs) > 0 && w.dev != (r.dev != nil) {
		cn.rmu.Unlock()
		return nil, fmt.Errorf("%w: an operation's buffers must all be host memory or all device memory", ErrBadRegion)
	}
	r.refs++
	w.regs = append(w.regs, r)
	if r.dev != nil {
		w.dev = true
		if w.ev == nil {
			w.ev = cn.events[r.dev.Device()]
		}
		dev := r.dev
		cn.rmu.Unlock()
		buf, rel, err := dev.Buffer(ref.Offset, ref.Count, dt)
		if err != nil {
			return nil, err
		}
		w.rels = append(w.rels, rel)
		return buf, nil
	}
	mem := r.mem[ref.Offset : ref.Offset+ref.Count*es : ref.Offset+ref.Count*es]
	cn.rmu.Unlock()
	return collective.WrapHostBytes(dt, mem)
}

// accept validates an operation and resolves its buffers.
func (cn *conn) accept(op *Op) (_ *work, err error) {
	w := &work{op: *op, started: time.Now(), cn: cn}
	defer func() {
		if err != nil {
			cn.release(w)
		}
	}()
	n := cn.comm.Size()
	dt := collective.DType(op.DType)
	if op.Kind == 0 || op.Kind >= opKindEnd {
		return nil, fmt.Errorf("%w: unknown operation kind %d", collective.ErrBadArgument, op.Kind)
	}
	if tableKind(op.Kind) != (op.Table != nil) {
		return nil, fmt.Errorf("%w: operation kind %s takes a table of blocks exactly when it is %s, %s or %s", collective.ErrBadArgument, OpKindName(op.Kind), OpKindName(OpAllToAll), OpKindName(OpGather), OpKindName(OpScatter))
	}
	if op.Kind == OpBarrier {
		return w, nil
	}
	if !dt.Valid() {
		return nil, fmt.Errorf("%w: dtype %d", collective.ErrBadDType, op.DType)
	}
	if (op.Kind == OpAllReduce || op.Kind == OpReduceScatter) && !collective.Op(op.Reduce).Valid() {
		return nil, fmt.Errorf("%w: reduce op %d", collective.ErrBadOp, op.Reduce)
	}
	switch op.Kind {
	case OpBroadcast:
		if op.Peer < 0 || int(op.Peer) >= n {
			return nil, fmt.Errorf("%w: broadcast root %d outside 0..%d", collective.ErrBadArgument, op.Peer, n-1)
		}
	case OpSend, OpRecv:
		if op.Peer < 0 || int(op.Peer) >= n || int(op.Peer) == cn.comm.Rank() {
			return nil, fmt.Errorf("%w: peer %d must be another rank of 0..%d", collective.ErrBadArgument, op.Peer, n-1)
		}
	case OpAllGather:
		if op.A.Count != op.B.Count*uint64(n) {
			return nil, fmt.Errorf("%w: all_gather output has %d elements, want %d ranks × %d", collective.ErrBadArgument, op.A.Count, n, op.B.Count)
		}
	case OpReduceScatter:
		if op.B.Count != op.A.Count*uint64(n) {
			return nil, fmt.Errorf("%w: reduce_scatter input has %d elements, want %d ranks × %d", collective.ErrBadArgument, op.B.Count, n, op.A.Count)
		}
	}
	if op.Table != nil {
		return w, cn.acceptTable(w, dt)
	}
	if w.a, err = cn.buffer(w, op.A, dt); err != nil {
		return nil, err
	}
	w.bytes = op.A.Count * uint64(dt.Size())
	if op.Kind == OpAllGather || op.Kind == OpReduceScatter {
		if w.b, err = cn.buffer(w, op.B, dt); err != nil {
			return nil, err
		}
	}
	return w, nil
}

// acceptTable resolves the blocks of an ALLTOALL, GATHER or SCATTER: those
// its kind uses, by this rank's place (see proto.go).
func (cn *conn) acceptTable(w *work, dt collective.DType) error {
	op := &w.op
	n, me := cn.comm.Size(), cn.comm.Rank()
	if len(op.Table) != 2*n {
		return fmt.Errorf("%w: %s names blocks for %d ranks, want the group's %d", collective.ErrBadArgument, OpKindName(op.Kind), len(op.Table)/2, n)
	}
	root := int(op.Peer)
	if op.Kind != OpAllToAll && (root < 0 || root >= n) {
		return fmt.Errorf("%w: %s root %d outside 0..%d", collective.ErrBadArgument, OpKindName(op.Kind), op.Peer, n-1)
	}
	w.sends, w.recvs = make([]collective.Buffer, n), make([]collective.Buffer, n)
	for p := range n {
		if p == me {
			continue
		}
		send := op.Kind == OpAllToAll || (op.Kind == OpGather && p == root) || (op.Kind == OpScatter && me == root)
		recv := op.Kind == OpAllToAll || (op.Kind == OpGather && me == root) || (op.Kind == OpScatter && p == root)
		for i, use := range []bool{send, recv} {
			if !use {
				continue
			}
			ref := op.Table[2*p+i]
			var b collective.Buffer
			var err error
			if ref.Count == 0 {
				b = collective.NewHostBuffer(dt, 0)
			} else if b, err = cn.buffer(w, ref, dt); err != nil {
				return err
			}
			// Bytes of the rank's tensors: its blocks sent and received.
			w.bytes += ref.Count * uint64(dt.Size())
			if i == 0 {
				w.sends[p] = b
			} else {
				w.recvs[p] = b
			}
		}
	}
	return nil
}

// queueOf names the worker queue of an operation.
func queueOf(op Op) queueKey {
	if op.Kind == OpSend || op.Kind == OpRecv {
		return queueKey{peer: int(op.Peer), dir: op.Kind}
	}
	return queueKey{}
}

// queue returns worker queue k, starting its worker.
func (cn *conn) queue(k queueKey) chan *work {
	q := cn.queues[k]
	if q == nil {
		q = make(chan *work, cn.s.cfg.MaxQueued)
		cn.queues[k] = q
		cn.workers.Add(1)
		cn.s.goCount.Add(1)
		go func() {
			defer cn.workers.Done()
			defer cn.s.goCount.Add(-1)
			for w := range q {
				cn.run(w)
			}
		}()
	}
	return q
}

// run executes one operation, after those it must follow (issueOrder),
// and answers it. Its regions are released when it has returned and no
// frame it sent is held any more (frameHold).
func (cn *conn) run(w *work) {
	h := (*frameHold)(w)
	h.Hold()
	defer h.Release()
	defer cn.finished(w)
	cn.awaitTurn(w)
	err := cn.ctx.Err()
	if err == nil {
		err = cn.exec(collective.WithFrameHold(cn.ctx, h), w)
	}
	lat := time.Since(w.started).Seconds()
	kind := OpKindName(w.op.Kind)
	cn.smu.Lock()
	cn.st.Ops[kind]++
	cn.st.Bytes[kind] += w.bytes
	cn.st.LatencySeconds[kind] += lat
	if lat > cn.st.MaxLatencySeconds[kind] {
		cn.st.MaxLatencySeconds[kind] = lat
	}
	if err != nil {
		cn.st.Errors++
	}
	cn.smu.Unlock()
	r := Reply{Type: MsgDone, ID: w.op.ID}
	if err != nil {
		r.Status, r.Message = errorStatus(err), err.Error()
	}

	if cn.ctx.Err() == nil {
		_ = cn.reply(r)
	}
}

func (cn *conn) exec(ctx context.Context, w *work) error {
	if w.dev {
		return cn.execDevice(ctx, w)
	}
	return cn.execOp(ctx, w)
}

func (cn *conn) execOp(ctx context.Context, w *work) error {
	c, op := cn.comm, &w.op
	red := collective.Op(op.Reduce)
	switch op.Kind {
	case OpAllReduce:
		if w.a.Len() == 0 {
			return nil
		}
		return c.AllReduce(ctx, w.a, red)
	case OpBroadcast:
		if w.a.Len() == 0 {
			return nil
		}
		return c.Broadcast(ctx, w.a, int(op.Peer))
	case OpAllGather:
		if w.a.Len() == 0 {
			return nil
		}
		return c.AllGather(ctx, w.a, w.b)
	case OpReduceScatter:
		if w.a.Len() == 0 {
			return nil
		}
		// In place on the input (the client's staging copy), then the
		// rank's block to the output.
		if err := c.ReduceScatter(ctx, nil, w.b, red); err != nil {
			return err
		}
		return copyBlock(w.a, w.b, c.Rank()*w.a.Len())
	case OpSend:
		return c.SendTagged(ctx, w.a, int(op.Peer), op.Tag)
	case OpRecv:
		return c.RecvTagged(ctx, w.a, int(op.Peer), op.Tag)
	case OpBarrier:
		return c.Barrier(ctx)
	case OpAllToAll:
		return c.AllToAll(ctx, w.sends, w.recvs)
	case OpGather:
		return c.Gather(ctx, w.sends[op.Peer], w.recvs, int(op.Peer))
	case OpScatter:
		return c.Scatter(ctx, w.sends, w.recvs[op.Peer], int(op.Peer))
	}
	return fmt.Errorf("%w: unknown operation kind %d", collective.ErrBadArgument, op.Kind)
}
