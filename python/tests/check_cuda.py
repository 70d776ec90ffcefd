"""CUDA tensors through the gpumesh backend's CUDA IPC path (needs a GPU;
ranks share GPU LOCAL_RANK mod the GPU count): every collective (all_to_all,
gather, scatter and all_reduce_coalesced included) x float32 /
float16 / bfloat16 / int32 / int64 against a reference computed locally,
tensors that are views inside a larger allocation, a DDP training of a CUDA
model against the same model under Gloo (CUDA tensors) in the same
processes, and hostile registrations (garbage handle, a size beyond the
allocation, an operation outside it) that the agent must refuse without
harm. Asserts that the path was taken (no operation staged, allocations
registered once and found again). Prints "CUDA CHECK OK" and the path's
counts as JSON."""

import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import gpumesh.torch  # noqa: F401
from gpumesh import _client

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
torch.cuda.set_device(dev)
pg = dist.distributed_c10d._get_default_group()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64]
COUNTS = [1000, 300_001]


def val(r, count, dtype):
    # Small non-negative integers: every sum is exact in every dtype.
    return ((torch.arange(count, dtype=torch.int64, device=dev) * 3 + r * 7) % 5).to(dtype)


def check(name, got, want):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:3].flatten().tolist()
        raise SystemExit(f"rank {rank}: {name}: differs at {bad}: {got.flatten()[:5]} vs {want.flatten()[:5]}")


# One big allocation whose slices are the operations' tensors: offsets
# inside an allocation, and the same allocation found again.
arena = torch.zeros(8 << 20, dtype=torch.uint8, device=dev)


def place(t, at):
    nb = t.numel() * t.element_size()
    v = arena[at:at + nb].view(t.dtype)
    v.copy_(t)
    return v


for dt in DTYPES:
    for count in COUNTS:
        tag = f"{dt} x{count}"
        ins = [val(r, count, dt) for r in range(n)]
        for at in (0, 4096):  # a tensor of its own, and a view inside the arena
            x = ins[rank].clone() if at == 0 else place(ins[rank], at)
            dist.all_reduce(x)
            check(f"all_reduce sum {tag} @{at}", x, sum(i.to(torch.int64) for i in ins).to(dt))
        for op, f in [(dist.ReduceOp.MAX, torch.maximum), (dist.ReduceOp.MIN, torch.minimum)]:
            x = ins[rank].clone()
            dist.all_reduce(x, op=op)
            want = ins[0]
            for i in ins[1:]:
                want = f(want, i)
            check(f"all_reduce {op} {tag}", x, want)
        x = ins[rank].clone()
        dist.all_reduce(x, op=dist.ReduceOp.PRODUCT)
        want = ins[0].to(torch.int64)
        for i in ins[1:]:
            want = want * i.to(torch.int64)
        check(f"all_reduce product {tag}", x, want.to(dt))
        if dt.is_floating_point:
            x = (ins[rank] * n).clone()
            dist.all_reduce(x, op=dist.ReduceOp.AVG)
            check(f"all_reduce avg {tag}", x, sum(i.to(torch.float64) for i in ins).to(dt))
        x = ins[rank].clone()
        dist.broadcast(x, src=n - 1)
        check(f"broadcast {tag}", x, ins[n - 1])
        outs = [torch.empty(count, dtype=dt, device=dev) for _ in range(n)]
        dist.all_gather(outs, ins[rank])
        for r in range(n):
            check(f"all_gather {tag} block {r}", outs[r], ins[r])
        flat = torch.empty(count * n, dtype=dt, device=dev)
        dist.all_gather_into_tensor(flat, ins[rank])
        check(f"all_gather_into_tensor {tag}", flat, torch.cat(ins))
        big = [torch.cat([val(r * n + k, count, dt) for k in range(n)]) for r in range(n)]
        want = sum(big[r].to(torch.int64) for r in range(n)).to(dt)[rank * count:(rank + 1) * count]
        out = torch.empty(count, dtype=dt, device=dev)
        inp = big[rank].clone()
        dist.reduce_scatter_tensor(out, inp)
        check(f"reduce_scatter_tensor {tag}", out, want)
        check(f"reduce_scatter_tensor {tag} input kept", inp, big[rank])
        out = torch.empty(count, dtype=dt, device=dev)
        dist.reduce_scatter(out, list(big[rank].chunk(n)))
        check(f"reduce_scatter {tag}", out, want)
        if n >= 2:
            peer = (rank + 1) % n
            src = (rank - 1) % n
            y = torch.empty(count, dtype=dt, device=dev)
            s = dist.isend(ins[rank].clone(), peer)
            dist.recv(y, src)
            s.wait()
            check(f"send/recv {tag}", y, ins[src])
        # all_to_all_single with uneven splits (an empty one included), into
        # a view inside the arena; all_to_all of lists with an empty block.
        rows = lambda r, p: ((r * 3 + p * 5 + 1) % 4) * (count // 4)  # noqa: E731
        a2a_in = [torch.cat([val(r * n + p, rows(r, p), dt) for p in range(n)]) for r in range(n)]
        want = torch.cat([a2a_in[p][sum(rows(p, q) for q in range(rank)):][:rows(p, rank)] for p in range(n)])
        out = place(torch.zeros(want.numel(), dtype=dt, device=dev), 8192)
        dist.all_to_all_single(out, a2a_in[rank], [rows(p, rank) for p in range(n)], [rows(rank, p) for p in range(n)])
        check(f"all_to_all_single {tag}", out, want)
        outs = [torch.empty(rows(p, rank), dtype=dt, device=dev) for p in range(n)]
        dist.all_to_all(outs, list(a2a_in[rank].split([rows(rank, p) for p in range(n)])))
        check(f"all_to_all {tag}", torch.cat(outs), want)
        root = n - 1
        gl = [torch.empty(count, dtype=dt, device=dev) for _ in range(n)] if rank == root else None
        dist.gather(ins[rank], gl, dst=root)
        if rank == root:
            check(f"gather {tag}", torch.stack(gl), torch.stack(ins))
        y = torch.empty(count, dtype=dt, device=dev)
        dist.scatter(y, [i.clone() for i in ins] if rank == root else None, src=root)
        check(f"scatter {tag}", y, ins[rank])
        xs = [ins[rank][:count // 2].clone(), ins[rank].clone()]
        if hasattr(dist, "all_reduce_coalesced"):
            with __import__("warnings").catch_warnings():
                __import__("warnings").simplefilter("ignore")
                dist.all_reduce_coalesced(xs)
        else:
            pg.allreduce_coalesced(xs, dist.AllreduceCoalescedOptions()).wait()
        total = sum(i.to(torch.int64) for i in ins).to(dt)
        check(f"all_reduce_coalesced {tag}", torch.cat(xs), torch.cat([total[:count // 2], total]))
dist.barrier()
# Asynchronous, several in flight: results in issue order.
xs = [torch.full((1 << 20,), float(k + rank), device=dev) for k in range(6)]
works = [dist.all_reduce(x, async_op=True) for x in xs]
for k, (w, x) in enumerate(zip(works, xs)):
    w.wait()
    check(f"async {k}", x, torch.full_like(x, float(k * n + sum(range(n)))))

# DDP: a CUDA model through gpumesh and the same model through Gloo (CUDA
# tensors), same data, same processes. With 2 ranks a sum of two float32
# values is exact whatever the order, and DDP divides before it reduces, so
# the models must agree exactly; with more ranks the order of the sums
# differs between the two backends, within TOL.
TOL = 0.0 if n <= 2 else 1e-5
gloo = dist.new_group(backend="gloo")
models = {}
for name, group in (("gpumesh", pg), ("gloo", gloo)):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)).to(dev)
    ddp = nn.parallel.DistributedDataParallel(m, device_ids=[dev], process_group=group, bucket_cap_mb=1)
    models[name] = (ddp, torch.optim.SGD(ddp.parameters(), lr=0.05))
g = torch.Generator().manual_seed(1234 + rank)
losses = {k: [] for k in models}
for step in range(20):
    x = torch.randn(16, 512, generator=g).to(dev)
    y = torch.randint(0, 10, (16,), generator=g).to(dev)
    for name, (ddp, opt) in models.items():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        losses[name].append(loss.item())
diff = max((a - b).abs().max().item() for a, b in zip(models["gpumesh"][0].parameters(), models["gloo"][0].parameters()))
if diff > TOL or max(abs(a - b) for a, b in zip(losses["gpumesh"], losses["gloo"])) > max(TOL, 1e-6):
    raise SystemExit(f"rank {rank}: DDP through gpumesh differs from Gloo: parameters by {diff}, losses {losses}")

# Hostile registrations: refused, and the group still works.
conn = pg._conn
uuid = pg._ipc._uuid(dev.index)
rid, why, _ = conn.register_cuda(_client.CUDA_MEMORY, 1 << 20, uuid, os.urandom(64))
assert rid is None and why, ("garbage handle accepted", rid)
base, size, handle = pg._ipc._drv().allocation(dev.index, arena.data_ptr())
rid, why, _ = conn.register_cuda(_client.CUDA_MEMORY, size + (1 << 30), uuid, handle)
assert rid is None and "bytes" in why, ("a size beyond the allocation accepted", rid, why)
rid, why, _ = conn.register_cuda(_client.CUDA_MEMORY, size, uuid, handle)
assert rid is not None, why
err = []
done = __import__("threading").Event()
conn.submit(_client.OP_ALLREDUCE, 1, 1, 0, 0, (rid, size - 4, 2), None, lambda e: (err.append(e), done.set()), "outside")
conn.wait_for(done, 30)
assert err and err[0] and "do not fit" in err[0], err
conn.unregister(rid)
x = torch.ones(1000, device=dev)
dist.all_reduce(x)
check("after hostile registrations", x, torch.full_like(x, float(n)))

st = pg.cuda_stats()
assert st["off"] is None and st["staged"] == 0, st
assert st["hits"] > 0 and st["registered"] > 0, st
dist.destroy_process_group()
print("CUDA CHECK OK", json.dumps({"rank": rank, "ddp_max_param_diff": diff, **st}), flush=True)
