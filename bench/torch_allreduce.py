#!/usr/bin/env python3
"""All-reduce bus bandwidth of a torch.distributed backend (gloo or nccl),
measured as nccl-tests does: the baseline every GPU and Gloo figure in
bench/RESULTS.md and bench/results/ is compared with.

Usage:
    python3 bench/torch_allreduce.py BACKEND cpu|cuda WORLD PORT SIZES_MIB_CSV [ITERS]

BACKEND is gloo or nccl; WORLD ranks are spawned on this host (rank r uses
GPU r mod the GPU count) and meet on 127.0.0.1:PORT. For each size (MiB,
float32) it runs 3 warm-up all-reduces, then ITERS timed ones (default 10),
each after a barrier and bracketed by CUDA synchronisation, and rank 0
prints one line with the median time, algbw = bytes / time and
busbw = algbw * 2(n-1)/n (GB/s, 1e9 bytes). A last all-reduce of known
values prints "correct: True" when the sum is right.

Examples (2 GPUs):
    # NCCL as it comes (NVLink/P2P)
    python3 bench/torch_allreduce.py nccl cuda 2 29500 1,16,64,256 10
    # NCCL forced onto loopback sockets, 2 threads x 8 sockets (its AWS default)
    NCCL_P2P_DISABLE=1 NCCL_SHM_DISABLE=1 NCCL_NET=Socket NCCL_SOCKET_IFNAME=lo \\
      NCCL_NSOCKS_PERTHREAD=8 NCCL_SOCKET_NTHREADS=2 \\
      python3 bench/torch_allreduce.py nccl cuda 2 29500 1,16,64,256 10
    # NCCL through shared memory only (no peer-to-peer, no network)
    NCCL_P2P_DISABLE=1 python3 bench/torch_allreduce.py nccl cuda 2 29500 64,256 10
    # Gloo, CPU tensors, 4 ranks
    python3 bench/torch_allreduce.py gloo cpu 4 29500 64,256 10

Keep NVLink multicast off where the driver offers it (NCCL_NVLS_ENABLE=0);
scripts/gpu-lib.sh does. scripts/gpu-build.sh ships this file to the GPU
machine and scripts/gpu-*.sh run it by name (see gpu-lib.sh's baselines);
bench/allreduce/compare_gloo.sh runs its Gloo rows.
"""
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def worker(rank, world, backend, devkind, port, sizes, iters):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(backend, rank=rank, world_size=world)
    if devkind == "cuda":
        ngpu = torch.cuda.device_count()
        dev = torch.device("cuda", rank % ngpu)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    for nbytes in sizes:
        n = nbytes // 4
        x = torch.randn(n, device=dev)
        for _ in range(3):
            dist.all_reduce(x)
        if devkind == "cuda":
            torch.cuda.synchronize()
        ts = []
        for _ in range(iters):
            dist.barrier()
            if devkind == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            if devkind == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        t = statistics.median(ts)
        alg = nbytes / t / 1e9
        bus = alg * 2 * (world - 1) / world
        if rank == 0:
            print(f"{backend:5s} {devkind:4s} n={world} size={nbytes>>20:5d}MiB time={t*1e3:9.2f}ms algbw={alg:7.2f}GB/s busbw={bus:7.2f}GB/s", flush=True)
    # correctness
    x = torch.full((1024,), float(rank + 1), device=dev)
    dist.all_reduce(x)
    ok = torch.allclose(x, torch.full_like(x, world * (world + 1) / 2))
    if rank == 0:
        print("correct:", bool(ok), flush=True)
    dist.destroy_process_group()


def main():
    if len(sys.argv) < 6 or sys.argv[1] not in ("gloo", "nccl") or sys.argv[2] not in ("cpu", "cuda"):
        sys.exit("usage: torch_allreduce.py gloo|nccl cpu|cuda WORLD PORT SIZES_MIB_CSV [ITERS]")
    backend, devkind, world, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    sizes = [int(s) << 20 for s in sys.argv[5].split(",")]
    iters = int(sys.argv[6]) if len(sys.argv) > 6 else 10
    mp.spawn(worker, args=(world, backend, devkind, port, sizes, iters), nprocs=world)


if __name__ == "__main__":
    main()
