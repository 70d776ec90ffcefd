"""Per-operation latency of dist.all_reduce (float32, sum) through the
gpumesh backend, split where the time goes in the rank, next to Gloo's in
the same processes. Run as a gpumesh exec job (2 ranks, one per agent);
rank 0 prints one JSON line per backend and size: medians over --iters of

  total_us   dist.all_reduce's call to its return (after a barrier),
  issue_us   the call until the operation's packet is on the agent's socket
             (argument checks, Work and future objects, staging copy-in or
             the zero-copy lookup, the send),
  answer_us  the send until this process has read the agent's answer
             (the agent's work plus both socket hops and the wake-up),
  finish_us  the answer until dist.all_reduce returns (completion: copy
             back, future, Work);

and, over --iters operations back to back (no barrier between them), per
operation: the wall time (b2b_us), this process's CPU time, all threads
(cpu_us), and its context switches, voluntary (vcsw: a thread slept,
waiting for the agent, a lock or the GIL) and involuntary (ivcsw), and the
agent process's CPU time per operation (agent_cpu_us, when AGENT_PID names
it: bench/torch/proccpu.py). CPU time and switches do not depend on how
loaded the machine is.

The built-in allreduce job's per-op time with the same ranks is the
baseline (bench/torch/oplat.sh runs both).
"""

import argparse
import json
import os
import resource
import statistics
import time

import torch
import torch.distributed as dist

from backend_object import gpumesh_backend  # registers the gpumesh backend
from proccpu import cpu_ns

p = argparse.ArgumentParser()
p.add_argument("--sizes-kib", default="4,16384,65536")
p.add_argument("--iters", type=int, default=30)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--gloo", type=int, default=1, help="also time Gloo (0: gpumesh only)")
args = p.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()

pg = gpumesh_backend()

# Timestamps of the last operation: when submit() sent its packet and when
# its answer was read (not taken where the backend object cannot be reached:
# then only the totals are printed).
marks = {}
if pg is not None:
    conn = pg._conn
    _submit, _handle = conn.submit, conn._handle

    def submit(*a, **kw):
        oid = _submit(*a, **kw)
        marks["sent"] = time.perf_counter()
        return oid

    def handle(pkt):
        marks["answer"] = time.perf_counter()
        return _handle(pkt)

    conn.submit, conn._handle = submit, handle
agent = [int(os.environ["AGENT_PID"])] if os.environ.get("AGENT_PID") else []
groups = {"gpumesh": None}
if args.gloo:
    groups["gloo"] = dist.new_group(backend="gloo")

for kib in [int(s) for s in args.sizes_kib.split(",")]:
    xs = {name: torch.ones(kib * 256) for name in groups}
    rows = {name: {"total": [], "issue": [], "answer": [], "finish": []} for name in groups}
    for i in range(args.warmup + args.iters):
        for name, g in groups.items():
            dist.barrier(group=g)
            marks.clear()
            t0 = time.perf_counter()
            dist.all_reduce(xs[name], group=g)
            t3 = time.perf_counter()
            if i < args.warmup:
                continue
            r = rows[name]
            r["total"].append(t3 - t0)
            if name == "gpumesh" and "sent" in marks and "answer" in marks:
                r["issue"].append(marks["sent"] - t0)
                r["answer"].append(marks["answer"] - marks["sent"])
                r["finish"].append(t3 - marks["answer"])
    b2b = {}
    for name, g in groups.items():
        dist.barrier(group=g)
        a0 = cpu_ns(agent)
        u0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        for i in range(args.iters):
            dist.all_reduce(xs[name], group=g)
        t1, c1, u1 = time.perf_counter(), time.process_time(), resource.getrusage(resource.RUSAGE_SELF)
        a1 = cpu_ns(agent)
        k = args.iters
        b2b[name] = {"b2b_us": (t1 - t0) / k * 1e6, "cpu_us": (c1 - c0) / k * 1e6,
                     "vcsw": (u1.ru_nvcsw - u0.ru_nvcsw) / k, "ivcsw": (u1.ru_nivcsw - u0.ru_nivcsw) / k}
        if agent:
            b2b[name]["agent_cpu_us"] = (a1 - a0) / 1e3 / k
    if rank == 0:
        for name, r in rows.items():
            out = {"bench": "oplat", "backend": name, "ranks": n, "size_kib": kib}
            for k, v in r.items():
                if v:
                    out[k + "_us"] = statistics.median(v) * 1e6
            out.update(b2b[name])
            out["busbw_gbps"] = kib * 1024 / statistics.median(r["total"]) / 1e9 * 2 * (n - 1) / n
            print(json.dumps(out), flush=True)
    del xs
dist.destroy_process_group()
