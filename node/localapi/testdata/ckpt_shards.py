"""Sharded checkpoints through the agent: two ranks each save their own
shard (shard=True) and get their own back. Run with the process group's
backend as the argument (gloo, or gpumesh through the same agent)."""

import sys

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401
from gpumesh import checkpoint as ckpt

dist.init_process_group(sys.argv[1] if len(sys.argv) > 1 else "gloo")
rank, world = dist.get_rank(), dist.get_world_size()


# save() gathers the parts with tensors it keeps, never with
# all_gather_object (its pickled temporaries can be freed by a backend
# thread after the interpreter began to exit).
def refuse(*args, **kwargs):
    raise AssertionError("save() called all_gather_object")


gather_object = dist.all_gather_object
dist.all_gather_object = refuse
mine = {"shard": torch.full((1000 + rank,), float(rank))}
ckpt.save(mine, 4, shard=True)
ckpt.save(mine, 5, shard=True)  # the kept tensors again
dist.all_gather_object = gather_object
m = ckpt.latest()
assert m["step"] == 5 and m["world_size"] == world and [p["rank"] for p in m["parts"]] == list(range(world)), m
got, step = ckpt.load()
assert step == 5 and torch.equal(got["shard"], mine["shard"]), (rank, got["shard"][:3])
assert ckpt.last_load["part"] == rank, ckpt.last_load

# The gather gives what all_gather_object gives: the manifest's own parts,
# and parts of many chunks, of different counts, empty ones (null or [])
# and checksums with the high bit set.
cases = [m["parts"][rank],
         {"rank": rank, "size": (3 + 5 * rank) << 24, "crc32c": ["%08x" % (0xfffffff0 - i * 7919 * (rank + 1)) for i in range(3 + 5 * rank)]},
         {"rank": rank, "size": 0, "crc32c": None if rank == 0 else []},
         {"rank": rank, "size": 0, "crc32c": None}]
for part in cases:
    want = [None] * world
    gather_object(want, part)
    have = ckpt._gather_parts(dist, part, world)
    assert have == want, (have, want)

# The flag tensor of preempt_requested() is one per process, and holds a
# reference of its own so that Gloo's worker never frees it (a worker that
# frees a tensor after the interpreter began to exit aborts the process).
assert not ckpt.preempt_requested()
flag = ckpt._flags["cpu"]
assert not ckpt.preempt_requested() and ckpt._flags["cpu"] is flag
assert sys.getrefcount(flag) >= 4, sys.getrefcount(flag)  # dict, name, argument, kept
dist.destroy_process_group()
print("shards ok", flush=True)
