"""DDP step time with the gpumesh backend and with Gloo, interleaved in the
same processes (the issue's benchmark model: Linear 4096x4096 x6, batch 2
per rank, one thread per rank). Run as a gpumesh exec job: the default group
is gpumesh, a second group of the same ranks is Gloo, and each model is a
DDP over one of them. A third entry, "none", is the gpumesh model's step
under DDP's no_sync() (no communication at all): the same computation in
the same processes, so step(backend) - step(none) is the communication a
step exposes, measured under the same load. Steps alternate between the
three (the order flips every step), so a shared machine's changing load
falls on all alike. Rank 0 prints one JSON line per entry: the median step
time of the timed steps.

    gpumesh job run (ranks: 1 or 2) ... ddp_ab.py --steps 8
"""

import argparse
import contextlib
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import gpumesh.torch  # noqa: F401

p = argparse.ArgumentParser()
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--bucket-view", action="store_true",
               help="DDP(gradient_as_bucket_view=True): gradients are views of the buckets, so DDP copies nothing")
args = p.parse_args()
# With bucket views the gradients must be zeroed in place: set_to_none (PyTorch 2.x's default)
# makes autograd allocate new gradients, which DDP then copies into its buckets.
zero_kw = {"set_to_none": False} if args.bucket_view else {}

torch.set_num_threads(1)
dist.init_process_group("gpumesh")
rank, world = dist.get_rank(), dist.get_world_size()
groups = {"gpumesh": dist.distributed_c10d._get_default_group(), "gloo": dist.new_group(backend="gloo")}
runs = {}
for name, pg in groups.items():
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)])
    ddp = nn.parallel.DistributedDataParallel(model, process_group=pg, gradient_as_bucket_view=args.bucket_view)
    runs[name] = (pg, ddp, torch.optim.SGD(ddp.parameters(), lr=1e-4), contextlib.nullcontext)
pg, ddp, opt, _ = runs["gpumesh"]
runs["none"] = (pg, ddp, opt, ddp.no_sync)
x = torch.randn(2, 4096)
times = {name: [] for name in runs}
order = list(runs)
for i in range(args.warmup + args.steps):
    for name in order:
        pg, ddp, opt, ctx = runs[name]
        dist.barrier(group=pg)
        t0 = time.perf_counter()
        opt.zero_grad(**zero_kw)
        with ctx():
            ddp(x).square().mean().backward()
        opt.step()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times[name].append(dt)
    order.reverse()
if rank == 0:
    for name, ts in times.items():
        print(json.dumps({"bench": "ddp_step", "backend": name, "world": world, "step_s": statistics.median(ts),
                          "steps_s": ts}), flush=True)
dist.destroy_process_group()
