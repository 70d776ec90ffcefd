package collective

import (
	"bytes"
	"errors"
	"testing"
)

// fuzzSeedFrames are valid and nearly valid frames: data frames of every
// operation, an abort frame, and a few broken ones. The committed corpus in
// testdata/fuzz/FuzzDecodeFrame holds the same and more.
func fuzzSeedFrames() [][]byte {
	var seeds [][]byte
	for i, c := range []CollKind{CollAllReduce, CollReduceScatter, CollAllGather, CollBroadcast, CollSendRecv, CollBarrier, CollAllToAll, CollGather, CollScatter} {
		h := &Header{Kind: FrameData, Coll: c, DType: AllDTypes[i%len(AllDTypes)], Channels: 2, Root: int32(i),
			Group: GroupHash("job-1"), Generation: 3, Seq: uint64(i), Count: 64, Offset: 8, ChunkElems: 16, Src: 1}
		if c == CollAllReduce || c == CollReduceScatter {
			h.Op = OpSum
		}
		payload := make([]byte, 4*h.DType.Size())
		for k := range payload {
			payload[k] = byte(k)
		}
		seeds = append(seeds, AppendFrame(nil, h, payload))
	}
	seeds = append(seeds, AppendFrame(nil, &Header{Kind: FrameAbort, Src: 2}, []byte("rank 2: peer gone")))
	seeds = append(seeds, []byte("GMC1"), nil, make([]byte, HeaderSize))
	return seeds
}

// FuzzDecodeFrame feeds arbitrary bytes to the data-plane frame decoder: it
// must never panic, every error must wrap ErrBadFrame, and a frame it
// accepts must re-encode to the same bytes.
func FuzzDecodeFrame(f *testing.F) {
	for _, s := range fuzzSeedFrames() {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		h, payload, err := DecodeFrame(b)
		hh, herr := DecodeHeader(b)
		if err != nil {
			if !errors.Is(err, ErrBadFrame) {
				t.Fatalf("DecodeFrame error %v does not wrap ErrBadFrame", err)
			}
			if herr != nil && !errors.Is(herr, ErrBadFrame) {
				t.Fatalf("DecodeHeader error %v does not wrap ErrBadFrame", herr)
			}
			return
		}
		if herr != nil || hh != h {
			t.Fatalf("DecodeFrame accepted a header DecodeHeader decodes as %+v, %v", hh, herr)
		}
		if int(h.Length) != len(payload) || len(b) != HeaderSize+len(payload) {
			t.Fatalf("header says %d payload bytes, got %d of a %d-byte frame", h.Length, len(payload), len(b))
		}
		if h.Kind == FrameData {
			if uint64(h.Length)/uint64(h.DType.Size())+h.Offset > h.Count {
				t.Fatalf("accepted a chunk outside its operation: %+v", h)
			}
		}
		again := AppendFrame(nil, &h, payload)
		if !bytes.Equal(again, b) {
			t.Fatalf("decoded frame re-encodes differently:\n in %x\nout %x", b, again)
		}
	})
}
