"""The CUDA IPC path against an agent built without CUDA (no GPU needed):
a stand-in driver hands out an allocation, the agent answers that it has
no CUDA, the path turns itself off and says so once on stderr, later CUDA
operations are counted as staged, and the group keeps working. Prints
"CUDA FALLBACK OK"."""

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401
from gpumesh import _cudaipc


class FakeDriver:
    def uuid(self, ordinal):
        return bytes(range(16))

    def allocation(self, ordinal, ptr):
        return ptr & ~0xFFFFF, 1 << 20, b"h" * 64


class FakeTensor:
    class device:
        index = 0

    def data_ptr(self):
        return 0x7F0000001000


dist.init_process_group("gpumesh")
pg = dist.distributed_c10d._get_default_group()
ipc = _cudaipc.CudaIPC(pg._conn, driver=FakeDriver(), torch=torch)
assert ipc.refs([FakeTensor()]) is None
assert ipc.off is not None and "no CUDA" in ipc.off, ipc.off
assert ipc.refs([FakeTensor()]) is None
assert ipc.stats["staged"] == 1 and ipc.stats["registered"] == 0, ipc.stats
x = torch.ones(1000)
dist.all_reduce(x)
assert x.tolist() == [float(dist.get_world_size())] * 1000, x[:3]
dist.destroy_process_group()
print("CUDA FALLBACK OK", flush=True)
