"""dist.all_reduce bus bandwidth (float32, sum) through the gpumesh backend
(zero copy), through it with every tensor staged (GPUMESH_ZERO_COPY=0),
through it with zero copy but answers handed over by a reader thread
(GPUMESH_CALLER_READS=0) and through Gloo, interleaved in the same
processes: for each size, the four take turns, one timed all_reduce each
per round (after a barrier on its group), so that a shared machine's
changing load falls on all of them. Run as a gpumesh exec job; rank 0
prints one JSON line per backend and size (the median of --iters)."""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

p = argparse.ArgumentParser()
p.add_argument("--sizes-mib", default="16,64,256")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
args = p.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
os.environ["GPUMESH_ZERO_COPY"] = "0"
groups = {"gpumesh": None, "gpumesh-staged": dist.new_group(backend="gpumesh"), "gloo": dist.new_group(backend="gloo")}
del os.environ["GPUMESH_ZERO_COPY"]
# Zero copy, but a reader thread hands every answer to the waiting caller
# (GPUMESH_CALLER_READS=0) instead of the caller reading it itself.
os.environ["GPUMESH_CALLER_READS"] = "0"
groups["gpumesh-thread"] = dist.new_group(backend="gpumesh")
del os.environ["GPUMESH_CALLER_READS"]
for mib in [int(s) for s in args.sizes_mib.split(",")]:
    xs = {name: torch.ones(mib * (1 << 20) // 4) for name in groups}
    times = {name: [] for name in groups}
    for i in range(args.warmup + args.iters):
        for name, pg in groups.items():
            dist.barrier(group=pg)
            t0 = time.perf_counter()
            dist.all_reduce(xs[name], group=pg)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    if rank == 0:
        for name, ts in times.items():
            med = statistics.median(ts)
            alg = mib * (1 << 20) / med / 1e9
            print(json.dumps({"bench": "allreduce", "backend": name, "ranks": n, "size_mib": mib, "time_s": med,
                              "algbw_gbps": alg, "busbw_gbps": alg * 2 * (n - 1) / n}), flush=True)
    del xs
dist.destroy_process_group()
