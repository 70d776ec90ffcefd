"""Every collective and dtype of the gpumesh backend against a reference
computed locally; then the errors it must raise. Run as a gpumesh exec job
(node/torch_test.go does); prints "ALL OK" when every check passed."""

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8]
COUNTS = [1, 1000, 300_001]  # small (recursive doubling), ring, ring with uneven chunks


def val(r, count, dtype):
    # Small non-negative integers: every sum is exact in every dtype.
    return ((torch.arange(count, dtype=torch.int64) * 3 + r * 7) % 5).to(dtype)


def check(name, got, want):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:3].flatten().tolist()
        raise SystemExit(f"rank {rank}: {name}: differs at {bad}: {got.flatten()[:5]} vs {want.flatten()[:5]}")


for dt in DTYPES:
    for count in COUNTS:
        tag = f"{dt} x{count}"
        ins = [val(r, count, dt) for r in range(n)]
        x = ins[rank].clone()
        dist.all_reduce(x)
        check(f"all_reduce sum {tag}", x, sum(i.to(torch.int64) for i in ins).to(dt))
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
        outs = [torch.empty(count, dtype=dt) for _ in range(n)]
        dist.all_gather(outs, ins[rank])
        for r in range(n):
            check(f"all_gather {tag} block {r}", outs[r], ins[r])
        flat = torch.empty(count * n, dtype=dt)
        dist.all_gather_into_tensor(flat, ins[rank]) if hasattr(dist, "all_gather_into_tensor") else dist._all_gather_base(flat, ins[rank])
        check(f"all_gather_into_tensor {tag}", flat, torch.cat(ins))
        # reduce_scatter: rank r's input list is [val(r, count, dt) shifted by block].
        lists = [[val(r + b, count, dt) for b in range(n)] for r in range(n)]
        out = torch.empty(count, dtype=dt)
        dist.reduce_scatter(out, lists[rank])
        check(f"reduce_scatter {tag}", out, sum(lists[r][rank].to(torch.int64) for r in range(n)).to(dt))
        out2 = torch.empty(count, dtype=dt)
        rs = getattr(dist, "reduce_scatter_tensor", None) or dist._reduce_scatter_base
        rs(out2, torch.cat(lists[rank]))
        check(f"reduce_scatter_tensor {tag}", out2, out)
        # send/recv around the ring (even ranks send first).
        nxt, prv = (rank + 1) % n, (rank - 1) % n
        got = torch.empty(count, dtype=dt)
        if rank % 2 == 0:
            dist.send(ins[rank], nxt)
            dist.recv(got, prv)
        else:
            dist.recv(got, prv)
            dist.send(ins[rank], nxt)
        check(f"send/recv {tag}", got, ins[prv])
    dist.barrier()
    print(f"rank {rank}: {dt} ok", flush=True)

# Several operations in flight, completed in issue order.
works, xs = [], []
for i in range(8):
    x = torch.full((4096,), float(rank + i))
    xs.append(x)
    works.append(dist.all_reduce(x, async_op=True))
for i, (w, x) in enumerate(zip(works, xs)):
    w.wait()
    check(f"async all_reduce {i}", x, torch.full((4096,), float(sum(r + i for r in range(n)))))

# A sub-group of ranks 0 and n-1 (every rank calls new_group; members use it).
sub = dist.new_group([0, n - 1])
if rank in (0, n - 1):
    x = torch.full((1000,), float(rank + 1))
    dist.all_reduce(x, group=sub)
    check("sub-group all_reduce", x, torch.full((1000,), float(1 + n)))

# The DDP communication hook: gradients averaged through the agent equal the
# average computed by hand.
torch.manual_seed(0)
net = torch.nn.Linear(32, 8)
ddp = torch.nn.parallel.DistributedDataParallel(net)
ddp.register_comm_hook(gpumesh.torch.hook_state(), gpumesh.torch.allreduce_hook)
inputs = [torch.randn(4, 32, generator=torch.Generator().manual_seed(100 + r)) for r in range(n)]
ddp(inputs[rank]).sum().backward()
ref = torch.nn.Linear(32, 8)
ref.load_state_dict(net.state_dict())
grads = []
for r in range(n):
    ref.zero_grad()
    ref(inputs[r]).sum().backward()
    grads.append(ref.weight.grad.clone())
want = sum(grads) / n
if not torch.allclose(net.weight.grad, want, rtol=1e-5, atol=1e-6):
    raise SystemExit(f"rank {rank}: comm hook gradients differ: {(net.weight.grad - want).abs().max()}")

# Errors that name the problem and leave the group usable.
def expect(fn, words):
    try:
        fn()
    except RuntimeError as e:
        if not all(w in str(e) for w in words):
            raise SystemExit(f"rank {rank}: error {e!r} does not mention {words}")
        return
    raise SystemExit(f"rank {rank}: no error, want one mentioning {words}")

expect(lambda: dist.all_reduce(torch.ones(4, 4).t()), ["contiguous"])
expect(lambda: dist.all_reduce(torch.ones(4, dtype=torch.int8)), ["dtype", "int8"])
dist.barrier()
# Mismatched sizes across ranks: every rank raises (the group is then
# unusable, as with NCCL).
expect(lambda: dist.all_reduce(torch.ones(1000 + rank * 10)), ["gpumesh", "all_reduce"])
print(f"rank {rank}: ALL OK", flush=True)
