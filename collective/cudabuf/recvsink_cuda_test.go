//go:build cuda

package cudabuf

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/collective"
)

// Two ranks in one process on two data-plane servers (so every hop is a
// TCP lane), device buffers: every op × dtype at awkward counts, with chunks
// smaller and larger than a pinned pool slot, equal to the host reference;
// every chunk received straight into a pinned slot (DirectRecvs), no host
// copy into pinned memory (HostCopies, StagedWrites 0).
func TestRecvStagerOverLanes(t *testing.T) {
	be := openBackendCfg(t, 64<<10, 8) // 64 KiB slots: 256 KiB chunks need sized slots
	ndev := be.NumDevices()
	ctx := context.Background()
	for _, chunk := range []int{16 << 10, 256 << 10} {
		cfg := collective.DefaultConfig()
		cfg.Channels, cfg.ChunkBytes, cfg.Timeout = 4, chunk, 20*time.Second
		g, err := collective.NewLoopbackGroup("recv-stager", 1, 2, cfg, collective.DefaultNetConfig())
		if err != nil {
			t.Fatal(err)
		}
		for _, dt := range collective.AllDTypes {
			for _, count := range []int{3, 4099, 300007} {
				bufs := make([]*Buffer, 2)
				for r := range bufs {
					if bufs[r], err = be.NewBuffer(r%ndev, dt, count); err != nil {
						t.Fatal(err)
					}
				}
				for _, op := range collective.AllOps {
					name := fmt.Sprintf("chunk=%dKiB %v %v n=%d", chunk>>10, dt, op, count)
					ref := uploadSmallInts(t, bufs, dt, count, op)
					st0 := []Stats{bufs[0].Stats(), bufs[1].Stats()}
					allReduceGroup(t, ctx, name, g.Comms, bufs, op)
					for r, b := range bufs {
						checkDownload(t, name, r, b, ref)
						st := b.Stats()
						if count*dt.Size() > cfg.SmallBytes {
							direct, copies, staged := st.DirectRecvs-st0[r].DirectRecvs, st.HostCopies-st0[r].HostCopies, st.StagedWrites-st0[r].StagedWrites
							if direct == 0 || copies != 0 || staged != 0 {
								t.Fatalf("%s rank %d: %d direct receives, %d host copies, %d staged writes; want only direct receives", name, r, direct, copies, staged)
							}
						}
					}
				}
				for _, b := range bufs {
					b.Free()
				}
			}
		}
		g.Close()
	}
	if free, total := be.StagingSlots(); free > total {
		t.Fatalf("staging slots: %d free of %d", free, total)
	}
}

// Reads larger than a pool slot use a sized slot that is kept and reused:
// the slot count grows by one for the first such read, not per read.
func TestSizedSlotReuse(t *testing.T) {
	be := openBackendCfg(t, 64<<10, 4)
	const n = 100000 // 400 KB of float32: more than a 64 KiB slot
	r := rand.New(rand.NewPCG(5, 6))
	src := randomHost(r, collective.Float32, n)
	buf, err := be.NewBuffer(0, collective.Float32, n)
	if err != nil {
		t.Fatal(err)
	}
	defer buf.Free()
	if err := buf.Upload(src.Bytes()); err != nil {
		t.Fatal(err)
	}
	_, before := be.StagingSlots()
	for i := 0; i < 3; i++ {
		got, err := buf.ReadChunk(1, n-2)
		if err != nil {
			t.Fatal(err)
		}
		compareBytes(t, collective.Float32, got, src.Bytes()[4:4*(n-1)])
		buf.ReleaseChunk(1, n-2, got)
		// a large write too: one sized slot, one host copy
		if err := buf.WriteChunk(0, collective.Segments{src.Bytes()}); err != nil {
			t.Fatal(err)
		}
		if err := buf.Sync(); err != nil {
			t.Fatal(err)
		}
	}
	if _, after := be.StagingSlots(); after != before+1 {
		t.Fatalf("staging slots %d -> %d after 3 large reads and writes; want one sized slot added", before, after)
	}
	// BeginRecv of a large chunk takes the same sized slot; AbortRecv gives it back
	p, tok, err := buf.BeginRecv(0, n)
	if err != nil || len(p) != 4*n {
		t.Fatalf("BeginRecv: %d bytes, %v", len(p), err)
	}
	buf.AbortRecv(tok)
	if err := buf.CommitRecv(0, n, "not a slot", false, collective.OpSum); err == nil {
		t.Fatal("CommitRecv with a foreign token succeeded")
	}
	p, tok, err = buf.BeginRecv(0, n)
	if err != nil {
		t.Fatal(err)
	}
	copy(p, src.Bytes())
	if err := buf.CommitRecv(0, n, tok, true, collective.OpSum); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4*n)
	if err := buf.Download(got); err != nil {
		t.Fatal(err)
	}
	want := collective.NewHostBuffer(collective.Float32, n)
	copy(want.Bytes(), src.Bytes())
	want.ReduceChunk(0, collective.Segments{src.Bytes()}, collective.OpSum)
	compareBytes(t, collective.Float32, got, want.Bytes())
	if _, after := be.StagingSlots(); after != before+1 {
		t.Fatalf("staging slots %d -> %d after receives; want the sized slot reused", before, after)
	}
	if st := buf.Stats(); st.DirectRecvs != 1 || st.HostCopies != 3 {
		t.Fatalf("stats %+v: want 1 direct receive and 3 host copies", st)
	}
}
