"""A peer dies in the middle of an all_to_all_single (run with 3 ranks):
ranks 0 and 1 issue a large exchange, which cannot complete without rank
2's blocks, and say so through the rendezvous store; rank 2 then exits
without destroying its group (as a killed process would). Ranks 0 and 1
must raise an error that names the operation and rank 2 within the limit
(argv[1] seconds: the collective timeout and the way of the abort), not
hang. Prints "COMPOSED FAILURE OK" on ranks 0 and 1."""

import os
import sys
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
limit = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
# A small exchange first: every rank is attached and the links are up.
out = torch.empty(n * 4)
dist.all_to_all_single(out, torch.full((n * 4,), float(rank)))
assert out.tolist() == [float(p) for p in range(n) for _ in range(4)], out
count = 4 << 20  # elements per block: 16 MiB, many chunks in flight
inp = torch.full((n * count,), float(rank))
out = torch.empty(n * count)
store = dist.distributed_c10d._get_default_store()
if rank == 2:
    store.wait(["issued-0", "issued-1"])
    os._exit(0)  # no destroy, no BYE: like a process that was killed
t0 = time.monotonic()
work = dist.all_to_all_single(out, inp, async_op=True)
store.set(f"issued-{rank}", "1")
try:
    work.wait()
except RuntimeError as e:
    took = time.monotonic() - t0
    print(f"raised after {took:.1f} s: {e}", flush=True)
    if "all_to_all_single" not in str(e) or "rank 2" not in str(e) or took > limit:
        raise SystemExit(f"want an error naming all_to_all_single and rank 2 within {limit} s")
else:
    raise SystemExit("the exchange with a dead peer did not raise")
print("COMPOSED FAILURE OK", flush=True)
os._exit(0)
