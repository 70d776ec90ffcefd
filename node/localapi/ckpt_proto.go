package localapi

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"unicode/utf8"

	"github.com/gpumesh/gpumesh/checkpoint"
)

// The checkpoint connection of the local protocol.
//
// A rank's gpumesh.checkpoint module opens its own connection on the same
// socket and starts it with CKPT_HELLO instead of HELLO; the agent checks it
// like a hello (the task's secret, its rank running here in that
// generation) and answers WELCOME or ERROR. Then every CKPT_REQUEST is
// answered by one CKPT_REPLY with its id, in order:
//
//	CKPT_HELLO (16)    u8 type, u8 version, u16 len(job), u16 len(secret), u16 0,
//	                   u32 rank (global), u32 0, u64 generation, job, secret
//	CKPT_REQUEST (17)  u8 type, u8 kind, u8 flags, u8 0, u32 len(body), u64 id, body
//	CKPT_REPLY (0x90)  u8 type, u8 status, u8 flags, u8 0, u32 len(body), u64 id, body
//
// A body is JSON (a reply with a status other than OK: the error message).
// Flags: FlagBodyInFD, the body is not inline but in a memfd sent with the
// packet (SCM_RIGHTS, the first descriptor), for bodies longer than a
// packet; FlagFile, a reply carries a file's descriptor (after the body's).
//
// Request kinds and their bodies (request → reply):
//
//	PUT_BEGIN (1)   {"step"} → {} with FlagFile: an empty file, open for
//	                writing, that becomes this rank's part of step; the rank
//	                writes its state into it (once: the store's own
//	                temporary file, or a spool the agent uploads)
//	PUT_END (2)     {"id"}: the PUT_BEGIN's request id → the Part (size,
//	                CRC32Cs) once stored
//	PUT_ABORT (3)   {"id"} → {}: nothing of the part is stored
//	COMMIT (4)      {"step", "world_size", "parts", "meta"} → {}: the
//	                checkpoint is visible (the manifest written last)
//	LATEST (5)      {} → {"found", "manifest"}
//	LIST (6)        {} → {"manifests"}
//	OPEN (7)        {"step" (-1: newest), "part" (-1: the part this rank
//	                loads: its own of a sharded checkpoint of its world
//	                size, else rank 0's), "world_size"} → {"found",
//	                "manifest", "part", "source", "wait_seconds",
//	                "prefetch_seconds"} with FlagFile: the part as a local
//	                file checked against the manifest, open for reading (the
//	                agent's prefetched copy when it is of that step), which
//	                the rank may map
//
// Parts a connection began and did not end are aborted when it closes.

// Checkpoint message types.
const (
	MsgCkptHello   = 16
	MsgCkptRequest = 17
	MsgCkptReply   = 0x90
)

// Checkpoint request kinds.
const (
	CkptPutBegin = 1
	CkptPutEnd   = 2
	CkptPutAbort = 3
	CkptCommit   = 4
	CkptLatest   = 5
	CkptList     = 6
	CkptOpen     = 7
	ckptKindEnd  = 8
)

// Checkpoint packet flags.
const (
	FlagBodyInFD = 1
	FlagFile     = 2
)

const (
	ckptHelloFixed = 24
	ckptFixed      = 16
	// MaxCheckpointBody bounds a body sent in a memfd.
	MaxCheckpointBody = 64 << 20
	// maxInlineBody is the longest body sent inline.
	maxInlineBody = MaxMessage - ckptFixed
)

// CkptHello is the first message of a checkpoint connection.
type CkptHello struct {
	Version    uint8
	Rank       int
	Generation uint64
	Job        string
	Secret     string
}

// CkptRequest is one decoded checkpoint request (its body read).
type CkptRequest struct {
	Kind  uint8
	Flags uint8
	ID    uint64
	Len   uint32 // body length (inline, or in the memfd)
	Body  []byte // inline body; nil when FlagBodyInFD
}

// CkptBody is the JSON of requests and replies; each kind uses some fields.
type CkptBody struct {
	Step      *int64                `json:"step,omitempty"`
	Part      *int                  `json:"part,omitempty"`
	ID        uint64                `json:"id,omitempty"`
	WorldSize int                   `json:"world_size,omitempty"`
	Parts     []checkpoint.Part     `json:"parts,omitempty"`
	Meta      map[string]string     `json:"meta,omitempty"`
	Found     *bool                 `json:"found,omitempty"`
	Manifest  *checkpoint.Manifest  `json:"manifest,omitempty"`
	Manifests []checkpoint.Manifest `json:"manifests,omitempty"`
	// OPEN's reply: where the file came from ("prefetch": the copy the
	// agent fetched when the rank started; "store": fetched for this
	// request), how long the request waited for it, and how long the
	// prefetch took.
	Source          string   `json:"source,omitempty"`
	WaitSeconds     *float64 `json:"wait_seconds,omitempty"`
	PrefetchSeconds *float64 `json:"prefetch_seconds,omitempty"`
}

// DecodeCkptHello decodes a CKPT_HELLO. It never panics.
func DecodeCkptHello(b []byte) (*CkptHello, error) {
	if len(b) < ckptHelloFixed || b[0] != MsgCkptHello {
		return nil, fmt.Errorf("%w: checkpoint hello of %d bytes is shorter than %d", ErrProtocol, len(b), ckptHelloFixed)
	}
	le := binary.LittleEndian
	jl, sl := int(le.Uint16(b[2:])), int(le.Uint16(b[4:]))
	if jl > maxString || sl > maxString || len(b) != ckptHelloFixed+jl+sl {
		return nil, fmt.Errorf("%w: checkpoint hello of %d bytes does not match its lengths", ErrProtocol, len(b))
	}
	h := &CkptHello{Version: b[1], Rank: int(le.Uint32(b[8:])), Generation: le.Uint64(b[16:])}
	h.Job = string(b[ckptHelloFixed : ckptHelloFixed+jl])
	h.Secret = string(b[ckptHelloFixed+jl:])
	if !utf8.ValidString(h.Job) || h.Job == "" {
		return nil, fmt.Errorf("%w: checkpoint hello job is not valid text", ErrProtocol)
	}
	return h, nil
}

// EncodeCkptHello encodes h (clients and tests).
func EncodeCkptHello(h *CkptHello) []byte {
	le := binary.LittleEndian
	b := make([]byte, ckptHelloFixed, ckptHelloFixed+len(h.Job)+len(h.Secret))
	b[0], b[1] = MsgCkptHello, h.Version
	le.PutUint16(b[2:], uint16(len(h.Job)))
	le.PutUint16(b[4:], uint16(len(h.Secret)))
	le.PutUint32(b[8:], uint32(h.Rank))
	le.PutUint64(b[16:], h.Generation)
	b = append(b, h.Job...)
	return append(b, h.Secret...)
}

// DecodeCkptRequest decodes a CKPT_REQUEST packet. It never panics.
func DecodeCkptRequest(b []byte) (CkptRequest, error) {
	if len(b) < ckptFixed || b[0] != MsgCkptRequest {
		return CkptRequest{}, fmt.Errorf("%w: not a checkpoint request (%d bytes)", ErrProtocol, len(b))
	}
	le := binary.LittleEndian
	r := CkptRequest{Kind: b[1], Flags: b[2], Len: le.Uint32(b[4:]), ID: le.Uint64(b[8:])}
	if r.Kind == 0 || r.Kind >= ckptKindEnd {
		return CkptRequest{}, fmt.Errorf("%w: unknown checkpoint request kind %d", ErrProtocol, r.Kind)
	}
	if r.Flags&^FlagBodyInFD != 0 {
		return CkptRequest{}, fmt.Errorf("%w: checkpoint request flags %#x", ErrProtocol, r.Flags)
	}
	if r.Flags&FlagBodyInFD != 0 {
		if len(b) != ckptFixed || r.Len > MaxCheckpointBody {
			return CkptRequest{}, fmt.Errorf("%w: a body of %d bytes in a descriptor (at most %d) with %d inline", ErrProtocol, r.Len, MaxCheckpointBody, len(b)-ckptFixed)
		}
		return r, nil
	}
	if int(r.Len) != len(b)-ckptFixed {
		return CkptRequest{}, fmt.Errorf("%w: checkpoint request of %d bytes says its body has %d", ErrProtocol, len(b), r.Len)
	}
	r.Body = b[ckptFixed:]
	return r, nil
}

// EncodeCkptPacket encodes a CKPT_REQUEST (typ MsgCkptRequest, code the
// kind) or CKPT_REPLY (typ MsgCkptReply, code the status). With
// FlagBodyInFD, body is only measured: its bytes travel in a memfd.
func EncodeCkptPacket(typ, code, flags uint8, id uint64, body []byte) []byte {
	b := make([]byte, ckptFixed, ckptFixed+len(body))
	b[0], b[1], b[2] = typ, code, flags
	binary.LittleEndian.PutUint32(b[4:], uint32(len(body)))
	binary.LittleEndian.PutUint64(b[8:], id)
	if flags&FlagBodyInFD != 0 {
		return b
	}
	return append(b, body...)
}

// DecodeCkptReply decodes a CKPT_REPLY (clients and tests); a body in a
// memfd is not read (Len says its size).
func DecodeCkptReply(b []byte) (status, flags uint8, id uint64, n uint32, body []byte, err error) {
	if len(b) < ckptFixed || b[0] != MsgCkptReply {
		return 0, 0, 0, 0, nil, fmt.Errorf("%w: not a checkpoint reply (%d bytes)", ErrProtocol, len(b))
	}
	le := binary.LittleEndian
	status, flags, n, id = b[1], b[2], le.Uint32(b[4:]), le.Uint64(b[8:])
	if flags&FlagBodyInFD == 0 {
		if int(n) != len(b)-ckptFixed {
			return 0, 0, 0, 0, nil, fmt.Errorf("%w: checkpoint reply of %d bytes says its body has %d", ErrProtocol, len(b), n)
		}
		body = b[ckptFixed:]
	}
	return status, flags, id, n, body, nil
}

// decodeBody parses a request body.
func decodeBody(b []byte) (CkptBody, error) {
	var body CkptBody
	if len(b) == 0 {
		return body, nil
	}
	if err := json.Unmarshal(b, &body); err != nil {
		return CkptBody{}, fmt.Errorf("%w: checkpoint request body: %v", ErrProtocol, err)
	}
	return body, nil
}
