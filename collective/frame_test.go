package collective

import (
	"errors"
	"testing"
)

func sampleHeader() Header {
	return Header{Kind: FrameData, Coll: CollAllReduce, DType: Float32, Op: OpSum, Algo: AlgoRing, Channels: 4,
		Root: -1, Group: GroupHash("job"), Generation: 3, Seq: 9, Count: 1000, Offset: 10, ChunkElems: 256, Src: 2, Length: 40}
}

func TestFrameRoundTrip(t *testing.T) {
	h := sampleHeader()
	payload := make([]byte, 40)
	b := AppendFrame(nil, &h, payload)
	got, p, err := DecodeFrame(b)
	if err != nil || got != h || len(p) != 40 {
		t.Fatalf("round trip: %+v %v (%d bytes)", got, err, len(p))
	}
}

func TestFrameRejects(t *testing.T) {
	h := sampleHeader()
	good := AppendFrame(nil, &h, make([]byte, 40))
	mut := func(f func(b []byte)) []byte {
		b := append([]byte(nil), good...)
		f(b)
		return b
	}
	for name, b := range map[string][]byte{
		"short":     good[:10],
		"magic":     mut(func(b []byte) { b[0] = 'X' }),
		"version":   mut(func(b []byte) { b[4] = 9 }),
		"kind":      mut(func(b []byte) { b[5] = 7 }),
		"dtype":     mut(func(b []byte) { b[7] = 42 }),
		"op":        mut(func(b []byte) { b[8] = 42 }),
		"reserved":  mut(func(b []byte) { b[81] = 1 }),
		"length":    mut(func(b []byte) { b[76] = 44 }),
		"truncated": good[:len(good)-1],
		"odd bytes": mut(func(b []byte) { b[76] = 39 }),
		"outside":   mut(func(b []byte) { b[48] = 0xff; b[49] = 0xff }),
	} {
		if _, _, err := DecodeFrame(b); !errors.Is(err, ErrBadFrame) {
			t.Errorf("%s: got %v, want ErrBadFrame", name, err)
		}
	}
}
