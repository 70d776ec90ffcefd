package localapi

import (
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// sockIO reads and writes one client's socket with raw system calls.
//
// The net package makes every read and write through the runtime's
// entersyscall, which wakes the runtime's monitor thread (sysmon) whenever
// it sleeps because every P was idle, as an agent between a rank's
// operations is: a futex wake, and a thread woken on another CPU, for each
// request and each answer (perf of an agent under a 4 KiB all_reduce loop
// showed it as the largest single kernel cost on the request path). The
// socket is non-blocking (the net package made it so), so recvmsg with
// MSG_DONTWAIT and write never block and may be raw system calls; waiting
// for readiness, deadlines and Close still go through the runtime's poller
// (syscall.RawConn).
type sockIO struct {
	c  *net.UnixConn
	rc syscall.RawConn

	// The read in progress (one reader at a time: the read loop).
	rbuf, roob        []byte
	rn, roobn, rflags int
	rerr              error
	readFn            func(fd uintptr) bool

	// The write in progress (one writer at a time: the caller's lock).
	wbuf         []byte
	werr         error
	writeFn      func(fd uintptr) bool
	waitFn       func(fd uintptr) bool
	writeTimeout time.Duration
}

func newSockIO(c *net.UnixConn, writeTimeout time.Duration) (*sockIO, error) {
	rc, err := c.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &sockIO{c: c, rc: rc, writeTimeout: writeTimeout}
	s.readFn = s.tryRead
	s.writeFn = s.tryWrite
	s.waitFn = func(fd uintptr) bool { return s.tryWrite(fd) && s.werr != errWouldBlock }
	return s, nil
}

// recv reads one packet and the descriptors sent with it (as recvPacket).
func (s *sockIO) recv(buf, oob []byte) ([]byte, []int, error) {
	s.rbuf, s.roob, s.rerr = buf, oob, nil
	err := s.rc.Read(s.readFn)
	s.rbuf, s.roob = nil, nil
	if err == nil {
		err = s.rerr
	}
	if err != nil {
		return nil, nil, err
	}
	return checkPacket(buf, oob, s.rn, s.roobn, s.rflags)
}

// tryRead is the raw read: false (wait for the socket) only on EAGAIN.
func (s *sockIO) tryRead(fd uintptr) bool {
	var iov unix.Iovec
	iov.Base = &s.rbuf[0]
	iov.SetLen(len(s.rbuf))
	var msg unix.Msghdr
	msg.Iov = &iov
	msg.SetIovlen(1)
	if len(s.roob) > 0 {
		msg.Control = &s.roob[0]
		msg.SetControllen(len(s.roob))
	}
	for {
		r, _, e := unix.RawSyscall(unix.SYS_RECVMSG, fd, uintptr(unsafe.Pointer(&msg)), unix.MSG_DONTWAIT|unix.MSG_CMSG_CLOEXEC)
		switch e {
		case 0:
			s.rn, s.roobn, s.rflags = int(r), int(msg.Controllen), int(msg.Flags)
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			return false
		}
		s.rerr = &net.OpError{Op: "read", Net: "unixpacket", Err: e}
		return true
	}
}

// send writes one packet. A write that would block waits at most the
// write timeout (a client that does not read its answers); only then is a
// deadline set, and it is cleared again afterwards.
func (s *sockIO) send(b []byte) error {
	s.wbuf, s.werr = b, nil
	err := s.rc.Write(s.writeFn)
	if err == nil && s.werr == errWouldBlock {
		_ = s.c.SetWriteDeadline(time.Now().Add(s.writeTimeout))
		err = s.rc.Write(s.waitFn)
		_ = s.c.SetWriteDeadline(time.Time{})
	}
	s.wbuf = nil
	if err == nil {
		err = s.werr
	}
	return err
}

var errWouldBlock = errors.New("write would block")

// tryWrite is the raw write; it never waits (send does, once).
func (s *sockIO) tryWrite(fd uintptr) bool {
	b := s.wbuf
	s.werr = nil
	for {
		r, _, e := unix.RawSyscall(unix.SYS_WRITE, fd, uintptr(unsafe.Pointer(unsafe.SliceData(b))), uintptr(len(b)))
		switch e {
		case 0:
			if int(r) != len(b) {
				s.werr = io.ErrShortWrite
			}
			return true
		case unix.EINTR:
			continue
		case unix.EAGAIN:
			s.werr = errWouldBlock
			return true
		}
		s.werr = &net.OpError{Op: "write", Net: "unixpacket", Err: e}
		return true
	}
}

// checkPacket checks what recvmsg returned and collects the descriptors.
func checkPacket(buf, oob []byte, n, oobn, flags int) ([]byte, []int, error) {
	fds, perr := parseRights(oob[:oobn])
	if flags&unix.MSG_CTRUNC != 0 || flags&unix.MSG_TRUNC != 0 {
		closeFDs(fds)
		return nil, nil, fmt.Errorf("%w: packet or its descriptors larger than %d bytes", ErrProtocol, len(buf))
	}
	if perr != nil {
		closeFDs(fds)
		return nil, nil, fmt.Errorf("%w: control message: %v", ErrProtocol, perr)
	}
	if n == 0 {
		closeFDs(fds)
		return nil, nil, errEOF
	}
	return buf[:n], fds, nil
}
