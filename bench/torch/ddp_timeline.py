"""Where a DDP step's communication goes with the gpumesh backend (the
issue's model: Linear 4096x4096 x6, batch 2 per rank, one thread per rank).
Run as a gpumesh exec job; for every timed step rank 0 prints one JSON line
with, in milliseconds from the start of backward():

  ops        each operation DDP issued: its bytes, when it was sent to the
             agent, when its answer was read and when its future completed
             (DDP's buckets, in issue order);
  last_sent  when the last bucket was sent: the end of the backward
             computation (DDP issues a bucket when its last gradient is
             ready), so nothing after it can overlap;
  backward   when backward() returned (DDP waits there for every bucket);
  step       the whole step (zero_grad, forward, backward, optimizer);
  in_flight  operations not yet answered when the last bucket was sent
             (they are ahead of it in the agent's queue: collectives run
             one at a time, in issue order).

backward - last_sent is the communication the step exposes after the
computation; the summary line gives its median and its parts: the queue
ahead of the last bucket (its answer minus the answer before it, against
its sent-to-answer time) and what follows the last answer.

    gpumesh job run (ranks: 2) ... ddp_timeline.py --steps 8
"""

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from backend_object import gpumesh_backend  # registers the gpumesh backend

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

pg = gpumesh_backend()
if pg is None:
    print("ddp_timeline: the gpumesh backend object is not reachable in this PyTorch", flush=True)
    raise SystemExit(0)
conn = pg._conn
ops = []
_submit, _handle = conn.submit, conn._handle
answered = {}


def submit(kind, dtype, red, peer, tag, a, b, on_done, what, before_send=None):
    rec = {"bytes": (a[2] * 4) if a else 0}  # float32 buckets

    def done(err):
        rec["done"] = time.perf_counter()
        on_done(err)

    oid = _submit(kind, dtype, red, peer, tag, a, b, done, what, before_send)
    rec["sent"], rec["id"] = time.perf_counter(), oid
    ops.append(rec)
    return oid


def handle(pkt):
    answered[int.from_bytes(pkt[8:16], "little")] = time.perf_counter()
    return _handle(pkt)


conn.submit, conn._handle = submit, handle
torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(4096, 4096) for _ in range(6)])
ddp = nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=args.bucket_view)
opt = torch.optim.SGD(ddp.parameters(), lr=1e-4)
x = torch.randn(2, 4096)
exposed, queued, tail = [], [], []
for i in range(args.warmup + args.steps):
    dist.barrier()
    del ops[:]
    answered.clear()
    t0 = time.perf_counter()
    opt.zero_grad(**zero_kw)
    loss = ddp(x).square().mean()
    tb = time.perf_counter()
    loss.backward()
    te = time.perf_counter()
    opt.step()
    t1 = time.perf_counter()
    if i < args.warmup or rank != 0 or not ops:
        continue

    def ms(t):
        return round((t - tb) * 1e3, 2)

    last = ops[-1]
    ans = [answered.get(o["id"]) for o in ops]
    inflight = sum(1 for a in ans if a is None or a > last["sent"])
    out = {"bench": "ddp_timeline", "world": world, "step": i, "step_ms": round((t1 - t0) * 1e3, 2),
           "backward": ms(te), "last_sent": ms(last["sent"]), "in_flight": inflight,
           "ops": [{"mib": round(o["bytes"] / 2 ** 20, 2), "sent": ms(o["sent"]),
                    "answer": ms(a) if a else None, "done": ms(o["done"]) if "done" in o else None}
                   for o, a in zip(ops, ans)]}
    print(json.dumps(out), flush=True)
    exposed.append((te - last["sent"]) * 1e3)
    if ans[-1] is not None:
        # The last bucket waited for the ones ahead of it until the answer
        # before its own; what it took after that is its own operation.
        prev = max([a for a in ans[:-1] if a is not None] + [last["sent"]])
        queued.append((max(prev, last["sent"]) - last["sent"]) * 1e3)
        tail.append((te - ans[-1]) * 1e3)
if rank == 0 and exposed:
    med = statistics.median
    print(json.dumps({"bench": "ddp_timeline_summary", "world": world,
                      "exposed_after_compute_ms": med(exposed), "rounds_ms": [round(e, 2) for e in exposed],
                      "queued_ahead_ms": med(queued) if queued else None,
                      "after_last_answer_ms": med(tail) if tail else None}), flush=True)
dist.destroy_process_group()
