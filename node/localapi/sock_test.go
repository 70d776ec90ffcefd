//go:build linux

package localapi

import (
	"errors"
	"net"
	"os"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketPair returns the two ends of a SOCK_SEQPACKET pair: one as a
// net.UnixConn (the agent's side), one as a raw descriptor (the client's).
func socketPair(t *testing.T) (*net.UnixConn, int) {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := os.NewFile(uintptr(fds[0]), "agent")
	c, err := net.FileConn(f)
	_ = f.Close()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(); _ = unix.Close(fds[1]) })
	return c.(*net.UnixConn), fds[1]
}

// A client that does not read its answers: once its socket is full, a
// write waits at most the write timeout and fails (it does not block the
// worker forever); once the client reads again, writes go through again
// (the deadline does not stay behind).
func TestSockIOWriteToAClientThatDoesNotRead(t *testing.T) {
	c, peer := socketPair(t)
	sio, err := newSockIO(c, 200*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	pkt := EncodeReply(Reply{Type: MsgDone, ID: 7})
	done := make(chan error, 1)
	go func() {
		for {
			if err := sio.send(pkt); err != nil {
				done <- err
				return
			}
		}
	}()
	select {
	case err := <-done:
		if !errors.Is(err, os.ErrDeadlineExceeded) {
			t.Fatalf("a write to a full socket failed with %v, want a deadline error", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a write to a client that does not read blocked for 20 s (its timeout is 200 ms)")
	}
	// The client reads what is there; the next write goes through.
	buf := make([]byte, MaxMessage)
	for {
		n, _, err := unix.Recvfrom(peer, buf, unix.MSG_DONTWAIT)
		if errors.Is(err, unix.EAGAIN) {
			break
		}
		if err != nil || n != len(pkt) {
			t.Fatalf("reading an answer: %d bytes, %v", n, err)
		}
	}
	if err := sio.send(pkt); err != nil {
		t.Fatalf("a write after the client read again: %v", err)
	}
	if r, err := DecodeReply(buf[:recvOne(t, peer, buf)]); err != nil || r.ID != 7 || r.Type != MsgDone {
		t.Fatalf("the answer read back: %+v, %v", r, err)
	}
}

func recvOne(t *testing.T, fd int, buf []byte) int {
	t.Helper()
	n, _, err := unix.Recvfrom(fd, buf, 0)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// recv returns packets with their descriptors, EOF when the client closes,
// and an error for a packet larger than the buffer.
func TestSockIORecv(t *testing.T) {
	c, peer := socketPair(t)
	sio, err := newSockIO(c, time.Second)
	if err != nil {
		t.Fatal(err)
	}
	buf, oob := make([]byte, 64), make([]byte, 256)
	fd, m := memfd(t, 4096, true)
	defer func() { _ = unix.Munmap(m) }()
	if err := unix.Sendmsg(peer, []byte("hello"), unix.UnixRights(fd), nil, 0); err != nil {
		t.Fatal(err)
	}
	_ = unix.Close(fd)
	pkt, fds, err := sio.recv(buf, oob)
	if err != nil || string(pkt) != "hello" || len(fds) != 1 {
		t.Fatalf("recv: %q %v %v", pkt, fds, err)
	}
	closeFDs(fds)
	if _, err := unix.Write(peer, make([]byte, 65)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := sio.recv(buf, oob); !errors.Is(err, ErrProtocol) {
		t.Fatalf("a packet larger than the buffer: %v, want ErrProtocol", err)
	}
	_ = unix.Shutdown(peer, unix.SHUT_WR)
	if _, _, err := sio.recv(buf, oob); !errors.Is(err, errEOF) {
		t.Fatalf("after the client shut down: %v, want errEOF", err)
	}
}
