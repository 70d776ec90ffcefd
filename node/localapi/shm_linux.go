package localapi

import (
	"fmt"

	"golang.org/x/sys/unix"
)

// supported is true where the local API works.
const supported = true

// mapRegion maps the memfd fd (which it always closes) after checking
// that it is sealed against shrinking and holds at least size bytes: a
// client that could shrink the file afterwards would make the agent's
// accesses fault (SIGBUS), so unsealed descriptors are refused.
func mapRegion(fd int, size uint64, maxSize uint64) ([]byte, error) {
	defer unix.Close(fd)
	if size == 0 || size > maxSize || size > uint64(int(^uint(0)>>1)) {
		return nil, fmt.Errorf("%w: size %d outside 1..%d bytes", ErrBadRegion, size, maxSize)
	}
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: the descriptor is not a sealable memfd (create it with memfd_create(MFD_ALLOW_SEALING)): %v", ErrBadRegion, err)
	}
	if seals&unix.F_SEAL_SHRINK == 0 {
		return nil, fmt.Errorf("%w: the memfd is not sealed against shrinking (add F_SEAL_SHRINK)", ErrBadRegion)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("%w: fstat: %v", ErrBadRegion, err)
	}
	if st.Size < 0 || uint64(st.Size) < size {
		return nil, fmt.Errorf("%w: the memfd holds %d bytes, fewer than the %d announced", ErrBadRegion, st.Size, size)
	}
	mem, err := unix.Mmap(fd, 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("%w: mmap: %v", ErrBadRegion, err)
	}
	return mem, nil
}

func unmapRegion(mem []byte) { _ = unix.Munmap(mem) }

// memfdWith returns a memfd holding b.
func memfdWith(b []byte) (int, error) {
	fd, err := unix.MemfdCreate("gpumesh-ckpt-body", unix.MFD_CLOEXEC)
	if err != nil {
		return -1, err
	}
	for off := 0; off < len(b); {
		n, err := unix.Pwrite(fd, b[off:], int64(off))
		if err != nil {
			unix.Close(fd)
			return -1, err
		}
		off += n
	}
	return fd, nil
}

// closeFDs closes descriptors received in a packet.
func closeFDs(fds []int) {
	for _, fd := range fds {
		_ = unix.Close(fd)
	}
}

// parseRights returns the descriptors of an SCM_RIGHTS control message.
func parseRights(oob []byte) ([]int, error) {
	if len(oob) == 0 {
		return nil, nil
	}
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for i := range msgs {
		f, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, f...)
	}
	return fds, nil
}
