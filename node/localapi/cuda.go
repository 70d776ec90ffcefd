package localapi

import (
	"context"
	"errors"
	"fmt"

	"github.com/gpumesh/gpumesh/collective"
)

// CUDA tensors by IPC handle (REGISTER_CUDA, proto_cuda.go). The agent
// opens a rank's device allocation once per registration, in its own
// context on the same GPU, and runs the rank's collectives on it with the
// collective package's device buffers (package cudabuf): ranks of one agent
// exchange chunks by reference, so a hop between them is a peer copy or a
// reduce kernel reading the other rank's memory, and nothing goes through
// host memory. Only a binary built with the cuda tag has an opener
// (cuda_cuda.go); without it REGISTER_CUDA is answered StatusUnsupported.

// ErrNoCUDA: REGISTER_CUDA reached an agent that cannot open CUDA IPC
// handles; the client stages its CUDA tensors through host memory.
var ErrNoCUDA = errors.New("this agent has no CUDA; tensors are staged through host memory")

// deviceMem is one opened device allocation of a client.
type deviceMem interface {
	// Size is the number of bytes operations may name (checked against the
	// allocation the driver reports when it was opened).
	Size() uint64
	// Device is the GPU's UUID.
	Device() [16]byte
	// Buffer is a collective buffer over count elements of dt at byte
	// offset off (in range: the caller checked). The buffer belongs to the
	// region; release is called when the operation no longer uses it.
	Buffer(off, count uint64, dt collective.DType) (buf collective.Buffer, release func(), err error)
	// Close releases the buffers and closes the IPC mapping (no operation
	// uses it any more).
	Close() error
}

// deviceEvent is a client's opened IPC event.
type deviceEvent interface {
	// Wait blocks until the work recorded in the event's latest record is
	// done.
	Wait() error
	Close() error
}

// cudaOpener opens IPC handles; set by the cuda build (cuda_cuda.go).
type cudaOpener interface {
	OpenMemory(r *RegisterCUDA) (deviceMem, error)
	OpenEvent(r *RegisterCUDA) (deviceEvent, error)
}

// maxCUDAEvents bounds the events one connection may register (one per
// GPU it uses is enough; replaced ones stay open until the end).
const maxCUDAEvents = 64

// registerCUDA opens device memory (a region) or an event.
func (cn *conn) registerCUDA(r *RegisterCUDA) error {
	fail := func(status uint8, err error) error {
		return cn.reply(Reply{Type: MsgRegistered, Status: status, ID: r.ID, Message: err.Error()})
	}
	op, err := cn.s.cudaOpener()
	if err != nil {
		return fail(StatusUnsupported, err)
	}
	if r.What == CUDAEvent {
		cn.rmu.Lock()
		n := len(cn.oldEvents)
		cn.rmu.Unlock()
		if n >= maxCUDAEvents {
			return fail(StatusBadRequest, fmt.Errorf("%w: the connection has registered %d CUDA events (the limit)", ErrBadRegion, n))
		}
		ev, err := op.OpenEvent(r)
		if err != nil {
			return fail(cudaStatus(err), err)
		}
		cn.rmu.Lock()
		if cn.events == nil {
			cn.events = map[[16]byte]deviceEvent{}
		}
		cn.events[r.Device] = ev
		cn.oldEvents = append(cn.oldEvents, ev)
		cn.rmu.Unlock()
		return cn.reply(Reply{Type: MsgRegistered, ID: r.ID})
	}
	cn.rmu.Lock()
	n, dup := len(cn.regions), cn.regions[r.ID] != nil
	cn.rmu.Unlock()
	if dup || n >= cn.s.cfg.MaxRegions {
		return fail(StatusBadRequest, fmt.Errorf("%w: region %d is already registered, or the connection has %d regions (the limit)", ErrBadRegion, r.ID, n))
	}
	if r.Size == 0 || r.Size > cn.s.cfg.MaxRegionBytes {
		return fail(StatusBadRequest, fmt.Errorf("%w: size %d outside 1..%d bytes", ErrBadRegion, r.Size, cn.s.cfg.MaxRegionBytes))
	}
	m, err := op.OpenMemory(r)
	if err != nil {
		return fail(cudaStatus(err), err)
	}
	cn.s.regCount.Add(1)
	cn.s.cudaMaps.Add(1)
	cn.s.cudaOpened.Add(1)
	cn.rmu.Lock()
	cn.regions[r.ID] = &region{dev: m, refs: 1}
	cn.rmu.Unlock()
	return cn.reply(Reply{Type: MsgRegistered, ID: r.ID})
}

func cudaStatus(err error) uint8 {
	if errors.Is(err, ErrNoCUDA) {
		return StatusUnsupported
	}
	return StatusBadRequest
}

// cudaOpener returns the agent's opener, made on first use.
func (s *Server) cudaOpener() (cudaOpener, error) {
	s.cudaOnce.Do(func() {
		if newCUDAOpener == nil {
			s.cudaErr = ErrNoCUDA
			return
		}
		s.cuda, s.cudaErr = newCUDAOpener()
		if s.cudaErr != nil {
			s.log.Warn("CUDA tensors of ranks will be staged through host memory", "error", s.cudaErr)
		}
	})
	return s.cuda, s.cudaErr
}

// closeEvents closes the connection's events (its end).
func (cn *conn) closeEvents() {
	cn.rmu.Lock()
	evs := cn.oldEvents
	cn.oldEvents, cn.events = nil, nil
	cn.rmu.Unlock()
	for _, ev := range evs {
		_ = ev.Close()
	}
}

// newCUDAOpener makes the agent's opener; nil without the cuda tag.
var newCUDAOpener func() (cudaOpener, error)

// execDevice runs an operation on device buffers: after the client's
// producing kernels (its event), and finished on the device before it is
// answered (the client reads the result on its own stream).
func (cn *conn) execDevice(ctx context.Context, w *work) error {
	if w.ev != nil {
		if err := w.ev.Wait(); err != nil {
			return fmt.Errorf("waiting for the rank's CUDA event: %w", err)
		}
	}
	err := cn.execOp(ctx, w)
	for _, b := range append([]collective.Buffer{w.a, w.b}, append(w.sends, w.recvs...)...) {
		if b != nil {
			if serr := b.Sync(); serr != nil && err == nil {
				err = serr
			}
		}
	}
	cn.s.cudaOps.Add(1)
	return err
}

// copyBlock copies src's elements [off, off+dst.Len()) into dst (the
// rank's block of a reduce-scatter).
func copyBlock(dst, src collective.Buffer, off int) error {
	if d, ok := dst.(*collective.HostBuffer); ok {
		if s, ok := src.(*collective.HostBuffer); ok {
			es := d.DType().Size()
			copy(d.Bytes(), s.Bytes()[off*es:(off+d.Len())*es])
			return nil
		}
	}
	if c, ok := dst.(collective.BufferCopier); ok {
		handled, err := c.CopyFrom(0, src, off, dst.Len())
		if err != nil || handled {
			return err
		}
	}
	return fmt.Errorf("%w: cannot copy between a %T and a %T", collective.ErrBadArgument, src, dst)
}

// CUDAStats are the agent's counts of CUDA IPC work since it started.
type CUDAStats struct {
	Opened int64 // IPC memory handles opened
	Ops    int64 // operations run on device memory
}

// CUDA returns the counts of CUDA IPC work.
func (s *Server) CUDA() CUDAStats {
	return CUDAStats{Opened: s.cudaOpened.Load(), Ops: s.cudaOps.Load()}
}
