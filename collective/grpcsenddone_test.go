package collective

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gpumesh/gpumesh/internal/poll"
)

// countDone counts SendDone calls.
type countDone struct{ n *atomic.Int64 }

func (d countDone) SendDone() { d.n.Add(1) }

// Frames queued on a gRPC data-plane stream when its connection dies are
// still reported SendDone, once per Send (Endpoint's contract): otherwise
// their operation's FrameHold is never released and a device buffer's
// staging slot never comes back.
func TestGRPCSendDoneWhenConnectionDies(t *testing.T) {
	old := lentGrace
	lentGrace = 100 * time.Millisecond
	t.Cleanup(func() { lentGrace = old })
	gcfg := DefaultNetConfig()
	gcfg.DataPlane = DataPlaneGRPC
	srvs := listenServers(t, 2, gcfg)
	addrs := []string{srvs[0].Addr(), srvs[1].Addr()}
	open := func(r int) Endpoint {
		ep, err := srvs[r].Transport().Open(EndpointSpec{Job: "j", Generation: 1, Rank: r, Addrs: addrs, Channels: 1})
		if err != nil {
			t.Fatal(err)
		}
		return ep
	}
	sender := open(0)
	defer sender.Close()
	receiver := open(1) // never receives: the stream's window fills
	defer receiver.Close()

	var sent, done atomic.Int64
	payload := make([]byte, 1<<20)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stopped := make(chan error, 1)
	go func() {
		for i := uint64(0); ; i++ {
			h := &Header{Kind: FrameData, Group: GroupHash("j"), Generation: 1, Seq: i, Count: uint64(len(payload) / 4), DType: Float32}
			sent.Add(1)
			if err := sender.Send(ctx, 1, 0, h, payload, PeerRef{}, countDone{&done}); err != nil {
				stopped <- err
				return
			}
		}
	}()
	// the sender is blocked with frames handed to gRPC and not written
	poll.Until(t, 20*time.Second, func() (bool, string) {
		s, d := sent.Load(), done.Load()
		return s-d >= 3, fmt.Sprintf("sent %d, done %d", s, d)
	})
	srvs[1].Close() // the receiver's node goes away
	select {
	case <-stopped:
	case <-time.After(20 * time.Second):
		t.Fatal("Send still blocked 20s after the peer's server closed")
	}
	_ = sender.Close()
	poll.Until(t, 20*time.Second, func() (bool, string) {
		s, d := sent.Load(), done.Load()
		return s == d, fmt.Sprintf("sent %d, SendDone %d", s, d)
	}, "every Send reported SendDone after the connection died")
}
