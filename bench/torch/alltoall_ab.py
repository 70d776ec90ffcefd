"""dist.all_to_all_single time (float32, equal splits) through the gpumesh
backend (zero copy: the same buffers every round, so their storages move
into agent-mapped segments), through it with every tensor staged
(GPUMESH_ZERO_COPY=0) and through Gloo, interleaved in the same processes:
for each size, they take turns, one timed operation each per round (after
a barrier on its group), so that a shared machine's changing load falls on
all of them. Run as a gpumesh exec job; rank 0 prints one JSON line per
backend and size: the median of --iters, algbw (bytes each rank sends and
keeps, over the time) and busbw (algbw x (n-1)/n, as nccl-tests defines it
for all-to-all)."""

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

ALL = "gpumesh,gpumesh-staged,gloo"
p = argparse.ArgumentParser()
p.add_argument("--sizes-mib", default="1,16,64", help="input size per rank")
p.add_argument("--iters", type=int, default=10)
p.add_argument("--warmup", type=int, default=2)
p.add_argument("--backends", default=ALL, help=f"some of {ALL}")
args = p.parse_args()
want = args.backends.split(",")

torch.set_num_threads(1)
dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
os.environ["GPUMESH_ZERO_COPY"] = "0"
staged = dist.new_group(backend="gpumesh")
del os.environ["GPUMESH_ZERO_COPY"]
groups = {"gpumesh": None, "gpumesh-staged": staged, "gloo": dist.new_group(backend="gloo")}
groups = {k: v for k, v in groups.items() if k in want}
for mib in [int(s) for s in args.sizes_mib.split(",")]:
    count = mib * (1 << 20) // 4 // n * n
    bufs = {name: (torch.full((count,), float(rank)), torch.empty(count)) for name in groups}
    want_out = torch.cat([torch.full((count // n,), float(p)) for p in range(n)])
    times = {name: [] for name in groups}
    for i in range(args.warmup + args.iters):
        for name, pg in groups.items():
            inp, out = bufs[name]
            dist.barrier(group=pg)
            t0 = time.perf_counter()
            dist.all_to_all_single(out, inp, group=pg)
            t1 = time.perf_counter()
            if i >= args.warmup:
                times[name].append(t1 - t0)
    for name, (inp, out) in bufs.items():
        if not torch.equal(out, want_out):
            raise SystemExit(f"rank {rank}: {name}: wrong result")
    if rank == 0:
        for name, ts in times.items():
            med = statistics.median(ts)
            alg = count * 4 / med / 1e9
            print(json.dumps({"bench": "all_to_all_single", "backend": name, "ranks": n, "size_mib": mib,
                              "time_s": med, "algbw_gbps": alg, "busbw_gbps": alg * (n - 1) / n}), flush=True)
    del bufs
dist.destroy_process_group()
