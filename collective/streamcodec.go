package collective

import (
	"fmt"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/mem"
)

// The raw codec of the data plane's gRPC streams. A frame travels as one gRPC
// message whose bytes are the 83-byte header of frame.go followed by the
// payload, registered under the content-subtype CodecName, so tensor bytes
// are never inside protobuf messages and the Link service can share a
// *grpc.Server with protobuf services. Sending, the payload is borrowed from
// the caller (outMsg reports SendDone once gRPC has written it, or a while
// after the endpoint closes for a frame its broken connection never wrote:
// outLink.endLent); receiving,
// the frame keeps gRPC's buffers until InFrame.Release.

// CodecName is the gRPC content-subtype of data-plane frames
// ("application/grpc+gpumesh-frame").
const CodecName = "gpumesh-frame"

func init() { encoding.RegisterCodecV2(frameCodec{}) }

// outMsg is a frame being sent: its header bytes and a borrowed payload.
// It is also the mem.BufferPool of its payload buffer, so gRPC's final Free
// of the payload (after the bytes are written to the socket) reaches Put,
// which reports SendDone through done.
type outMsg struct {
	hdr    [HeaderSize]byte
	hdrBuf mem.Buffer
	data   []byte
	done   *lentPayload
	bs     [2]mem.Buffer
	whole  []byte // small frames: header and payload copied together
}

// lentPayload is a payload lent to gRPC, whose SendDone is reported once:
// by gRPC's final Free of the buffer (outMsg.Put) or, for a frame gRPC
// never frees, after the endpoint's Close (outLink.endLent). gRPC frees the
// frames of a stream that its connection's writer cleans up, but not those
// still queued when that writer exits on a broken connection.
type lentPayload struct {
	done  SendDone
	ended atomic.Bool
}

// end reports SendDone unless it was reported already.
func (p *lentPayload) end() {
	if !p.ended.Swap(true) {
		p.done.SendDone()
	}
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
		d.end()
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
