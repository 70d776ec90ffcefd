package localapi

import (
	"bytes"
	"testing"
)

// The decoder takes any packet a hostile client can send: it never panics,
// and whatever it accepts encodes back to the same bytes (so nothing is
// silently ignored).
func FuzzDecodeRequest(f *testing.F) {
	f.Add(EncodeHello(&Hello{Version: Version, Rank: 1, GroupRank: 1, GroupSize: 2, Generation: 3, Job: "j", GroupID: "0", Secret: "s", Ranks: []int{0, 1}}))
	f.Add(EncodeRegister(Register{ID: 7, Size: 4096}))
	f.Add(EncodeUnregister(7))
	f.Add(EncodeOp(&Op{Kind: OpAllReduce, DType: 1, Reduce: 1, ID: 9, A: BufRef{Region: 7, Count: 1024}}))
	f.Add(EncodeOp(&Op{Kind: OpAllToAll, DType: 1, ID: 10, Table: []BufRef{{}, {}, {Region: 7, Count: 8}, {Region: 7, Offset: 32, Count: 8}}}))
	f.Add(EncodeOp(&Op{Kind: OpGather, DType: 1, ID: 11, Table: []BufRef{}}))
	f.Add(EncodeRegisterCUDA(&RegisterCUDA{What: CUDAMemory, ID: 3, Size: 1 << 20}))
	f.Add(EncodeRegisterCUDA(&RegisterCUDA{What: CUDAEvent, ID: 4}))
	f.Add(EncodeBye())
	f.Add([]byte{MsgHello})
	f.Add([]byte{})
	f.Add([]byte{0xff, 0, 0})
	f.Fuzz(func(t *testing.T, b []byte) {
		req, err := DecodeRequest(b)
		if err != nil {
			return
		}
		var enc []byte
		switch {
		case req.Hello != nil:
			enc = EncodeHello(req.Hello)
		case req.Register != nil:
			enc = EncodeRegister(*req.Register)
		case req.Unregister != nil:
			enc = EncodeUnregister(*req.Unregister)
		case req.Op != nil:
			enc = EncodeOp(req.Op)
		case req.RegisterCUDA != nil:
			enc = EncodeRegisterCUDA(req.RegisterCUDA)
		case req.Bye:
			enc = EncodeBye()
		default:
			t.Fatalf("decoded %x to an empty request", b)
		}
		// Padding bytes are not checked; compare with them cleared.
		got := clearPad(enc)
		want := clearPad(append([]byte(nil), b...))
		if !bytes.Equal(got, want) {
			t.Fatalf("decode/encode of %x gave %x", want, got)
		}
	})
}

func clearPad(b []byte) []byte {
	switch b[0] {
	case MsgHello:
		b[2], b[3], b[34], b[35] = 0, 0, 0, 0
	case MsgRegister, MsgUnregister, MsgBye:
		for i := 1; i < 8; i++ {
			b[i] = 0
		}
	case MsgRegisterCUDA:
		for i := 2; i < 8; i++ {
			b[i] = 0
		}
	}
	return b
}

func FuzzDecodeReply(f *testing.F) {
	f.Add(EncodeReply(Reply{Type: MsgDone, Status: 1, ID: 3, Message: "boom"}))
	f.Add(EncodeReply(Reply{Type: MsgWelcome}))
	f.Fuzz(func(t *testing.T, b []byte) { _, _ = DecodeReply(b) })
}
