"""Sharded checkpoints through the agent: two Gloo ranks each save their
own shard (shard=True) and get their own back."""

import sys

import torch
import torch.distributed as dist

from gpumesh import checkpoint as ckpt

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
mine = {"shard": torch.full((1000 + rank,), float(rank))}
ckpt.save(mine, 4, shard=True)
m = ckpt.latest()
assert m["step"] == 4 and m["world_size"] == world and [p["rank"] for p in m["parts"]] == list(range(world)), m
got, step = ckpt.load()
assert step == 4 and torch.equal(got["shard"], mine["shard"]), (rank, got["shard"][:3])
assert ckpt.last_load["part"] == rank, ckpt.last_load
# The flag tensor of preempt_requested() is one per process, and holds a
# reference of its own so that Gloo's worker never frees it (a worker that
# frees a tensor after the interpreter began to exit aborts the process).
assert not ckpt.preempt_requested()
flag = ckpt._flags["cpu"]
assert not ckpt.preempt_requested() and ckpt._flags["cpu"] is flag
assert sys.getrefcount(flag) >= 4, sys.getrefcount(flag)  # dict, name, argument, kept
dist.destroy_process_group()
print("shards ok", flush=True)
