"""The rank's own cost of a dist.all_reduce through the gpumesh backend,
without an agent: the connection is replaced by a stand-in that answers
every operation at once, so what is timed is PyTorch's dispatch, the
backend's Python (argument checks, Work, staging or the zero-copy lookup,
completion) and nothing else. One process, no cluster:

    PYTHONPATH=python /usr/bin/python3 bench/torch/client_overhead.py

prints the process's CPU time per operation (microseconds; CPU time rather
than wall time, so that a loaded machine does not change it) at 4 KiB
(staged) and 16 MiB (zero copy after its second use), the median of 5
runs of n operations.
"""

import mmap
import os
import statistics
import time

import torch
import torch.distributed as dist

from gpumesh import _client


class _Segment:
    def __init__(self, size):
        self.size, self.id, self.mm = size, 1, mmap.mmap(-1, size)


class _InstantAgent:
    """Stands in for _client.Connection: answers every operation at once."""

    def __init__(self, **kw):
        self.timeout = kw["timeout"]
        self._free, self._n = {}, 0

    def acquire(self, nbytes):
        size = 1 << 16
        while size < nbytes:
            size <<= 1
        free = self._free.get(size)
        return free.pop() if free else _Segment(size)

    def release(self, seg):
        self._free.setdefault(seg.size, []).append(seg)

    def register(self, fd, size):
        self._n += 1
        return self._n

    def unregister(self, rid):
        pass

    def submit(self, kind, dtype, red, peer, tag, a, b, on_done, what, before_send=None):
        on_done(None)

    def wait_for(self, event, timeout):
        return event.is_set()

    def read_in_background(self):
        pass

    def close(self):
        pass


_client.Connection = _InstantAgent
import gpumesh.torch  # noqa: E402,F401  (after the stand-in is in place)

torch.set_num_threads(1)
os.environ.update(GPUMESH_LOCAL_SOCKET="-", GPUMESH_LOCAL_SECRET="-", GPUMESH_JOB_ID="j", GPUMESH_GENERATION="1",
                  RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="0")
dist.init_process_group("gpumesh", store=dist.HashStore(), rank=0, world_size=1)
for kib, n in ((4, 5000), (16384, 1000)):
    x = torch.ones(kib * 256)
    for _ in range(20):
        dist.all_reduce(x)
    runs = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(n):
            dist.all_reduce(x)
        runs.append((time.process_time() - t0) / n * 1e6)
    print(f"{kib} KiB: {statistics.median(runs):.1f} us of CPU per dist.all_reduce, rank side only "
          f"(runs {' '.join(f'{r:.1f}' for r in runs)})", flush=True)
dist.destroy_process_group()
