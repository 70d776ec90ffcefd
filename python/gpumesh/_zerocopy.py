"""Zero-copy host tensors: moving a tensor's storage into a segment the
agent maps, so that operations on it copy nothing in the rank.

The agent maps only sealed memfds (node/localapi). A tensor's storage is
ordinary heap memory, so the first time a large storage is used twice
(DDP's gradient buckets, a benchmark's buffer) it is moved, in place:

1. ``storage._share_fd_cpu_()`` (what ``Tensor.share_memory_()`` does)
   moves the storage's bytes into a page-aligned shared mapping of its own,
   in place: every tensor and view of the storage, including those held by
   C++ (DDP's reducer), sees the new memory;
2. that mapping is replaced, at the same address (``MAP_FIXED``), by a
   mapping of a sealed memfd holding the same bytes, and the memfd is
   registered with the agent. PyTorch still owns the address range and
   unmaps it when the storage dies.

Both copies happen once per storage. From then on an operation names the
tensor by (region, byte offset): the agent's ring sends from and reduces
into the rank's memory directly.

A storage is recognised on later operations by its address and by a weak
reference to it (PyTorch's ``StorageWeakRef``, as torch.multiprocessing
uses): the reference pins the storage object's own memory (not its data),
so a live storage whose object is at the same place is the one that was
moved, and once the storage died the reference says so. This costs no
system call per operation. Where PyTorch has no weak references to
storages, the check is the storage's size and PyTorch's descriptor of it
(the inode must be the one seen when it was moved, which tells a live
storage from a new one at a reused address): one ``fstat`` per operation.
Storages that died are found by the same check at every adoption and
every ``SWEEP_EVERY`` operations, and their regions unregistered.

Not moved (the caller copies through a staging segment instead): tensors
under ``min_bytes``, memory PyTorch's allocator does not own (numpy arrays,
buffers, pinned memory), tensors that are a small view of a larger storage,
storages the user already shared (torch.multiprocessing owns those),
storages seen for the first time (most are temporaries), and storages that
/dev/shm has no room for. A storage that was moved must not be sent to
another process with torch.multiprocessing afterwards (that process would
map PyTorch's emptied file, not the segment).
"""

import ctypes
import fcntl
import mmap
import os
import threading

try:
    from torch.multiprocessing.reductions import StorageWeakRef as _StorageWeakRef
except ImportError:  # pragma: no cover (every PyTorch this package supports has it)
    _StorageWeakRef = None

PAGE = mmap.PAGESIZE
SWEEP_EVERY = 64
_MAP_FIXED = 0x10
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


def _storage_getter(cls):
    """How to get a cls tensor's untyped storage in this PyTorch."""
    if hasattr(cls, "untyped_storage"):
        return cls.untyped_storage
    if hasattr(cls, "_storage"):
        return cls._storage  # PyTorch 1.13: without a TypedStorage made on the way

    def legacy(t):
        s = t.storage()
        return s.untyped() if hasattr(s, "untyped") else s._storage
    return legacy


_STORAGE_GETTERS = {}  # tensor type -> its _storage_getter (looked up once)


def _untyped(t):
    get = _STORAGE_GETTERS.get(type(t))
    if get is None:
        get = _STORAGE_GETTERS[type(t)] = _storage_getter(type(t))
    return get(t)


def _shared_fd(s):
    """PyTorch's descriptor of a shared storage, or -1 (never moves it)."""
    try:
        if not s.is_shared():
            return -1
        f = getattr(s, "_get_shared_fd", None)
        return f() if f is not None else s._share_fd_cpu_()[0]
    except (RuntimeError, AttributeError, TypeError):
        return -1


def _owned_by_torch(t, s):
    """Whether s is memory of PyTorch's own CPU allocator (resizable), not
    a numpy array's or a buffer's (torch.from_numpy, frombuffer), which must
    stay where they are, nor pinned memory."""
    try:
        if t.is_pinned():
            return False
    except RuntimeError:
        pass
    f = getattr(s, "resizable", None)
    if f is not None:
        return bool(f())
    # PyTorch 1.13 has no resizable(): resizing to the same size raises on
    # storages that are not resizable, and reallocates (one more copy, once)
    # the others, in place.
    try:
        s.resize_(s.nbytes())
    except RuntimeError:
        return False
    return True


def _ident(fd):
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _mapping_at(addr):
    """(start, end, path) of this process's mapping that holds addr."""
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            if lo <= addr < hi:
                return lo, hi, parts[5].strip() if len(parts) > 5 else ""
    return None


def _weak_ref(s):
    """(weak reference to storage s, the address it names), or None where
    PyTorch cannot make one."""
    if _StorageWeakRef is None:
        return None
    try:
        w = _StorageWeakRef(s)
        w.expired()  # the check of every operation works here
        return w, w.cdata
    except (RuntimeError, AttributeError, TypeError):
        return None


class _Adopted:
    __slots__ = ("rid", "base", "size", "fd", "ident", "weak", "cdata")

    def __init__(self, rid, base, size, fd, ident, weak=None):
        self.rid, self.base, self.size, self.fd, self.ident = rid, base, size, fd, ident
        self.weak, self.cdata = weak if weak is not None else (None, None)

    def same(self, s, size):
        """Whether storage s (of size bytes, at this entry's address) is the
        storage that was moved."""
        if self.weak is not None:
            # The weak reference keeps the moved storage's object where it
            # is: no other live storage can be at that address.
            return s._cdata == self.cdata and self.size == size and not self.weak.expired()
        return self.size == size and _shared_fd(s) == self.fd and _ident(self.fd) == self.ident

    def dead(self):
        """Whether the moved storage died."""
        if self.weak is not None:
            return self.weak.expired()
        return _ident(self.fd) != self.ident


class ZeroCopy:
    """The storages of one connection that live in agent-mapped segments.
    Safe to call from several threads (DDP's autograd thread and the
    script's own)."""

    def __init__(self, conn, min_bytes=256 << 10, max_regions=256, shm_dir="/dev/shm"):
        self._conn = conn
        self._lock = threading.RLock()
        self.min_bytes = min_bytes
        self.max_regions = max_regions
        self._shm_dir = shm_dir
        self._by_base = {}  # storage address -> _Adopted
        self._seen = {}  # storage address -> size, storages seen once (bounded)
        self._ops = 0
        self.adopted = 0  # storages moved so far (tests and benchmarks read it)
        # Recognise moved storages by weak reference (False: by descriptor
        # and inode, as where PyTorch has no weak references; tests).
        self.weak_refs = _StorageWeakRef is not None
        self.disabled = None  # why adoption stopped, if it did

    def regions(self):
        return len(self._by_base)

    def ref(self, t):
        """(region id, byte offset) of contiguous CPU tensor t when its
        storage lives in a segment (moving it there when it qualifies), else
        None."""
        with self._lock:
            return self._ref(t)

    def _ref(self, t):
        self._ops += 1
        if self._ops % SWEEP_EVERY == 0:
            self.sweep()
        nbytes = t.numel() * t.element_size()
        if nbytes < self.min_bytes or t.is_cuda:  # (the caller passes CPU and CUDA tensors only)
            return None
        s = _untyped(t)
        base, size = s.data_ptr(), s.nbytes()
        e = self._by_base.get(base)
        if e is not None:
            if e.same(s, size):
                return e.rid, t.data_ptr() - base
            self._drop(base)
        if self.disabled is not None or s.is_shared() or size > 2 * nbytes:
            return None
        if self._seen.pop(base, None) != size:
            if len(self._seen) >= 4 * self.max_regions:
                self._seen.pop(next(iter(self._seen)))
            self._seen[base] = size
            return None
        self.sweep()
        if len(self._by_base) >= self.max_regions or not _owned_by_torch(t, s):
            return None
        e = self._adopt(s, size)
        if e is None:
            return None
        return e.rid, t.data_ptr() - e.base

    def _adopt(self, s, size):
        try:
            st = os.statvfs(self._shm_dir)
            if st.f_bavail * st.f_frsize < size + (64 << 20):
                return None  # PyTorch's shared copy would not fit
        except OSError:
            return None
        fd, _ = s._share_fd_cpu_()
        base = s.data_ptr()
        length = (size + PAGE - 1) // PAGE * PAGE
        m = _mapping_at(base)
        # The storage must own its mapping, whole pages of it, alone.
        if m is None or m[0] != base or m[1] != base + length or "torch_" not in m[2]:
            self.disabled = f"PyTorch's shared storage is not a mapping of its own ({m})"
            return None
        mfd = os.memfd_create("gpumesh", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(mfd, length)
            fcntl.fcntl(mfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            src = memoryview((ctypes.c_char * size).from_address(base)).cast("B")
            off = 0
            while off < size:
                off += os.pwrite(mfd, src[off:], off)
            del src
            try:
                rid = self._conn.register(mfd, length)
            except RuntimeError as e:
                # Refused (the agent's limit on regions, ...): this and later
                # tensors are staged; a broken connection fails the
                # operation itself.
                self.disabled = f"the agent refused a segment: {e}"
                return None
            got = _libc.mmap(base, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED | _MAP_FIXED, mfd, 0)
            if got != base:
                err = ctypes.get_errno()
                self._conn.unregister(rid)
                # MAP_FIXED fails before it unmaps anything: the storage is
                # still PyTorch's shared mapping.
                self.disabled = f"mmap over the storage failed: {os.strerror(err)}"
                return None
        finally:
            os.close(mfd)
        # PyTorch's file is no longer mapped: give its pages back.
        _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, 0, size)
        e = _Adopted(rid, base, size, fd, _ident(fd), _weak_ref(s) if self.weak_refs else None)
        self._by_base[base] = e
        self.adopted += 1
        return e

    def sweep(self):
        """Unregisters the regions of storages that died."""
        with self._lock:
            for base, e in list(self._by_base.items()):
                if e.dead():
                    self._drop(base)

    def _drop(self, base):
        e = self._by_base.pop(base)
        self._conn.unregister(e.rid)

    def close(self):
        with self._lock:
            self._by_base.clear()
            self._seen.clear()
