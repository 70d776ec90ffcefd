"""DDP (Gloo, CPU) training loop that checkpoints through gpumesh.checkpoint.

The data of step s is a function of s (and the rank), so a run resumed from
the checkpoint of step s computes what an uninterrupted run would. Rank 0
writes the final parameters to --out as float.hex strings (bit-exact).
"""

import argparse
import json
import os
import time

T_START = time.time()

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpumesh import checkpoint as ckpt

p = argparse.ArgumentParser()
p.add_argument("--steps", type=int, default=40)
p.add_argument("--stop-at", type=int, default=-1, help="save the checkpoint of this step and exit")
p.add_argument("--batch", type=int, default=8)
p.add_argument("--out", default="")
p.add_argument("--step-sleep", type=float, default=0.0)
p.add_argument("--slow-generation", default="", help="sleep only in this GPUMESH_GENERATION")
p.add_argument("--shard", action="store_true")
p.add_argument("--state-mib", type=int, default=0, help="add a tensor of this many MiB to the checkpointed state")
args = p.parse_args()

torch.set_num_threads(1)
dist.init_process_group("gloo")
T_INIT = time.time()
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
state, last = ckpt.load()
ballast = None
if args.state_mib and state is None:
    ballast = torch.zeros(args.state_mib * 2**20 // 4)
if state is not None:
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    if args.state_mib:
        ballast = state["ballast"]
        # Write every byte of the loaded state once, as an optimizer step
        # does to parameters: a mapped checkpoint pays its copy here.
        t_touch = time.time()
        ballast.add_(0.0)
        print(f"rank {dist.get_rank()} touched the loaded state in {time.time() - t_touch:.3f} s", flush=True)
print(f"rank {rank} world {world} resumed from {last} {json.dumps(ckpt.last_load, sort_keys=True)}", flush=True)
print(f"rank {rank} times: started {T_START:.3f} initialized {T_INIT:.3f} loaded {time.time():.3f}", flush=True)
ddp = DDP(model)
target = torch.randn(16, 4, generator=torch.Generator().manual_seed(1234))

step = last
for step in range(last + 1, args.steps):
    g = torch.Generator().manual_seed(step * 1000 + rank)
    x = torch.randn(args.batch, 16, generator=g)
    opt.zero_grad()
    loss = nn.functional.mse_loss(ddp(x), x @ target)
    loss.backward()
    opt.step()
    print(f"rank {rank} step {step} loss {loss.item():.6f}", flush=True)
    if step == last + 1:
        print(f"rank {rank} first step {step} at {time.time():.3f}", flush=True)
    if args.step_sleep and args.slow_generation in ("", os.environ.get("GPUMESH_GENERATION")):
        time.sleep(args.step_sleep)
    if step == args.stop_at or ckpt.should_save(step):
        t0 = time.time()
        st = {"model": model.state_dict(), "opt": opt.state_dict()}
        if ballast is not None:
            st["ballast"] = ballast
        ckpt.save(st, step, shard=args.shard)
        print(f"rank {rank} saved {step}", flush=True)
        print(f"rank {rank} save took {time.time() - t0:.3f} s, done at {time.time():.3f} {json.dumps(ckpt.last_save, sort_keys=True)}", flush=True)
        if step == args.stop_at or ckpt.preempt_requested():
            print(f"rank {rank} stopped at {step}", flush=True)
            break

if args.out and rank == 0:
    params = [v.hex() for q in model.parameters() for v in q.detach().reshape(-1).tolist()]
    with open(args.out, "w") as f:
        json.dump({"step": step, "world": world, "params": params}, f)
dist.destroy_process_group()
print(f"rank {rank} done at {time.time():.3f}", flush=True)
