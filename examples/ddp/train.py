"""A standard DDP training script (torchrun-style: init from the environment).

Run it with torchrun and Gloo, or as a gpumesh exec job with the backend
"gpumesh": the only difference is the backend name (and the import that
registers it).

    torchrun --standalone --nproc_per_node 3 train.py --backend gloo
    gpumesh job run examples/ddp/job.yaml          # --backend gpumesh

(Debian's torchrun of PyTorch 1.13 fails in its launcher, "'NoneType' object
has no attribute 'get'", unless given --redirects 1 --tee 1.)

A seeded MLP learns a fixed random linear map; every rank takes its own
shard of each step's global batch. With --out, rank r writes its per-step
losses and final parameters to OUT/rank<r>.json.

When the job has a checkpoint block (job.yaml's is commented out), it is
spot-proof: it resumes from the newest checkpoint, saves every `every`
steps, and on a spot notice or drain saves at the next step boundary and
exits, so the next generation loses no step. Each step's data is a function
of the step, so a resumed run sees what an uninterrupted one would.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

p = argparse.ArgumentParser()
p.add_argument("--backend", default="gpumesh")
p.add_argument("--steps", type=int, default=20)
p.add_argument("--batch", type=int, default=8, help="samples per rank and step")
p.add_argument("--out", default="")
p.add_argument("--hidden", type=int, default=64, help="width of the hidden layers")
p.add_argument("--step-sleep", type=float, default=0.0, help="seconds to wait after each step (a run slow enough to drain a node in; tests)")
args = p.parse_args()

if args.backend == "gpumesh":
    import gpumesh.torch  # noqa: F401  registers the backend

ckpt = None
if os.environ.get("GPUMESH_CHECKPOINT_URI"):  # the job has a checkpoint block
    from gpumesh import checkpoint as ckpt

torch.set_num_threads(1)
dist.init_process_group(args.backend)
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
h = args.hidden
model = nn.Sequential(nn.Linear(16, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 4))
ddp = DDP(model)
opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)

g = torch.Generator().manual_seed(1234)
target = torch.randn(16, 4, generator=g)
data = torch.randn(args.steps * world * args.batch, 16, generator=g)

start = 0
if ckpt is not None:
    state, last = ckpt.load()  # the newest complete checkpoint, or (None, -1)
    if state is not None:
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        print(f"rank {rank} resumed after step {last}", flush=True)
    start = last + 1

losses = []
for step in range(start, args.steps):
    lo = (step * world + rank) * args.batch
    x = data[lo:lo + args.batch]
    y = x @ target
    opt.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    print(f"rank {rank} step {step} loss {loss.item():.6f}", flush=True)
    if args.step_sleep:
        time.sleep(args.step_sleep)
    if ckpt is not None and ckpt.should_save(step):  # every `every` steps, or when preempted
        ckpt.save({"model": model.state_dict(), "opt": opt.state_dict()}, step)
        if ckpt.preempt_requested():
            print(f"rank {rank} saved step {step} and stops: preempted", flush=True)
            break

if args.out:
    params = torch.cat([q.detach().reshape(-1) for q in model.parameters()]).tolist()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "backend": args.backend, "losses": losses, "params": params}, f)
dist.destroy_process_group()
print(f"rank {rank} done", flush=True)
