"""The CUDA IPC path's bookkeeping without a GPU (stand-ins for the driver,
the connection and torch.cuda): an allocation is registered once and found
again; a block freed and allocated again at the same address (a new
handle) is registered again and the old region dropped; the least recently
used allocations are dropped beyond MAX_REGIONS; the stream-order event is
registered once per GPU and recorded before every operation; a handle the
agent cannot open stages that operation only. Prints "CUDAIPC CACHE OK"."""

import ctypes

from gpumesh import _client, _cudaipc


class Driver:
    def __init__(self):
        self.handles = {}

    def uuid(self, ordinal):
        return bytes([ordinal]) * 16

    def allocation(self, ordinal, ptr):
        base = ptr & ~0xFFFF
        return base, 0x10000, self.handles.get(base, b"a" * 64)


class Conn:
    def __init__(self):
        self.next, self.registered, self.dropped, self.refuse = 1, [], [], set()

    def register_cuda(self, what, size, uuid, handle):
        if handle in self.refuse:
            return None, "does not open", _client.STATUS_BAD_REQUEST
        rid = self.next
        self.next += 1
        self.registered.append((what, rid, size, uuid, handle))
        return rid, None, _client.STATUS_OK

    def unregister(self, rid):
        self.dropped.append(rid)


class Event:
    recorded = 0

    def __init__(self, **kw):
        assert kw.get("interprocess"), kw

    def record(self, stream):
        Event.recorded += 1

    def ipc_handle(self):
        return b"e" * 64


class Torch:
    class cuda:
        Event = Event

        @staticmethod
        def current_stream(dev):
            return None

    @staticmethod
    def device(kind, index):
        return (kind, index)


class Dev:
    index = 0


class T:
    device = Dev()

    def __init__(self, ptr):
        self.ptr = ptr

    def data_ptr(self):
        return self.ptr


drv, conn = Driver(), Conn()
ipc = _cudaipc.CudaIPC(conn, driver=drv, torch=Torch)
r1 = ipc.refs([T(0x10000 + 256)])
r2 = ipc.refs([T(0x10000 + 512), T(0x20000)])
assert r1 == [(1, 256)], r1  # id 2 is the event
assert r2 == [(1, 512), (3, 0)], r2
assert ipc.stats["registered"] == 2 and ipc.stats["hits"] == 1, ipc.stats
assert [w for w, *_ in conn.registered].count(_client.CUDA_EVENT) == 1
assert Event.recorded == 1 + 2, Event.recorded  # once to create, once per operation
drv.handles[0x10000] = b"b" * 64  # freed and allocated again at the same address
r3 = ipc.refs([T(0x10000)])
assert r3 == [(4, 0)] and conn.dropped == [1] and ipc.stats["replaced"] == 1, (r3, conn.dropped, ipc.stats)
for k in range(_cudaipc.MAX_REGIONS + 5):
    ipc.refs([T(0x100000 + k * 0x10000)])
assert ipc.stats["evicted"] == 7 and len(ipc._regions) == _cudaipc.MAX_REGIONS, ipc.stats
conn.refuse.add(b"c" * 64)
drv.handles[0x9990000] = b"c" * 64
assert ipc.refs([T(0x9990000)]) is None and ipc.off is None, ipc.stats
assert ipc.refs([T(0x100000)]) is not None

# The ctypes side of Driver against a stand-in libcuda: handles and UUIDs
# are binary and contain zero bytes; every byte must reach the agent (a
# c_char array cut them at the first zero, so no handle opened on a GPU).
class FakeLib:
    def __init__(self):
        self.handle = bytes([7, 0, 0, 9]) + bytes(range(60))
        self.uuid = bytes([0xDF, 0, 0x59, 0]) + bytes(range(12))

    def _fill(self, p, data):
        ctypes.memmove(ctypes.addressof(p._obj), data, len(data))

    def __getattr__(self, name):
        def f(*a):
            if name == "cuIpcGetMemHandle":
                self._fill(a[0], self.handle)
            elif name == "cuDeviceGetUuid":
                self._fill(a[0], self.uuid)
            elif name == "cuMemGetAddressRange_v2":
                a[0]._obj.value, a[1]._obj.value = 0x7000, 1 << 21
            elif name == "cuCtxGetCurrent":
                a[0]._obj.value = 1
            elif name == "cuCtxGetDevice":
                a[0]._obj.value = 0
            return 0
        setattr(self, name, f)
        return f


lib = FakeLib()
real = _cudaipc.Driver(lib=lib)
base, size, handle = real.allocation(0, 0x7100)
assert (base, size) == (0x7000, 1 << 21), (base, size)
assert handle == lib.handle, handle
assert real.uuid(0) == lib.uuid, real.uuid(0)
print("CUDAIPC CACHE OK", ipc.stats, flush=True)
