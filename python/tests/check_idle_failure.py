"""A peer dies while the group is idle (run with 2 ranks): rank 1 exits
without destroying its group (as a killed process would); rank 0, issuing
nothing, learns it from its agent at once (the group is marked failed), and
its next collective raises instead of waiting for the timeout. Prints "IDLE
FAILURE OK" on rank 0."""

import os
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

dist.init_process_group("gpumesh")
rank = dist.get_rank()
pg = dist.distributed_c10d._get_default_group()
x = torch.ones(1000)
dist.all_reduce(x)
assert x.tolist() == [2.0] * 1000, x[:3]
if rank == 1:
    os._exit(0)  # no destroy, no BYE: like a process that was killed
deadline = time.monotonic() + 20
while pg._conn._broken is None:
    if time.monotonic() > deadline:
        raise SystemExit("rank 0 was not told within 20 s that rank 1 is gone")
    time.sleep(0.05)
print("told:", pg._conn._broken, flush=True)
t0 = time.monotonic()
try:
    dist.all_reduce(x)
except RuntimeError as e:
    print("raised:", e, flush=True)
    if "ended without destroying" not in str(e) or time.monotonic() - t0 > 5:
        raise SystemExit(f"the next all_reduce raised the wrong error or late: {e}")
else:
    raise SystemExit("the next all_reduce after the peer died did not raise")
print("IDLE FAILURE OK", flush=True)
os._exit(0)
