"""dist.all_reduce bus bandwidth (float32, sum) through the gpumesh backend
(zero copy), through it with every tensor staged (GPUMESH_ZERO_COPY=0),
through it with zero copy but answers handed over by a reader thread
(GPUMESH_CALLER_READS=0) and through Gloo, interleaved in the same
processes: for each size, they take turns, one timed all_reduce each per
round (after a barrier on its group), so that a shared machine's changing
load falls on all of them. --backends picks some of them. Run as a gpumesh
exec job; rank 0 prints one JSON line per backend and size: the median of
--iters, and the CPU time per operation (bench/torch/proccpu.py: every
rank's process, less the cost of rank 0's own readings, and the agent's
when AGENT_PID names it), summed over the timed operations (rank 0 reads
the other ranks' /proc, so all ranks must be on this machine)."""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401
from proccpu import cpu_ns

ALL = "gpumesh,gpumesh-staged,gpumesh-thread,gloo"
p = argparse.ArgumentParser()
p.add_argument("--sizes-mib", default="16,64,256")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--backends", default=ALL, help=f"some of {ALL}")
args = p.parse_args()
want = args.backends.split(",")

torch.set_num_threads(1)
dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
groups = {"gpumesh": None}
os.environ["GPUMESH_ZERO_COPY"] = "0"
staged = dist.new_group(backend="gpumesh")
del os.environ["GPUMESH_ZERO_COPY"]
# Zero copy, but a reader thread hands every answer to the waiting caller
# (GPUMESH_CALLER_READS=0) instead of the caller reading it itself.
os.environ["GPUMESH_CALLER_READS"] = "0"
thread = dist.new_group(backend="gpumesh")
del os.environ["GPUMESH_CALLER_READS"]
gloo = dist.new_group(backend="gloo")
groups.update({"gpumesh-staged": staged, "gpumesh-thread": thread, "gloo": gloo})
groups = {k: v for k, v in groups.items() if k in want}
pids = [None] * n
dist.all_gather_object(pids, os.getpid(), group=gloo)
agent = [int(os.environ["AGENT_PID"])] if os.environ.get("AGENT_PID") else []
# Reading /proc costs rank 0 CPU time that falls partly inside the interval
# it measures: about one reading's worth, subtracted (the median of a few).
own = 0
if rank == 0:
    gaps = []
    for _ in range(7):
        a = cpu_ns(pids) + cpu_ns(agent)
        gaps.append(cpu_ns(pids) + cpu_ns(agent) - a)
    own = statistics.median(gaps)
for mib in [int(s) for s in args.sizes_mib.split(",")]:
    xs = {name: torch.ones(mib * (1 << 20) // 4) for name in groups}
    times = {name: [] for name in groups}
    cpu = {name: [0, 0] for name in groups}  # ranks, agent (ns)
    for i in range(args.warmup + args.iters):
        for name, pg in groups.items():
            dist.barrier(group=pg)
            if rank == 0:
                c0, a0 = cpu_ns(pids), cpu_ns(agent)
            t0 = time.perf_counter()
            dist.all_reduce(xs[name], group=pg)
            t1 = time.perf_counter()
            if i >= args.warmup:
                times[name].append(t1 - t0)
                if rank == 0:
                    cpu[name][0] += cpu_ns(pids) - c0 - own
                    cpu[name][1] += cpu_ns(agent) - a0
    if rank == 0:
        for name, ts in times.items():
            med = statistics.median(ts)
            alg = mib * (1 << 20) / med / 1e9
            row = {"bench": "allreduce", "backend": name, "ranks": n, "size_mib": mib, "time_s": med,
                   "algbw_gbps": alg, "busbw_gbps": alg * 2 * (n - 1) / n,
                   "cpu_ranks_us": cpu[name][0] / 1e3 / args.iters}
            if agent:
                row["cpu_agent_us"] = cpu[name][1] / 1e3 / args.iters
            print(json.dumps(row), flush=True)
    del xs
dist.destroy_process_group()
