package netemu

import (
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// OpenTUN creates a TUN device (IP packets, no packet-information header)
// named name inside the network namespace at nsPath (such as
// /run/netns/a; empty: the caller's namespace) and returns it. The device
// lives as long as the file is open: closing it removes the device. The
// caller gives it an address and sets it up (ip -n a addr add ... dev
// name; ip -n a link set name up). Needs CAP_NET_ADMIN and /dev/net/tun.
func OpenTUN(nsPath, name string) (*os.File, error) {
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// A thread that entered another namespace is never handed back to
		// the scheduler: it ends with this goroutine.
		runtime.LockOSThread()
		if nsPath != "" {
			ns, err := os.Open(nsPath)
			if err != nil {
				ch <- result{err: fmt.Errorf("netemu: opening namespace: %w", err)}
				return
			}
			defer ns.Close()
			if err := unix.Setns(int(ns.Fd()), unix.CLONE_NEWNET); err != nil {
				ch <- result{err: fmt.Errorf("netemu: entering namespace %s (needs root): %w", nsPath, err)}
				return
			}
		} else {
			defer runtime.UnlockOSThread()
		}
		fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
		if err != nil {
			ch <- result{err: fmt.Errorf("netemu: opening /dev/net/tun (needs the tun module and root): %w", err)}
			return
		}
		ifr, err := unix.NewIfreq(name)
		if err != nil {
			unix.Close(fd)
			ch <- result{err: fmt.Errorf("netemu: device name %q: %w", name, err)}
			return
		}
		ifr.SetUint16(unix.IFF_TUN | unix.IFF_NO_PI)
		if err := unix.IoctlIfreq(fd, unix.TUNSETIFF, ifr); err != nil {
			unix.Close(fd)
			ch <- result{err: fmt.Errorf("netemu: creating TUN device %q in %s: %w", name, nsPath, err)}
			return
		}
		// Non-blocking: the runtime's poller serves Read, and Close wakes it.
		ch <- result{f: os.NewFile(uintptr(fd), "tun:"+name)}
	}()
	r := <-ch
	return r.f, r.err
}
