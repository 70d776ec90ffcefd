"""DDP step time of a ~100M-parameter model with a tiny batch (the issue's
benchmark model): Linear 4096x4096 x6, batch 2 per rank, one thread per
rank. Rank 0 prints one JSON line: the median step time of the timed steps.

    torchrun --standalone --nproc_per_node 2 --redirects 1 --tee 1 ddp_step.py --backend gloo
    (as a gpumesh exec job)                                           --backend gpumesh
"""

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

p = argparse.ArgumentParser()
p.add_argument("--backend", default="gloo")
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--steps", type=int, default=5)
args = p.parse_args()
if args.backend == "gpumesh":
    import gpumesh.torch  # noqa: F401

torch.set_num_threads(1)
dist.init_process_group(args.backend)
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)])
ddp = nn.parallel.DistributedDataParallel(model)
opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
x = torch.randn(2, 4096)
times = []
for i in range(args.warmup + args.steps):
    dist.barrier()
    t0 = time.perf_counter()
    opt.zero_grad()
    ddp(x).square().mean().backward()
    opt.step()
    dt = time.perf_counter() - t0
    if i >= args.warmup:
        times.append(dt)
if rank == 0:
    print(json.dumps({"bench": "ddp_step", "backend": args.backend, "world": world,
                      "params": sum(q.numel() for q in model.parameters()),
                      "step_s": statistics.median(times), "steps_s": times}), flush=True)
dist.destroy_process_group()
