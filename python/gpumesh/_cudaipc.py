"""CUDA tensors by CUDA IPC handle: the agent works in the rank's device
memory, nothing goes through host memory.

For a CUDA tensor the rank asks the driver (libcuda, through ctypes) for
the allocation that holds it (``cuMemGetAddressRange``: PyTorch's caching
allocator carves tensors out of larger ``cudaMalloc`` blocks) and for that
allocation's IPC handle (``cuIpcGetMemHandle``), and registers the handle
with the agent once (REGISTER_CUDA); the agent opens it once
(``cuIpcOpenMemHandle``) and keeps it open. Operations then name the tensor
by (region, byte offset from the allocation's base), as for shared memory.
The handle is asked for again at every operation (a few microseconds) and
compared with the registered one: a block that PyTorch freed
(``empty_cache``) and the driver handed out again at the same address has a
new handle, so a stale mapping is never used; the old region is
unregistered then. At most ``MAX_REGIONS`` allocations stay registered (the
least recently used go first).

PyTorch's own ``storage._share_cuda_()`` is not used: it hands the storage
to the reference counting of torch.multiprocessing, whose receivers must
release it, so a storage freed later would wait for a release the agent
never sends.

Stream order: before an operation is sent, an interprocess CUDA event (one
per GPU, registered with the agent once) is recorded on the current stream;
the agent waits for it before it touches the memory. The agent answers only
once its device work is finished, so the result may be read on any stream
when the operation's Work completes.

Falls back to staging through host memory (and says why once, on stderr)
when the agent has no CUDA, libcuda cannot be loaded, or an allocation has
no IPC handle (``expandable_segments``). ``GPUMESH_CUDA_IPC=0`` turns the
path off (every CUDA tensor staged).
"""

import collections
import ctypes
import sys
import threading

from gpumesh import _client

MAX_REGIONS = 256
_CU_IPC_HANDLE_SIZE = 64


# Byte arrays, not c_char: ctypes reads a c_char array field as a
# NUL-terminated string, which would cut a handle at its first zero byte.
class _IPCHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_ubyte * _CU_IPC_HANDLE_SIZE)]


class _UUID(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_ubyte * 16)]


class DriverError(RuntimeError):
    pass


class Driver:
    """The few CUDA driver calls the path needs."""

    def __init__(self, lib=None):
        self._lib = lib if lib is not None else ctypes.CDLL("libcuda.so.1")
        L = self._lib
        self._range = L.cuMemGetAddressRange_v2
        self._range.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_size_t), ctypes.c_uint64]
        self._ipc = L.cuIpcGetMemHandle
        self._ipc.argtypes = [ctypes.POINTER(_IPCHandle), ctypes.c_uint64]
        self._uuid = L.cuDeviceGetUuid
        self._uuid.argtypes = [ctypes.POINTER(_UUID), ctypes.c_int]
        for f in (self._range, self._ipc, self._uuid, L.cuDeviceGet, L.cuCtxGetCurrent, L.cuCtxSetCurrent,
                  L.cuCtxGetDevice, L.cuDevicePrimaryCtxRetain):
            f.restype = ctypes.c_int
        self._primary = {}

    def _check(self, r, call):
        if r != 0:
            name = ctypes.c_char_p()
            try:
                self._lib.cuGetErrorName(r, ctypes.byref(name))
            except Exception:
                pass
            raise DriverError(f"{call} failed: {(name.value or b'').decode() or r}")

    def uuid(self, ordinal):
        dev = ctypes.c_int()
        self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        u = _UUID()
        self._check(self._uuid(ctypes.byref(u), dev), "cuDeviceGetUuid")
        return bytes(u.bytes)

    def allocation(self, ordinal, ptr):
        """(base, size, handle) of the allocation that holds device address
        ptr, with ordinal's primary context current (restored after)."""
        cur = ctypes.c_void_p()
        self._check(self._lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        switch = True
        if cur.value:
            d = ctypes.c_int()
            switch = self._lib.cuCtxGetDevice(ctypes.byref(d)) != 0 or d.value != ordinal
        if switch:
            ctx = self._primary.get(ordinal)
            if ctx is None:
                dev = ctypes.c_int()
                self._check(self._lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
                ctx = ctypes.c_void_p()
                self._check(self._lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
                self._primary[ordinal] = ctx
            self._check(self._lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        try:
            base, size = ctypes.c_uint64(), ctypes.c_size_t()
            self._check(self._range(ctypes.byref(base), ctypes.byref(size), ptr), "cuMemGetAddressRange")
            h = _IPCHandle()
            self._check(self._ipc(ctypes.byref(h), base.value), "cuIpcGetMemHandle")
            return base.value, size.value, bytes(h.reserved)
        finally:
            if switch:
                self._lib.cuCtxSetCurrent(cur)


class _Entry:
    __slots__ = ("size", "handle", "rid")

    def __init__(self, size, handle, rid):
        self.size, self.handle, self.rid = size, handle, rid


class CudaIPC:
    """One connection's registered allocations and events."""

    def __init__(self, conn, driver=None, torch=None):
        self._conn = conn
        self._driver = driver
        self._torch = torch
        self._lock = threading.Lock()
        self._off = None  # why the path is off (said once)
        self._regions = collections.OrderedDict()  # (ordinal, base) -> _Entry
        self._events = {}  # ordinal -> torch.cuda.Event registered with the agent
        self._uuids = {}
        self.stats = {"hits": 0, "registered": 0, "replaced": 0, "evicted": 0, "ops": 0, "staged": 0}

    @property
    def off(self):
        return self._off

    def _disable(self, why):
        if self._off is None:
            self._off = why
            print(f"gpumesh: CUDA tensors are staged through host memory: {why}", file=sys.stderr, flush=True)

    def _drv(self):
        if self._driver is None:
            try:
                self._driver = Driver()
            except (OSError, AttributeError) as e:
                self._disable(f"the CUDA driver library cannot be used from Python ({e})")
                return None
        return self._driver

    def _uuid(self, ordinal):
        u = self._uuids.get(ordinal)
        if u is None:
            u = self._uuids[ordinal] = self._drv().uuid(ordinal)
        return u

    def refs(self, tensors):
        """(region id, byte offset) for each tensor (all on one GPU), with
        the stream-order event recorded after the current stream's work; or
        None, and the caller stages them."""
        if self._off is not None:
            self.stats["staged"] += 1
            return None
        drv = self._drv()
        if drv is None:
            return None
        ordinal = tensors[0].device.index
        try:
            with self._lock:
                out = [self._ref(drv, ordinal, t) for t in tensors]
                if self._off is not None:
                    return None
                ev = self._event(ordinal)
            if ev is None:
                return None
            ev.record(self._torch.cuda.current_stream(tensors[0].device))
        except DriverError as e:
            # This tensor's memory has no IPC handle (expandable segments,
            # memory from another allocator): stage it.
            self.stats["staged"] += 1
            if "staged_reason" not in self.stats:
                self.stats["staged_reason"] = str(e)
                print(f"gpumesh: a CUDA tensor is staged through host memory: {e}", file=sys.stderr, flush=True)
            return None
        self.stats["ops"] += 1
        return out

    def _ref(self, drv, ordinal, t):
        ptr = t.data_ptr()
        base, size, handle = drv.allocation(ordinal, ptr)
        key = (ordinal, base)
        e = self._regions.get(key)
        if e is not None and e.size == size and e.handle == handle:
            self._regions.move_to_end(key)
            self.stats["hits"] += 1
            return (e.rid, ptr - base)
        if e is not None:
            # Freed and allocated again at the same address: a new handle.
            del self._regions[key]
            self._conn.unregister(e.rid)
            self.stats["replaced"] += 1
        rid, why, status = self._conn.register_cuda(_client.CUDA_MEMORY, size, self._uuid(ordinal), handle)
        if status == _client.STATUS_UNSUPPORTED:
            self._disable(f"the agent refused a CUDA IPC handle: {why}")
            return None
        if rid is None:
            raise DriverError(f"the agent could not open the tensor's CUDA IPC handle: {why}")
        self.stats["registered"] += 1
        self._regions[key] = _Entry(size, handle, rid)
        while len(self._regions) > MAX_REGIONS:
            _, old = self._regions.popitem(last=False)
            self._conn.unregister(old.rid)
            self.stats["evicted"] += 1
        return (rid, ptr - base)

    def _event(self, ordinal):
        ev = self._events.get(ordinal)
        if ev is not None:
            return ev
        torch = self._torch
        ev = torch.cuda.Event(enable_timing=False, blocking=False, interprocess=True)
        dev = torch.device("cuda", ordinal)
        ev.record(torch.cuda.current_stream(dev))
        rid, why, _ = self._conn.register_cuda(_client.CUDA_EVENT, 0, self._uuid(ordinal), ev.ipc_handle())
        if rid is None:
            self._disable(f"the agent refused a CUDA IPC event: {why}")
            return None
        self._events[ordinal] = ev
        return ev
