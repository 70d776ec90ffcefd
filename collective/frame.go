package collective

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"unicode/utf8"
)

// Wire format of one data-plane message (the gRPC message body after its
// 5-byte prefix): a fixed 83-byte header, then Length payload bytes. 5+83 is
// a multiple of 8, so a payload that starts in the first HTTP/2 data frame is
// 8-byte aligned there.
//
//	off size field
//	0   4    magic "GMC1" (0x31434d47 little-endian)
//	4   1    version (1)
//	5   1    kind (1 data, 2 abort)
//	6   1    collective (AllReduce, ReduceScatter, ...)
//	7   1    dtype
//	8   1    reduction op (0 when none)
//	9   1    algorithm
//	10  2    channels
//	12  4    root or peer rank (int32)
//	16  8    group (FNV-1a 64 of the job ID)
//	24  8    generation
//	32  8    sequence number
//	40  8    element count of the whole operation
//	48  8    element offset of this chunk
//	56  8    tag (point-to-point)
//	64  8    chunk size in elements (layout check)
//	72  4    sender rank (int32)
//	76  4    payload length in bytes
//	80  3    zero
const (
	HeaderSize     = 83
	frameMagic     = 0x31434d47
	frameVersion   = 1
	maxAbortLength = 4096
	// MaxFrameBytes bounds one frame's payload (a chunk is at most 64 MiB).
	MaxFrameBytes = 64 << 20
)

// FrameKind says what a frame carries.
type FrameKind uint8

// Frame kinds.
const (
	FrameData  FrameKind = 1
	FrameAbort FrameKind = 2
)

// CollKind names the operation a frame belongs to.
type CollKind uint8

// Operations.
const (
	CollAllReduce CollKind = iota + 1
	CollReduceScatter
	CollAllGather
	CollBroadcast
	CollSendRecv
	CollBarrier
	CollAllToAll
	CollGather
	CollScatter
	collEnd
)

var collNames = [...]string{"invalid", "AllReduce", "ReduceScatter", "AllGather", "Broadcast", "Send/Recv", "Barrier", "AllToAll", "Gather", "Scatter"}

func (c CollKind) String() string {
	if c == 0 || c >= collEnd {
		return fmt.Sprintf("coll(%d)", uint8(c))
	}
	return collNames[c]
}

// Header is the decoded frame header. Every data frame carries the identity
// of its operation so that the receiver can check it against its own call.
type Header struct {
	Kind       FrameKind
	Coll       CollKind
	DType      DType
	Op         Op
	Algo       uint8
	Channels   uint16
	Root       int32
	Group      uint64
	Generation uint64
	Seq        uint64
	Count      uint64
	Offset     uint64
	Tag        uint64
	ChunkElems uint64
	Src        int32
	Length     uint32
}

// GroupHash is the 64-bit group identifier carried in frames.
func GroupHash(jobID string) uint64 {
	h := fnv.New64a()
	_, _ = h.Write([]byte(jobID))
	return h.Sum64()
}

// PutHeader encodes h into b[:HeaderSize].
func PutHeader(b []byte, h *Header) {
	_ = b[HeaderSize-1]
	le := binary.LittleEndian
	le.PutUint32(b[0:], frameMagic)
	b[4] = frameVersion
	b[5] = byte(h.Kind)
	b[6] = byte(h.Coll)
	b[7] = byte(h.DType)
	b[8] = byte(h.Op)
	b[9] = h.Algo
	le.PutUint16(b[10:], h.Channels)
	le.PutUint32(b[12:], uint32(h.Root))
	le.PutUint64(b[16:], h.Group)
	le.PutUint64(b[24:], h.Generation)
	le.PutUint64(b[32:], h.Seq)
	le.PutUint64(b[40:], h.Count)
	le.PutUint64(b[48:], h.Offset)
	le.PutUint64(b[56:], h.Tag)
	le.PutUint64(b[64:], h.ChunkElems)
	le.PutUint32(b[72:], uint32(h.Src))
	le.PutUint32(b[76:], h.Length)
	b[80], b[81], b[82] = 0, 0, 0
}

// DecodeHeader decodes and validates a frame header. It never panics; any
// malformed input is an error wrapping ErrBadFrame.
func DecodeHeader(b []byte) (Header, error) {
	var h Header
	if len(b) < HeaderSize {
		return h, fmt.Errorf("%w: %d bytes, header needs %d", ErrBadFrame, len(b), HeaderSize)
	}
	le := binary.LittleEndian
	if m := le.Uint32(b[0:]); m != frameMagic {
		return h, fmt.Errorf("%w: magic %#x (not a gpumesh data-plane frame)", ErrBadFrame, m)
	}
	if b[4] != frameVersion {
		return h, fmt.Errorf("%w: version %d, this build speaks %d (mixed gpumesh versions?)", ErrBadFrame, b[4], frameVersion)
	}
	if b[80]|b[81]|b[82] != 0 {
		return h, fmt.Errorf("%w: reserved bytes set", ErrBadFrame)
	}
	h.Kind = FrameKind(b[5])
	h.Coll = CollKind(b[6])
	h.DType = DType(b[7])
	h.Op = Op(b[8])
	h.Algo = b[9]
	h.Channels = le.Uint16(b[10:])
	h.Root = int32(le.Uint32(b[12:]))
	h.Group = le.Uint64(b[16:])
	h.Generation = le.Uint64(b[24:])
	h.Seq = le.Uint64(b[32:])
	h.Count = le.Uint64(b[40:])
	h.Offset = le.Uint64(b[48:])
	h.Tag = le.Uint64(b[56:])
	h.ChunkElems = le.Uint64(b[64:])
	h.Src = int32(le.Uint32(b[72:]))
	h.Length = le.Uint32(b[76:])
	if h.Src < 0 {
		return h, fmt.Errorf("%w: sender rank %d", ErrBadFrame, h.Src)
	}
	switch h.Kind {
	case FrameAbort:
		if h.Length > maxAbortLength {
			return h, fmt.Errorf("%w: abort reason of %d bytes (max %d)", ErrBadFrame, h.Length, maxAbortLength)
		}
	case FrameData:
		if h.Coll == 0 || h.Coll >= collEnd {
			return h, fmt.Errorf("%w: unknown collective %d", ErrBadFrame, b[6])
		}
		if !h.DType.Valid() {
			return h, fmt.Errorf("%w: unknown dtype %d", ErrBadFrame, b[7])
		}
		if h.Op != 0 && !h.Op.Valid() {
			return h, fmt.Errorf("%w: unknown reduction op %d", ErrBadFrame, b[8])
		}
		if h.Length > MaxFrameBytes {
			return h, fmt.Errorf("%w: payload of %d bytes exceeds %d", ErrBadFrame, h.Length, MaxFrameBytes)
		}
		if h.Length%uint32(h.DType.Size()) != 0 {
			return h, fmt.Errorf("%w: payload of %d bytes is not whole %v elements", ErrBadFrame, h.Length, h.DType)
		}
		if h.Offset > h.Count || uint64(h.Length)/uint64(h.DType.Size()) > h.Count-h.Offset {
			return h, fmt.Errorf("%w: chunk [%d,+%d bytes) outside an operation of %d elements", ErrBadFrame, h.Offset, h.Length, h.Count)
		}
	default:
		return h, fmt.Errorf("%w: unknown frame kind %d", ErrBadFrame, b[5])
	}
	return h, nil
}

// DecodeFrame decodes a whole frame held in one slice: header and payload.
func DecodeFrame(b []byte) (Header, []byte, error) {
	h, err := DecodeHeader(b)
	if err != nil {
		return h, nil, err
	}
	if rest := len(b) - HeaderSize; rest != int(h.Length) {
		return h, nil, fmt.Errorf("%w: header says %d payload bytes, frame has %d", ErrBadFrame, h.Length, rest)
	}
	p := b[HeaderSize:]
	if h.Kind == FrameAbort && !utf8.Valid(p) {
		return h, nil, fmt.Errorf("%w: abort reason is not UTF-8", ErrBadFrame)
	}
	return h, p, nil
}

// AppendFrame appends an encoded frame (header and payload) to dst.
func AppendFrame(dst []byte, h *Header, payload []byte) []byte {
	hh := *h
	hh.Length = uint32(len(payload))
	var hb [HeaderSize]byte
	PutHeader(hb[:], &hh)
	dst = append(dst, hb[:]...)
	return append(dst, payload...)
}

// describe renders an operation for error messages, e.g.
// "AllReduce(float32, count=1000)".
func (h *Header) describe(extra string) string {
	s := fmt.Sprintf("%s(%s, count=%d%s)", h.Coll, h.DType, h.Count, extra)
	return s
}

// mismatch compares the operation identity of an incoming header (from rank
// h.Src) against the local expectation and returns a human message, or "".
func mismatch(local, remote *Header, self int) string {
	if remote.Group != local.Group || remote.Generation != local.Generation {
		return fmt.Sprintf("rank %d (generation %d) received traffic of rank %d for another group or generation (%d)", self, local.Generation, remote.Src, remote.Generation)
	}
	if local.Coll != remote.Coll || local.DType != remote.DType || local.Count != remote.Count {
		return fmt.Sprintf("rank %d called %s but rank %d called %s", self, local.describe(""), remote.Src, remote.describe(""))
	}
	if local.Op != remote.Op {
		return fmt.Sprintf("rank %d called %s but rank %d called %s", self, local.describe(", op="+local.Op.String()), remote.Src, remote.describe(", op="+remote.Op.String()))
	}
	if local.Root != remote.Root {
		what := "root"
		if local.Coll == CollSendRecv || local.Coll == CollAllToAll {
			what = "peer"
		}
		return fmt.Sprintf("rank %d called %s but rank %d called %s", self, local.describe(fmt.Sprintf(", %s=%d", what, local.Root)), remote.Src, remote.describe(fmt.Sprintf(", %s=%d", what, remote.Root)))
	}
	if local.Tag != remote.Tag {
		return fmt.Sprintf("rank %d called Recv(tag=%d) but rank %d called Send(tag=%d)", self, local.Tag, remote.Src, remote.Tag)
	}
	if local.Seq != remote.Seq {
		return fmt.Sprintf("rank %d is at operation #%d (%s) but rank %d is at operation #%d: ranks must call collectives in the same order", self, local.Seq, local.describe(""), remote.Src, remote.Seq)
	}
	if local.Algo != remote.Algo || local.Channels != remote.Channels || local.ChunkElems != remote.ChunkElems {
		return fmt.Sprintf("rank %d uses algorithm %d, %d channels, %d-element chunks but rank %d uses algorithm %d, %d channels, %d-element chunks for %s: give every rank the same collective config", self, local.Algo, local.Channels, local.ChunkElems, remote.Src, remote.Algo, remote.Channels, remote.ChunkElems, local.describe(""))
	}
	return ""
}
