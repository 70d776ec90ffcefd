package localapi

import (
	"encoding/binary"
	"fmt"
	"unicode/utf8"
)

// The local protocol, version 1.
//
// A rank's process talks to its agent over a SOCK_SEQPACKET Unix socket:
// every message is one packet (so a message and the file descriptor sent
// with it arrive together), little-endian, starting with a one-byte type.
//
// Client to agent:
//
//	HELLO (1)      u8 type, u8 version, u16 0, u32 rank (global), u32 group rank,
//	               u32 group size, u32 timeout ms, u64 generation,
//	               u16 len(job), u16 len(group id), u16 len(secret), u16 0,
//	               job, group id, secret, group size × u32 global rank of each group rank
//	REGISTER (2)   u8 type, 7×0, u64 region id, u64 size; exactly one file
//	               descriptor (SCM_RIGHTS): a memfd of at least size bytes
//	               sealed against shrinking (F_SEAL_SHRINK)
//	UNREGISTER (3) u8 type, 7×0, u64 region id
//	OP (4)         u8 type, u8 kind, u8 dtype, u8 reduce op, i32 peer or root,
//	               u64 op id, u64 tag, then two buffers A and B, each
//	               u64 region id, u64 byte offset, u64 element count
//	BYE (5)        u8 type, 7×0: the client is about to close the connection
//	               on purpose (destroying its group); without it, a closed
//	               connection means the rank's process died
//	REGISTER_CUDA (6) device memory or an event by CUDA IPC handle
//	               (proto_cuda.go)
//	OP_TABLE (7)   an OP (the same 72 bytes, A and B unused) followed by one
//	               48-byte entry per group rank: the block sent to that rank
//	               and the block received from it, each u64 region id,
//	               u64 byte offset, u64 element count (a count of 0 names no
//	               memory); for ALLTOALL, GATHER and SCATTER only
//
// Agent to client:
//
//	WELCOME (0x81)              u8 type, u8 version, u16 0, u32 0
//	REGISTERED (0x82), DONE (0x84), FAILED (0x85), ERROR (0x8f)
//	                            u8 type, u8 status, u16 len(msg), u32 0, u64 id, msg
//
// The first message must be HELLO; the agent answers WELCOME or ERROR (and
// closes). REGISTER is answered by REGISTERED, every OP by exactly one DONE
// with the op's id. Operations run in the order they were sent (order.go):
// a collective after every operation sent before it has finished, a SEND
// or RECV after the collectives sent before it; consecutive SENDs and RECVs
// run at once, in order per peer and direction. ERROR ends the connection; closing the connection aborts
// every operation in flight, and closing it without BYE also aborts the
// group, so that the peers learn at once that this rank is gone. FAILED
// (id 0) comes unasked when the group fails while the connection is open
// (a peer died or aborted, even with nothing in flight): every later
// operation will fail, and the client can say so at once.
//
// Op kinds and their buffers (counts in elements of dtype):
//
//	ALLREDUCE (1)      A in place
//	BROADCAST (2)      A in place, peer = root (group rank)
//	ALLGATHER (3)      A output (size × B.count), B this rank's input
//	REDUCESCATTER (4)  A output (B.count / size), B input
//	SEND (5), RECV (6) A, peer = the other group rank, tag
//	BARRIER (7)        no buffers
//	ALLTOALL (8)       OP_TABLE: every other rank's entry, both blocks
//	GATHER (9)         OP_TABLE, peer = root: the root's entry's send block
//	                   on other ranks; every other rank's receive block on
//	                   the root
//	SCATTER (10)       OP_TABLE, peer = root: the root's entry's receive
//	                   block on other ranks; every other rank's send block
//	                   on the root
//
// The entry of the rank itself is not used (the client copies its own
// block); ALLTOALL, GATHER and SCATTER run as collectives, in order with
// the others.
//
// dtype and reduce op use the numbering of package collective (DType: 1
// float32, 2 float64, 3 float16, 4 bfloat16, 5 int32, 6 int64, 7 uint8; Op: 1
// sum, 2 avg, 3 max, 4 min, 5 prod).

// Version is the protocol version this package speaks.
const Version = 1

// Message types.
const (
	MsgHello      = 1
	MsgRegister   = 2
	MsgUnregister = 3
	MsgOp         = 4
	MsgBye        = 5
	MsgOpTable    = 7

	MsgWelcome    = 0x81
	MsgRegistered = 0x82
	MsgDone       = 0x84
	MsgFailed     = 0x85
	MsgError      = 0x8f
)

// Op kinds.
const (
	OpAllReduce     = 1
	OpBroadcast     = 2
	OpAllGather     = 3
	OpReduceScatter = 4
	OpSend          = 5
	OpRecv          = 6
	OpBarrier       = 7
	OpAllToAll      = 8
	OpGather        = 9
	OpScatter       = 10
	opKindEnd       = 11
)

var opKindNames = [...]string{"invalid", "all_reduce", "broadcast", "all_gather", "reduce_scatter", "send", "recv", "barrier", "all_to_all", "gather", "scatter"}

// tableKind reports whether op kind k takes a table (OP_TABLE) instead of
// buffers A and B.
func tableKind(k uint8) bool { return k == OpAllToAll || k == OpGather || k == OpScatter }

// OpKindName names an op kind ("all_reduce"), for logs and metrics.
func OpKindName(k uint8) string {
	if k == 0 || k >= opKindEnd {
		return fmt.Sprintf("op(%d)", k)
	}
	return opKindNames[k]
}

// Reply statuses.
const (
	StatusOK = 0
	// StatusFailed: the operation failed on the data plane (dead peer,
	// timeout, abort); the group is unusable, as in NCCL after an error.
	StatusFailed = 1
	// StatusMismatch: ranks called different operations (or sizes, dtypes).
	StatusMismatch = 2
	// StatusBadRequest: the request itself was invalid (the group stays
	// usable).
	StatusBadRequest = 3
	// StatusDenied: the hello was refused (secret, rank, generation).
	StatusDenied = 4
)

// Limits of the decoder.
const (
	// MaxMessage is the largest packet the agent reads.
	MaxMessage = 64 << 10
	maxString  = 256
	// MaxGroupSize bounds the group in a hello.
	MaxGroupSize = (MaxMessage - helloFixed - 3*maxString) / 4
)

const (
	helloFixed      = 36
	registerLen     = 24
	unregisterLen   = 16
	opLen           = 72
	tableEntryLen   = 48
	byeLen          = 8
	replyFixed      = 16
	maxReplyMessage = 4096
)

// Hello is the first message of a connection.
type Hello struct {
	Version    uint8
	Rank       int    // global rank of the process (authenticated by Secret)
	GroupRank  int    // this process's rank in the group
	GroupSize  int    // ranks in the group
	TimeoutMs  uint32 // the client's collective timeout (informational)
	Generation uint64
	Job        string
	GroupID    string // names the process group; the same on every rank
	Secret     string
	Ranks      []int // global rank of each group rank
}

// BufRef names elements of a registered region.
type BufRef struct {
	Region uint64
	Offset uint64 // bytes
	Count  uint64 // elements
}

// Op is one operation request.
type Op struct {
	Kind   uint8
	DType  uint8
	Reduce uint8
	Peer   int32
	ID     uint64
	Tag    uint64
	A, B   BufRef
	// Table: OP_TABLE's entries, two per group rank (the block sent to
	// it, the block received from it); nil for an OP.
	Table []BufRef
}

// Register announces a region (its descriptor travels with the packet).
type Register struct {
	ID   uint64
	Size uint64
}

// Request is a decoded client message: exactly one field is set.
type Request struct {
	Hello      *Hello
	Register   *Register
	Unregister *uint64
	Op         *Op
	Bye        bool
	// RegisterCUDA: device memory or an event (proto_cuda.go).
	RegisterCUDA *RegisterCUDA
}

// DecodeRequest decodes one client packet. It never panics and never
// allocates more than the packet's size justifies.
func DecodeRequest(b []byte) (Request, error) {
	if len(b) == 0 {
		return Request{}, fmt.Errorf("%w: empty message", ErrProtocol)
	}
	le := binary.LittleEndian
	switch b[0] {
	case MsgHello:
		if len(b) < helloFixed {
			return Request{}, fmt.Errorf("%w: hello of %d bytes is shorter than %d", ErrProtocol, len(b), helloFixed)
		}
		h := &Hello{
			Version:    b[1],
			Rank:       int(le.Uint32(b[4:])),
			GroupRank:  int(le.Uint32(b[8:])),
			GroupSize:  int(le.Uint32(b[12:])),
			TimeoutMs:  le.Uint32(b[16:]),
			Generation: le.Uint64(b[20:]),
		}
		jl, gl, sl := int(le.Uint16(b[28:])), int(le.Uint16(b[30:])), int(le.Uint16(b[32:]))
		if jl > maxString || gl > maxString || sl > maxString {
			return Request{}, fmt.Errorf("%w: hello strings longer than %d bytes", ErrProtocol, maxString)
		}
		if h.GroupSize < 1 || h.GroupSize > MaxGroupSize {
			return Request{}, fmt.Errorf("%w: hello group size %d outside 1..%d", ErrProtocol, h.GroupSize, MaxGroupSize)
		}
		want := helloFixed + jl + gl + sl + 4*h.GroupSize
		if len(b) != want {
			return Request{}, fmt.Errorf("%w: hello of %d bytes, want %d for its lengths", ErrProtocol, len(b), want)
		}
		p := b[helloFixed:]
		h.Job, p = string(p[:jl]), p[jl:]
		h.GroupID, p = string(p[:gl]), p[gl:]
		h.Secret, p = string(p[:sl]), p[sl:]
		if !utf8.ValidString(h.Job) || !validGroupID(h.GroupID) {
			return Request{}, fmt.Errorf("%w: hello job or group id is not valid text", ErrProtocol)
		}
		h.Ranks = make([]int, h.GroupSize)
		for i := range h.Ranks {
			h.Ranks[i] = int(le.Uint32(p[4*i:]))
		}
		return Request{Hello: h}, nil
	case MsgRegister:
		if len(b) != registerLen {
			return Request{}, fmt.Errorf("%w: register of %d bytes, want %d", ErrProtocol, len(b), registerLen)
		}
		return Request{Register: &Register{ID: le.Uint64(b[8:]), Size: le.Uint64(b[16:])}}, nil
	case MsgUnregister:
		if len(b) != unregisterLen {
			return Request{}, fmt.Errorf("%w: unregister of %d bytes, want %d", ErrProtocol, len(b), unregisterLen)
		}
		id := le.Uint64(b[8:])
		return Request{Unregister: &id}, nil
	case MsgOp:
		if len(b) != opLen {
			return Request{}, fmt.Errorf("%w: op of %d bytes, want %d", ErrProtocol, len(b), opLen)
		}
		return Request{Op: decodeOp(b)}, nil
	case MsgOpTable:
		if len(b) < opLen || (len(b)-opLen)%tableEntryLen != 0 {
			return Request{}, fmt.Errorf("%w: op table of %d bytes is not %d plus %d per rank", ErrProtocol, len(b), opLen, tableEntryLen)
		}
		op := decodeOp(b)
		t := b[opLen:]
		op.Table = make([]BufRef, 0, 2*len(t)/tableEntryLen)
		for ; len(t) > 0; t = t[24:] {
			op.Table = append(op.Table, BufRef{Region: le.Uint64(t), Offset: le.Uint64(t[8:]), Count: le.Uint64(t[16:])})
		}
		return Request{Op: op}, nil
	case MsgBye:
		if len(b) != byeLen {
			return Request{}, fmt.Errorf("%w: bye of %d bytes, want %d", ErrProtocol, len(b), byeLen)
		}
		return Request{Bye: true}, nil
	case MsgRegisterCUDA:
		return decodeRegisterCUDA(b)
	}
	return Request{}, fmt.Errorf("%w: unknown message type %d", ErrProtocol, b[0])
}

// decodeOp decodes the fixed part of an OP or OP_TABLE (b holds at least
// opLen bytes).
func decodeOp(b []byte) *Op {
	le := binary.LittleEndian
	op := &Op{Kind: b[1], DType: b[2], Reduce: b[3], Peer: int32(le.Uint32(b[4:])), ID: le.Uint64(b[8:]), Tag: le.Uint64(b[16:])}
	op.A = BufRef{Region: le.Uint64(b[24:]), Offset: le.Uint64(b[32:]), Count: le.Uint64(b[40:])}
	op.B = BufRef{Region: le.Uint64(b[48:]), Offset: le.Uint64(b[56:]), Count: le.Uint64(b[64:])}
	return op
}

// validGroupID accepts the names torch gives process groups (numbers,
// hashes): letters, digits and ._:- only, so that it can name a data-plane
// group.
func validGroupID(s string) bool {
	if s == "" {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '.' || c == '_' || c == ':' || c == '-') {
			return false
		}
	}
	return true
}

// EncodeHello encodes h (clients and tests).
func EncodeHello(h *Hello) []byte {
	le := binary.LittleEndian
	b := make([]byte, helloFixed, helloFixed+len(h.Job)+len(h.GroupID)+len(h.Secret)+4*len(h.Ranks))
	b[0], b[1] = MsgHello, h.Version
	le.PutUint32(b[4:], uint32(h.Rank))
	le.PutUint32(b[8:], uint32(h.GroupRank))
	le.PutUint32(b[12:], uint32(h.GroupSize))
	le.PutUint32(b[16:], h.TimeoutMs)
	le.PutUint64(b[20:], h.Generation)
	le.PutUint16(b[28:], uint16(len(h.Job)))
	le.PutUint16(b[30:], uint16(len(h.GroupID)))
	le.PutUint16(b[32:], uint16(len(h.Secret)))
	b = append(b, h.Job...)
	b = append(b, h.GroupID...)
	b = append(b, h.Secret...)
	for _, r := range h.Ranks {
		b = le.AppendUint32(b, uint32(r))
	}
	return b
}

// EncodeRegister encodes a REGISTER (the descriptor goes beside it).
func EncodeRegister(r Register) []byte {
	b := make([]byte, registerLen)
	b[0] = MsgRegister
	binary.LittleEndian.PutUint64(b[8:], r.ID)
	binary.LittleEndian.PutUint64(b[16:], r.Size)
	return b
}

// EncodeUnregister encodes an UNREGISTER.
func EncodeUnregister(id uint64) []byte {
	b := make([]byte, unregisterLen)
	b[0] = MsgUnregister
	binary.LittleEndian.PutUint64(b[8:], id)
	return b
}

// EncodeOp encodes an OP, or an OP_TABLE when op.Table is not nil.
func EncodeOp(op *Op) []byte {
	le := binary.LittleEndian
	b := make([]byte, opLen, opLen+12*len(op.Table))
	b[0], b[1], b[2], b[3] = MsgOp, op.Kind, op.DType, op.Reduce
	if op.Table != nil {
		b[0] = MsgOpTable
	}
	le.PutUint32(b[4:], uint32(op.Peer))
	le.PutUint64(b[8:], op.ID)
	le.PutUint64(b[16:], op.Tag)
	for i, r := range []BufRef{op.A, op.B} {
		o := 24 + 24*i
		le.PutUint64(b[o:], r.Region)
		le.PutUint64(b[o+8:], r.Offset)
		le.PutUint64(b[o+16:], r.Count)
	}
	for _, r := range op.Table {
		b = le.AppendUint64(b, r.Region)
		b = le.AppendUint64(b, r.Offset)
		b = le.AppendUint64(b, r.Count)
	}
	return b
}

// EncodeBye encodes a BYE.
func EncodeBye() []byte { return []byte{MsgBye, 0, 0, 0, 0, 0, 0, 0} }

// Reply is a decoded agent message.
type Reply struct {
	Type    uint8
	Status  uint8
	ID      uint64
	Message string
}

// EncodeReply encodes WELCOME (only Type is used), REGISTERED, DONE,
// FAILED or ERROR. Messages longer than 4 KiB are cut.
func EncodeReply(r Reply) []byte { return appendReply(nil, r) }

// appendReply appends r's encoding to dst.
func appendReply(dst []byte, r Reply) []byte {
	if r.Type == MsgWelcome {
		return append(dst, MsgWelcome, Version, 0, 0, 0, 0, 0, 0)
	}
	msg := r.Message
	if len(msg) > maxReplyMessage {
		msg = msg[:maxReplyMessage]
	}
	var b [replyFixed]byte
	b[0], b[1] = r.Type, r.Status
	binary.LittleEndian.PutUint16(b[2:], uint16(len(msg)))
	binary.LittleEndian.PutUint64(b[8:], r.ID)
	dst = append(dst, b[:]...)
	return append(dst, msg...)
}

// DecodeReply decodes an agent packet (clients and tests).
func DecodeReply(b []byte) (Reply, error) {
	if len(b) == 8 && b[0] == MsgWelcome {
		return Reply{Type: MsgWelcome, Status: b[1]}, nil
	}
	if len(b) < replyFixed {
		return Reply{}, fmt.Errorf("%w: reply of %d bytes", ErrProtocol, len(b))
	}
	n := int(binary.LittleEndian.Uint16(b[2:]))
	if len(b) != replyFixed+n {
		return Reply{}, fmt.Errorf("%w: reply of %d bytes, want %d", ErrProtocol, len(b), replyFixed+n)
	}
	return Reply{Type: b[0], Status: b[1], ID: binary.LittleEndian.Uint64(b[8:]), Message: string(b[replyFixed:])}, nil
}
