//go:build !linux

package localapi

import (
	"net"
	"time"
)

// The local API needs Linux: SOCK_SEQPACKET sockets, sealed memfds passed
// with SCM_RIGHTS, raw recvmsg (shm_linux.go, sock_linux.go). Elsewhere the
// package builds, so that the gpumesh CLI does, and Listen refuses to run;
// nothing below is reached.
const supported = false

type sockIO struct{}

func newSockIO(*net.UnixConn, time.Duration) (*sockIO, error) { return nil, ErrUnsupportedOS }
func (*sockIO) recv([]byte, []byte) ([]byte, []int, error)    { return nil, nil, ErrUnsupportedOS }
func (*sockIO) send([]byte) error                             { return ErrUnsupportedOS }

func checkPacket([]byte, []byte, int, int, int) ([]byte, []int, error) {
	return nil, nil, ErrUnsupportedOS
}
func mapRegion(int, uint64, uint64) ([]byte, error) { return nil, ErrUnsupportedOS }
func unmapRegion([]byte)                            {}
func memfdWith([]byte) (int, error)                 { return -1, ErrUnsupportedOS }
func closeFDs([]int)                                {}
