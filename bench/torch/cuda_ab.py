"""CUDA tensors through the gpumesh backend (CUDA IPC: the agent works in the
ranks' device memory), through it staged via host memory
(GPUMESH_CUDA_IPC=0) and through Gloo, interleaved in the same processes.
Ranks use GPU LOCAL_RANK mod the GPU count (2 ranks share the GPU of a
1-GPU machine). Run as a gpumesh exec job; rank 0 prints JSON lines:

1. DDP steps of the issue's model (Linear 4096x4096 x6, ~100M float32
   parameters, batch 2 per rank) on the GPU, one DDP per backend, steps
   alternating (order flipped every step); plus "none", the gpumesh model
   under no_sync() (no communication). Each step ends with a device
   synchronize. One line per backend: median step time and steps/s.
2. dist.all_reduce busbw (float32, sum) of CUDA tensors per size, the
   backends taking turns, each timed up to a device synchronize.
"""

import argparse
import contextlib
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import gpumesh.torch  # noqa: F401

p = argparse.ArgumentParser()
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--sizes-mib", default="1,4,16,64,256")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--staged-ddp", action="store_true", help="also a DDP through the staged path")
args = p.parse_args()

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
torch.cuda.set_device(dev)
os.environ["GPUMESH_CUDA_IPC"] = "0"
groups = {"gpumesh": dist.distributed_c10d._get_default_group(), "gpumesh-staged": dist.new_group(backend="gpumesh"),
          "gloo": dist.new_group(backend="gloo")}
del os.environ["GPUMESH_CUDA_IPC"]


def emit(d):
    if rank == 0:
        print(json.dumps(d), flush=True)


runs = {}
for name in ["gpumesh", "gloo"] + (["gpumesh-staged"] if args.staged_ddp else []):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)]).to(dev)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev], process_group=groups[name])
    runs[name] = (groups[name], ddp, torch.optim.SGD(ddp.parameters(), lr=1e-4), contextlib.nullcontext)
pg, ddp, opt, _ = runs["gpumesh"]
runs["none"] = (pg, ddp, opt, ddp.no_sync)
x = torch.randn(2, 4096, device=dev)
times = {name: [] for name in runs}
order = list(runs)
for i in range(args.warmup + args.steps):
    for name in order:
        pg, ddp, opt, ctx = runs[name]
        dist.barrier(group=pg)
        torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        opt.zero_grad()
        with ctx():
            ddp(x).square().mean().backward()
        opt.step()
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times[name].append(dt)
    order.reverse()
for name, ts in times.items():
    med = statistics.median(ts)
    emit({"bench": "ddp_cuda", "backend": name, "world": n, "step_s": med, "steps_per_s": 1 / med,
          "steps_s": [round(t, 4) for t in ts]})
del runs, ddp, opt, pg
torch.cuda.empty_cache()

for mib in [int(s) for s in args.sizes_mib.split(",")]:
    xs = {name: torch.ones(mib * (1 << 20) // 4, device=dev) for name in groups}
    ts = {name: [] for name in groups}
    for i in range(2 + args.iters):
        for name, g in groups.items():
            dist.barrier(group=g)
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            dist.all_reduce(xs[name], group=g)
            torch.cuda.synchronize(dev)
            if i >= 2:
                ts[name].append(time.perf_counter() - t0)
    for name, t in ts.items():
        med = statistics.median(t)
        alg = mib * (1 << 20) / med / 1e9
        emit({"bench": "allreduce_cuda", "backend": name, "ranks": n, "size_mib": mib, "time_s": med,
              "algbw_gbps": alg, "busbw_gbps": alg * 2 * (n - 1) / n})
    del xs
st = groups["gpumesh"].cuda_stats()
emit({"bench": "cuda_ipc_stats", **st})
dist.destroy_process_group()
