package collective

import (
	"fmt"
	"unsafe"
)

// Buffer is a typed tensor that the collectives read and write in chunks.
// The algorithms never touch a Buffer's memory directly: they only call these
// chunk operations, so host memory (HostBuffer) and device memory (a CUDA
// implementation in its own package) are interchangeable.
//
// Ranges are in elements. Threading contract: the algorithms split a buffer
// into per-channel ranges and call chunk operations from one goroutine per
// channel, so calls for DISJOINT ranges may run concurrently; calls for
// overlapping ranges are always made from one goroutine, in order.
//
// Asynchronous implementations (device memory) may return from WriteChunk,
// ReduceChunk and DivChunk before the work is done, but must (a) have finished
// reading src when they return, (b) execute operations on overlapping ranges
// in the order they were issued (one copy stream per channel does this), so
// that a ReadChunk after a ReduceChunk of the same range sees the reduced data,
// and (c) finish everything by the time Sync returns.
type Buffer interface {
	// DType is the element type.
	DType() DType
	// Len is the number of elements.
	Len() int
	// ReadChunk returns the bytes of elements [off, off+n) for sending. They
	// must stay valid and unchanged until ReleaseChunk(off, n, data) is
	// called with the slice returned. Host buffers return a view without
	// copying; device buffers stage into pinned host memory and return once
	// that copy is done. Several reads of one range may be outstanding at
	// once (the same chunk sent to two peers), released in any order.
	ReadChunk(off, n int) ([]byte, error)
	// ReleaseChunk ends the use of data, the slice that ReadChunk(off, n)
	// returned: it names which of several outstanding reads of the range
	// ends (a device buffer gives back that read's staging memory). It may
	// be called from any goroutine (a transport's SendDone).
	ReleaseChunk(off, n int, data []byte)
	// WriteChunk stores src (exactly n*DType().Size() bytes, possibly in
	// several segments) into elements [off, off+n).
	WriteChunk(off int, src Segments) error
	// ReduceChunk sets elements [off, off+n) to (them op src), where n is
	// src.Len()/DType().Size(). OpAvg reduces as a sum (see DivChunk).
	ReduceChunk(off int, src Segments, op Op) error
	// DivChunk divides elements [off, off+n) by divisor (the last step of
	// OpAvg; integers truncate toward zero).
	DivChunk(off, n, divisor int) error
	// Sync waits until every operation issued so far is complete and returns
	// the first error of an asynchronous one.
	Sync() error
}

// BufferCopier is an optional fast path for copying between two buffers
// (for example device to device). CopyFrom returns handled=false to fall back
// to ReadChunk/WriteChunk.
type BufferCopier interface {
	CopyFrom(dstOff int, src Buffer, srcOff, n int) (handled bool, err error)
}

// PeerReducer is the hook for ranks that live in one process (for example
// one per GPU of a node). When the transport delivers a chunk that is still
// in the sending rank's Buffer (InFrame.Peer is set: the local transport does
// this), and the receiving Buffer implements PeerReducer, the chunk moves by
// a direct peer copy instead of through host bytes. A CUDA implementation
// uses cuMemcpyPeerAsync plus a reduce kernel here. Return handled=false to
// fall back to the bytes in InFrame.Payload.
type PeerReducer interface {
	// PeerWrite copies src[srcOff, srcOff+n) into this buffer at dstOff.
	PeerWrite(dstOff int, src Buffer, srcOff, n int) (handled bool, err error)
	// PeerReduce reduces src[srcOff, srcOff+n) into this buffer at dstOff.
	PeerReduce(dstOff int, src Buffer, srcOff, n int, op Op) (handled bool, err error)
}

// Segments is a chunk of received bytes held in one or more pieces, in order
// (gRPC delivers a message as several HTTP/2 data frames). Pieces may split an
// element anywhere; consumers must handle that (see ForEachElementRun).
type Segments [][]byte

// Len is the total number of bytes.
func (s Segments) Len() int {
	n := 0
	for _, p := range s {
		n += len(p)
	}
	return n
}

// CopyTo copies the bytes into dst (len(dst) >= s.Len()) and returns the count.
func (s Segments) CopyTo(dst []byte) int {
	n := 0
	for _, p := range s {
		n += copy(dst[n:], p)
	}
	return n
}

// ForEachElementRun calls f with consecutive runs of whole elements of size
// es: byteOff is the offset of the run within the payload. Elements split
// between pieces are reassembled into a small scratch first.
func (s Segments) ForEachElementRun(es int, f func(byteOff int, run []byte)) {
	var carry [8]byte
	nc := 0
	off := 0
	for _, p := range s {
		if nc > 0 {
			k := copy(carry[nc:es], p)
			nc += k
			p = p[k:]
			if nc == es {
				f(off, carry[:es])
				off += es
				nc = 0
			}
		}
		whole := len(p) / es * es
		if whole > 0 {
			f(off, p[:whole])
			off += whole
		}
		nc += copy(carry[nc:], p[whole:])
	}
}

// HostBuffer is a Buffer in ordinary Go memory, aligned to 8 bytes.
type HostBuffer struct {
	dt    DType
	n     int
	bytes []byte
}

var (
	_ Buffer       = (*HostBuffer)(nil)
	_ BufferCopier = (*HostBuffer)(nil)
	_ PeerReducer  = (*HostBuffer)(nil)
)

// NewHostBuffer allocates a zeroed host buffer of n elements.
func NewHostBuffer(dt DType, n int) *HostBuffer {
	if !dt.Valid() || n < 0 {
		panic(fmt.Sprintf("collective: NewHostBuffer(%v, %d): invalid", dt, n))
	}
	words := (n*dt.Size() + 7) / 8
	backing := make([]uint64, words)
	var b []byte
	if words > 0 {
		b = unsafe.Slice((*byte)(unsafe.Pointer(&backing[0])), n*dt.Size())
	}
	return &HostBuffer{dt: dt, n: n, bytes: b}
}

// WrapHostBytes makes a Buffer over existing bytes (no copy). len(b) must be
// a multiple of the element size and b aligned to it.
func WrapHostBytes(dt DType, b []byte) (*HostBuffer, error) {
	es := dt.Size()
	if es == 0 {
		return nil, fmt.Errorf("%w: %v", ErrBadDType, dt)
	}
	if len(b)%es != 0 || !aligned(b, es) {
		return nil, fmt.Errorf("%w: %d bytes are not whole, aligned %v elements", ErrBadArgument, len(b), dt)
	}
	return &HostBuffer{dt: dt, n: len(b) / es, bytes: b}, nil
}

// Float32s wraps a []float32 without copying.
func Float32s(v []float32) *HostBuffer { return wrapTyped(Float32, v) }

// Float64s wraps a []float64 without copying.
func Float64s(v []float64) *HostBuffer { return wrapTyped(Float64, v) }

// Int32s wraps a []int32 without copying.
func Int32s(v []int32) *HostBuffer { return wrapTyped(Int32, v) }

// Int64s wraps a []int64 without copying.
func Int64s(v []int64) *HostBuffer { return wrapTyped(Int64, v) }

// Uint8s wraps a []uint8 without copying.
func Uint8s(v []uint8) *HostBuffer { return &HostBuffer{dt: Uint8, n: len(v), bytes: v} }

func wrapTyped[T any](dt DType, v []T) *HostBuffer {
	var b []byte
	if len(v) > 0 {
		b = unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), len(v)*dt.Size())
	}
	return &HostBuffer{dt: dt, n: len(v), bytes: b}
}

// DType implements Buffer.
func (h *HostBuffer) DType() DType { return h.dt }

// Len implements Buffer.
func (h *HostBuffer) Len() int { return h.n }

// Bytes returns the raw bytes (little-endian elements).
func (h *HostBuffer) Bytes() []byte { return h.bytes }

// AsFloat32 views the buffer as []float32 (dtype must be Float32).
func (h *HostBuffer) AsFloat32() []float32 { h.must(Float32); return castSlice[float32](h.bytes) }

// AsFloat64 views the buffer as []float64 (dtype must be Float64).
func (h *HostBuffer) AsFloat64() []float64 { h.must(Float64); return castSlice[float64](h.bytes) }

// AsInt32 views the buffer as []int32 (dtype must be Int32).
func (h *HostBuffer) AsInt32() []int32 { h.must(Int32); return castSlice[int32](h.bytes) }

// AsInt64 views the buffer as []int64 (dtype must be Int64).
func (h *HostBuffer) AsInt64() []int64 { h.must(Int64); return castSlice[int64](h.bytes) }

// AsUint16 views a Float16 or BFloat16 buffer as its raw bits.
func (h *HostBuffer) AsUint16() []uint16 {
	if h.dt != Float16 && h.dt != BFloat16 {
		panic("collective: AsUint16 on " + h.dt.String())
	}
	return castSlice[uint16](h.bytes)
}

func (h *HostBuffer) must(dt DType) {
	if h.dt != dt {
		panic("collective: buffer is " + h.dt.String() + ", not " + dt.String())
	}
}

// At returns element i converted to float64 (for checks and tests).
func (h *HostBuffer) At(i int) float64 {
	switch h.dt {
	case Float32:
		return float64(h.AsFloat32()[i])
	case Float64:
		return h.AsFloat64()[i]
	case Float16:
		return float64(F16ToF32(h.AsUint16()[i]))
	case BFloat16:
		return float64(BF16ToF32(h.AsUint16()[i]))
	case Int32:
		return float64(h.AsInt32()[i])
	case Int64:
		return float64(h.AsInt64()[i])
	case Uint8:
		return float64(h.bytes[i])
	}
	return 0
}

// Set stores v (rounded to nearest even for the narrow float types,
// truncated for integers) at element i.
func (h *HostBuffer) Set(i int, v float64) {
	switch h.dt {
	case Float32:
		h.AsFloat32()[i] = float32(v)
	case Float64:
		h.AsFloat64()[i] = v
	case Float16:
		h.AsUint16()[i] = F64ToF16(v)
	case BFloat16:
		h.AsUint16()[i] = F64ToBF16(v)
	case Int32:
		h.AsInt32()[i] = int32(v)
	case Int64:
		h.AsInt64()[i] = int64(v)
	case Uint8:
		h.bytes[i] = uint8(int64(v))
	}
}

func (h *HostBuffer) rng(off, n int) ([]byte, error) {
	if off < 0 || n < 0 || off+n > h.n {
		return nil, fmt.Errorf("%w: range [%d,%d) outside buffer of %d elements", ErrBadArgument, off, off+n, h.n)
	}
	es := h.dt.Size()
	return h.bytes[off*es : (off+n)*es], nil
}

// ReadChunk implements Buffer: a view, no copy.
func (h *HostBuffer) ReadChunk(off, n int) ([]byte, error) { return h.rng(off, n) }

// ReleaseChunk implements Buffer (nothing to do for host memory).
func (h *HostBuffer) ReleaseChunk(off, n int, data []byte) {}

// WriteChunk implements Buffer.
func (h *HostBuffer) WriteChunk(off int, src Segments) error {
	es := h.dt.Size()
	l := src.Len()
	if l%es != 0 {
		return fmt.Errorf("%w: %d bytes is not a whole number of %v elements", ErrBadArgument, l, h.dt)
	}
	dst, err := h.rng(off, l/es)
	if err != nil {
		return err
	}
	src.CopyTo(dst)
	return nil
}

// ReduceChunk implements Buffer.
func (h *HostBuffer) ReduceChunk(off int, src Segments, op Op) error {
	es := h.dt.Size()
	l := src.Len()
	if l%es != 0 {
		return fmt.Errorf("%w: %d bytes is not a whole number of %v elements", ErrBadArgument, l, h.dt)
	}
	dst, err := h.rng(off, l/es)
	if err != nil {
		return err
	}
	// Pieces may split an element; reassemble those in a small carry.
	var carry [8]byte
	nc, bo := 0, 0
	for _, p := range src {
		if nc > 0 {
			k := copy(carry[nc:es], p)
			nc += k
			p = p[k:]
			if nc == es {
				reduceBytes(h.dt, op, dst[bo:bo+es], carry[:es])
				bo += es
				nc = 0
			}
		}
		whole := len(p) / es * es
		if whole > 0 {
			reduceBytes(h.dt, op, dst[bo:bo+whole], p[:whole])
			bo += whole
		}
		nc += copy(carry[nc:], p[whole:])
	}
	return nil
}

// DivChunk implements Buffer.
func (h *HostBuffer) DivChunk(off, n, divisor int) error {
	dst, err := h.rng(off, n)
	if err != nil {
		return err
	}
	if divisor != 1 {
		divBytes(h.dt, dst, divisor)
	}
	return nil
}

// Sync implements Buffer (host operations are synchronous).
func (h *HostBuffer) Sync() error { return nil }

// hostRanges returns the bytes of elements [dstOff, dstOff+n) of h and
// [srcOff, srcOff+n) of src; ok is false when src is not a host buffer.
func (h *HostBuffer) hostRanges(dstOff int, src Buffer, srcOff, n int) (d, s []byte, ok bool, err error) {
	hs, ok := src.(*HostBuffer)
	if !ok {
		return nil, nil, false, nil
	}
	if d, err = h.rng(dstOff, n); err == nil {
		s, err = hs.rng(srcOff, n)
	}
	return d, s, true, err
}

// CopyFrom implements BufferCopier for host sources.
func (h *HostBuffer) CopyFrom(dstOff int, src Buffer, srcOff, n int) (bool, error) {
	d, s, ok, err := h.hostRanges(dstOff, src, srcOff, n)
	if ok && err == nil {
		copy(d, s)
	}
	return ok, err
}

// PeerWrite implements PeerReducer for host peers.
func (h *HostBuffer) PeerWrite(dstOff int, src Buffer, srcOff, n int) (bool, error) {
	return h.CopyFrom(dstOff, src, srcOff, n)
}

// PeerReduce implements PeerReducer for host peers.
func (h *HostBuffer) PeerReduce(dstOff int, src Buffer, srcOff, n int, op Op) (bool, error) {
	d, s, ok, err := h.hostRanges(dstOff, src, srcOff, n)
	if ok && err == nil {
		reduceBytes(h.dt, op, d, s)
	}
	return ok, err
}

// copyBuffer copies src[srcOff:+n] into dst[dstOff:], through BufferCopier
// when available, else through ReadChunk/WriteChunk.
func copyBuffer(dst Buffer, dstOff int, src Buffer, srcOff, n int) error {
	if n == 0 {
		return nil
	}
	if c, ok := dst.(BufferCopier); ok {
		if handled, err := c.CopyFrom(dstOff, src, srcOff, n); handled {
			return err
		}
	}
	b, err := src.ReadChunk(srcOff, n)
	if err != nil {
		return err
	}
	err = dst.WriteChunk(dstOff, Segments{b})
	src.ReleaseChunk(srcOff, n, b)
	return err
}
