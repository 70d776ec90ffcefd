"""The zero-copy path of the gpumesh backend (python/gpumesh/_zerocopy.py):
host tensors used again and again move into agent-mapped segments and are
then reduced in place; results equal the staged path's; memory PyTorch does
not own stays where it is; regions of storages that died are released.
Run as ranks of a gpumesh group (node/localapi/python_test.go and
node/torch_test.go do); prints "ZEROCOPY OK" when every check passed and
"REGIONS <n>" (the regions this rank still holds) before exiting."""

import gc
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import gpumesh.torch  # noqa: F401
from gpumesh import _zerocopy

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
zc = dist.distributed_c10d._get_default_group()._zc
assert zc is not None, "zero copy is off"
tri = n * (n + 1) / 2


def fail(msg):
    print(f"rank {rank}: {msg}", flush=True)
    sys.exit(1)


def expect(name, got, want):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:3].flatten().tolist()
        fail(f"{name}: differs at {bad}: {got.flatten()[:4].tolist()} vs {want.flatten()[:4].tolist()}")


# 1. all_reduce on the same tensor: staged the first time, moved the second,
# in place from then on; the result is right every time.
x = torch.empty(1 << 20)
for i in range(4):
    x.fill_(rank + 1)
    dist.all_reduce(x)
    expect(f"all_reduce round {i}", x, torch.full_like(x, tri))
if zc.adopted != 1 or zc.regions() != 1:
    fail(f"after 4 all_reduces of one tensor: {zc.adopted} storages moved, {zc.regions()} regions; want 1 and 1")
m = _zerocopy._mapping_at(x.data_ptr())
if m is None or "memfd:gpumesh" not in m[2]:
    fail(f"the moved tensor is not in a segment: {m}")

# 2. Views of a moved storage at an offset; other collectives in place.
base = x.data_ptr()
v = x[4096:4096 + (1 << 18)]
v.fill_(rank)
dist.all_reduce(v, op=dist.ReduceOp.MAX)
expect("all_reduce max of a view", v, torch.full_like(v, n - 1))
expect("the rest of the storage", x[:4096], torch.full((4096,), tri))
x.copy_(torch.arange(x.numel(), dtype=torch.float32) + rank)
dist.broadcast(x, src=n - 1)
expect("broadcast", x, torch.arange(x.numel(), dtype=torch.float32) + (n - 1))
if x.data_ptr() != base or zc.adopted != 1:
    fail("the tensor moved again")

# 3. all_gather_into_tensor and reduce_scatter_tensor with moved tensors; the
# reduce-scatter input is the caller's and stays as it was.
blk = 1 << 16
inp = torch.empty(blk)
out = torch.empty(blk * n)
for _ in range(3):
    inp.fill_(rank + 1)
    gather = getattr(dist, "all_gather_into_tensor", None) or dist._all_gather_base
    gather(out, inp)
expect("all_gather_into_tensor", out, torch.cat([torch.full((blk,), r + 1.0) for r in range(n)]))
rs_in = torch.empty(blk * n)
rs_out = torch.empty(blk)
rs = getattr(dist, "reduce_scatter_tensor", None) or dist._reduce_scatter_base
for _ in range(3):
    rs_in.copy_(torch.arange(blk * n, dtype=torch.float32))
    rs(rs_out, rs_in)
expect("reduce_scatter_tensor output", rs_out, torch.arange(blk * rank, blk * (rank + 1), dtype=torch.float32) * n)
expect("reduce_scatter_tensor input unchanged", rs_in, torch.arange(blk * n, dtype=torch.float32))

# 4. send/recv around the ring on moved tensors.
buf = torch.empty(1 << 18)
got = torch.empty(1 << 18)
for i in range(3):
    buf.fill_(rank * 10 + i)
    nxt, prv = (rank + 1) % n, (rank - 1) % n
    if n > 1:
        if rank % 2 == 0:
            dist.send(buf, nxt)
            dist.recv(got, prv)
        else:
            dist.recv(got, prv)
            dist.send(buf, nxt)
        expect(f"send/recv round {i}", got, torch.full_like(got, prv * 10 + i))

# 5. A numpy array's memory is never moved: the array sees every result.
a = np.zeros(1 << 18, dtype=np.float32)
t = torch.from_numpy(a)
moved = zc.adopted
for i in range(3):
    t.fill_(rank + 1)
    dist.all_reduce(t)
    if not np.all(a == tri):
        fail(f"numpy array round {i}: {a[:3]}")
if zc.adopted != moved:
    fail("a numpy array's memory was moved")

# 6. DDP: its gradient buckets move into segments, and its averaged
# gradients equal each rank's own gradients (of a plain copy of the model)
# averaged over the ranks.
import copy

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512), nn.Linear(512, 4))
plain = copy.deepcopy(model)
ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1)
before = zc.adopted
for step in range(4):
    ddp.zero_grad()
    plain.zero_grad()
    xb = torch.full((2, 512), float(rank + 1)) * (step + 1) / 100
    ddp(xb).square().sum().backward()
    plain(xb).square().sum().backward()
    for i, (p, q) in enumerate(zip(model.parameters(), plain.parameters())):
        want = q.grad.clone()
        dist.all_reduce(want)
        want /= n
        if not torch.allclose(p.grad, want, rtol=1e-5, atol=1e-6):
            fail(f"DDP step {step} parameter {i}: gradient differs by {(p.grad - want).abs().max()}")
if zc.adopted - before < 2:
    fail(f"DDP moved {zc.adopted - before} bucket storages, want >= 2")

# 7. Storages that die release their regions.
held = zc.regions()
del x, v, inp, out, rs_in, rs_out, buf, got
gc.collect()
zc.sweep()
if zc.regions() >= held:
    fail(f"{zc.regions()} regions after freeing moved tensors, {held} before")
# 8. Completed operations are not kept: the group holds Work objects only
# until they completed and were waited on (or their future taken).
pg = dist.distributed_c10d._get_default_group()
for i in range(100):
    y = torch.ones(1000)
    dist.all_reduce(y)
    w = dist.all_reduce(torch.ones(10), async_op=True)
    w.wait()
if len(pg._keep) > 2:
    fail(f"the group keeps {len(pg._keep)} Work objects after 200 completed operations")

# 9. A moved storage dies and a new shared storage of the same size takes
# its address and (usually) its descriptor's number, before any sweep: the
# new one must not be taken for the old one (its all_reduce would go to the
# old storage's segment, and the new tensor would keep its own values). Both
# ways of recognising a moved storage: by weak reference and by descriptor
# and inode (where PyTorch has no weak references).
for weak in (True, False):
    zc.weak_refs = weak
    y = torch.empty(1 << 20)
    for _ in range(2):
        y.fill_(1)
        dist.all_reduce(y)
    old = y.data_ptr()
    if old not in zc._by_base:
        fail(f"weak refs {weak}: the tensor was not moved")
    del y
    gc.collect()
    misses = []
    for _ in range(20):
        w = torch.empty(1 << 20)
        w.share_memory_()
        if w.data_ptr() == old:
            break
        misses.append(w)
    else:
        fail(f"weak refs {weak}: no new shared storage at the dead one's address in 20 tries (the check needs one)")
    del misses
    zc._ops = 1  # no sweep during the next operations: the lookup itself must tell
    if old not in zc._by_base:
        fail(f"weak refs {weak}: the dead storage's entry went before the lookup")
    for i in range(3):
        w.fill_(rank + 1)
        dist.all_reduce(w)
        expect(f"weak refs {weak}: a new storage at a dead one's address, round {i}", w, torch.full_like(w, tri))
    e = zc._by_base.get(old)
    if e is not None and e.cdata is None and weak:
        fail(f"weak refs {weak}: the dead storage's entry is still used")
    del w
    gc.collect()
zc.weak_refs = True
dist.barrier()
print("ZEROCOPY OK", flush=True)
del ddp, model
gc.collect()
zc.sweep()
print(f"REGIONS {zc.regions()}", flush=True)
dist.destroy_process_group()
