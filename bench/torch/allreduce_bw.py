"""dist.all_reduce bus bandwidth (float32, sum) through a backend, like the
built-in allreduce job measures it: a barrier, then one timed all_reduce,
median of --iters. Rank 0 prints one JSON line per size."""

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

p = argparse.ArgumentParser()
p.add_argument("--backend", default="gloo")
p.add_argument("--sizes-mib", default="16,64,256")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
args = p.parse_args()
if args.backend == "gpumesh":
    import gpumesh.torch  # noqa: F401

torch.set_num_threads(1)
dist.init_process_group(args.backend)
rank, n = dist.get_rank(), dist.get_world_size()
for mib in [int(s) for s in args.sizes_mib.split(",")]:
    x = torch.ones(mib * (1 << 20) // 4)
    times = []
    for i in range(args.warmup + args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(x)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    if rank == 0:
        alg = mib * (1 << 20) / med / 1e9
        print(json.dumps({"bench": "allreduce", "backend": args.backend, "ranks": n, "size_mib": mib,
                          "time_s": med, "algbw_gbps": alg, "busbw_gbps": alg * 2 * (n - 1) / n}), flush=True)
dist.destroy_process_group()
