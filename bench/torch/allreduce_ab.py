"""dist.all_reduce bus bandwidth (float32, sum) through the gpumesh backend
(zero copy), through it with every tensor staged (GPUMESH_ZERO_COPY=0),
through it with zero copy but answers handed over by a reader thread
(GPUMESH_CALLER_READS=0) and through Gloo, interleaved in the same
processes: for each size, they take turns, one timed all_reduce each per
round (after a barrier on its group), so that a shared machine's changing
load falls on all of them. --backends picks some of them. Run as a gpumesh
exec job; rank 0 prints one JSON line per backend and size: the median of
--iters, and the CPU time per operation, summed over the timed operations:
the ranks' (each rank's whole process, every thread, on its own clock
around its own operation, summed over the ranks) and the agent's when
AGENT_PID names it (bench/torch/proccpu.py; rank 0 reads the agent's /proc
before and after its operation, so the agent must be on rank 0's machine).
Rank 0 takes its first reading while the other ranks wait in a second
barrier, on the Gloo group, which costs the agent nothing: no rank waits
inside the timed operation for a reading."""

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
agent = [int(os.environ["AGENT_PID"])] if os.environ.get("AGENT_PID") else []
for mib in [int(s) for s in args.sizes_mib.split(",")]:
    xs = {name: torch.ones(mib * (1 << 20) // 4) for name in groups}
    times = {name: [] for name in groups}
    cpu = {name: 0 for name in groups}  # this rank's process (ns)
    agent_cpu = {name: 0 for name in groups}  # the agent's, read by rank 0 (ns)
    for i in range(args.warmup + args.iters):
        for name, pg in groups.items():
            dist.barrier(group=pg)
            if rank == 0:
                a0 = cpu_ns(agent)
            dist.barrier(group=gloo)  # the others wait here for rank 0's reading
            c0 = time.process_time_ns()
            t0 = time.perf_counter()
            dist.all_reduce(xs[name], group=pg)
            t1 = time.perf_counter()
            c1 = time.process_time_ns()
            if i >= args.warmup:
                times[name].append(t1 - t0)
                cpu[name] += c1 - c0
                if rank == 0:
                    agent_cpu[name] += cpu_ns(agent) - a0
    ranks_cpu = [None] * n
    dist.all_gather_object(ranks_cpu, cpu, group=gloo)
    if rank == 0:
        for name, ts in times.items():
            med = statistics.median(ts)
            alg = mib * (1 << 20) / med / 1e9
            row = {"bench": "allreduce", "backend": name, "ranks": n, "size_mib": mib, "time_s": med,
                   "algbw_gbps": alg, "busbw_gbps": alg * 2 * (n - 1) / n,
                   "cpu_ranks_us": sum(c[name] for c in ranks_cpu) / 1e3 / args.iters}
            if agent:
                row["cpu_agent_us"] = agent_cpu[name] / 1e3 / args.iters
            print(json.dumps(row), flush=True)
    del xs
dist.destroy_process_group()
