"""The gpumesh backend's all_to_all, gather and scatter (the agent's table
operations) and all_reduce_coalesced against references computed locally: all_to_all_single (equal, unequal and
zero-size splits, multi-dimensional tensors, the input's memory inside the
output), all_to_all, gather and scatter from every root, gather_object and
scatter_object_list, all_reduce_coalesced (one dtype through dist, mixed
dtypes through the process group), every dtype, several in flight; then
bad input, which must raise an error naming the operation and leave the
group usable; then ranks that disagree (sizes; different collectives),
which must raise on every rank within the collective timeout. Host tensors
go both ways: staged, and in place after the zero-copy path moved their
storage (a large buffer used twice). Run with 2 or more ranks; prints
"COMPOSED OK"."""

import sys
import time

import torch
import torch.distributed as dist

import gpumesh.torch

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
pg = gpumesh.torch.backend_of()
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.int64, torch.uint8, torch.bool]


def val(seed, count, dtype):
    # Distinct small integers (exact in every dtype): a block from the wrong
    # rank or place differs.
    v = (torch.arange(count, dtype=torch.int64) * 7 + seed * 31 + 1) % 251
    return (v % 2).bool() if dtype == torch.bool else v.to(dtype)


def check(name, got, want):
    if got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
        bad = (got != want).nonzero()[:3].flatten().tolist() if got.shape == want.shape else "shape"
        raise SystemExit(f"rank {rank}: {name}: differs at {bad}: {got.flatten()[:6]} vs {want.flatten()[:6]}")


def rows(r, p, scale):
    # Rows rank r sends to rank p: uneven, some zero.
    return ((r * 3 + p * 5 + 1) % 4) * scale


# ---- all_to_all_single ----
for dt in DTYPES:
    for scale, width in [(1, 1), (3, 7), (25_000, 4)]:
        tag = f"{dt} scale {scale} width {width}"
        # Equal splits: every rank sends count rows to every rank.
        count = scale
        ins = [val(r, n * count * width, dt).view(n * count, width) for r in range(n)]
        out = torch.empty(n * count, width, dtype=dt)
        dist.all_to_all_single(out, ins[rank])
        check(f"all_to_all_single equal {tag}", out,
              torch.cat([ins[p][rank * count:(rank + 1) * count] for p in range(n)]))
        # Unequal splits, zero-size ones included.
        ins = [val(10 + r, sum(rows(r, p, scale) for p in range(n)) * width, dt).view(-1, width) for r in range(n)]
        in_splits = [rows(rank, p, scale) for p in range(n)]
        out_splits = [rows(p, rank, scale) for p in range(n)]
        want = []
        for p in range(n):
            off = sum(rows(p, q, scale) for q in range(rank))
            want.append(ins[p][off:off + rows(p, rank, scale)])
        want = torch.cat(want)
        out = torch.empty(sum(out_splits), width, dtype=dt)
        dist.all_to_all_single(out, ins[rank], out_splits, in_splits)
        check(f"all_to_all_single uneven {tag}", out, want)
        if scale == 25_000 and dt == torch.float32:
            # The same storages again: the zero-copy path has moved them now.
            src = ins[rank].clone()
            for _ in range(3):
                out.zero_()
                dist.all_to_all_single(out, src, out_splits, in_splits)
                check(f"all_to_all_single uneven, reused storages {tag}", out, want)
    print(f"rank {rank}: all_to_all_single {dt} ok", flush=True)

# The input is the output (in place): Gloo allows it; the input is copied first.
x = val(rank, n * 5, torch.float32)
want = torch.cat([val(p, n * 5, torch.float32)[rank * 5:(rank + 1) * 5] for p in range(n)])
dist.all_to_all_single(x, x)
check("all_to_all_single in place", x, want)

# ---- all_to_all (lists) ----
for dt in DTYPES:
    for scale in (1, 9, 60_000):
        ins = [[val(r * n + p, rows(r, p, scale), dt) for p in range(n)] for r in range(n)]
        outs = [torch.empty(rows(p, rank, scale), dtype=dt) for p in range(n)]
        dist.all_to_all(outs, ins[rank])
        for p in range(n):
            check(f"all_to_all {dt} x{scale} from rank {p}", outs[p], ins[p][rank])
    print(f"rank {rank}: all_to_all {dt} ok", flush=True)

# ---- gather and scatter, every root ----
for dt in DTYPES:
    for count in (1, 1000, 100_003):
        for root in range(n):
            ins = [val(100 * root + r, count, dt) for r in range(n)]
            gl = [torch.empty(count, dtype=dt) for _ in range(n)] if rank == root else None
            dist.gather(ins[rank], gl, dst=root)
            if rank == root:
                for p in range(n):
                    check(f"gather {dt} x{count} root {root} from {p}", gl[p], ins[p])
            out = torch.empty(count, dtype=dt)
            sl = [v.clone() for v in ins] if rank == root else None
            dist.scatter(out, sl, src=root)
            check(f"scatter {dt} x{count} root {root}", out, ins[rank])
    print(f"rank {rank}: gather/scatter {dt} ok", flush=True)

# Views of one tensor (gather_object's layout) and multi-dimensional tensors.
big = torch.zeros(n, 3, 4)
dist.gather(torch.full((3, 4), float(rank)), list(big.unbind(0)) if rank == 0 else None, dst=0)
if rank == 0:
    check("gather into views", big, torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 3, 4))

# ---- object collectives over gather/scatter ----
obj = {"rank": rank, "data": list(range(rank * 10)), "s": "x" * (rank * 1000)}
got = [None] * n if rank == n - 1 else None
dist.gather_object(obj, got, dst=n - 1)
if rank == n - 1:
    want = [{"rank": r, "data": list(range(r * 10)), "s": "x" * (r * 1000)} for r in range(n)]
    if got != want:
        raise SystemExit(f"rank {rank}: gather_object got {got!r:.200}")
objs = [{"to": r, "pad": "y" * (r * 777)} for r in range(n)] if rank == 0 else None
got = [None]
dist.scatter_object_list(got, objs, src=0)
if got[0] != {"to": rank, "pad": "y" * (rank * 777)}:
    raise SystemExit(f"rank {rank}: scatter_object_list got {got[0]!r:.200}")
print(f"rank {rank}: object collectives ok", flush=True)

# ---- all_reduce_coalesced ----
coalesced = getattr(dist, "all_reduce_coalesced", None)
for dt in DTYPES:
    sizes = [1, 0, 1000, 70_001, 3]
    # Small values: every sum is exact in every dtype, whatever the order.
    small = lambda seed, count: val(seed, count, torch.int64).remainder(5).to(dt) if dt != torch.bool else val(seed, count, dt)  # noqa: E731
    xs = [small(rank + 7 * i, s) for i, s in enumerate(sizes)]
    op = dist.ReduceOp.MAX if dt == torch.bool else dist.ReduceOp.SUM
    wants = []
    for i, s in enumerate(sizes):
        per = [small(r + 7 * i, s) for r in range(n)]
        if dt == torch.bool:
            w = per[0]
            for v in per[1:]:
                w = w | v
        else:
            w = sum(v.to(torch.int64) for v in per).to(dt)
        wants.append(w)
    shapes = [x.view(-1) for x in xs]
    if coalesced is not None:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            coalesced(shapes, op=op)
    else:
        opts = dist.AllreduceCoalescedOptions()
        opts.reduceOp = op
        pg.allreduce_coalesced(shapes, opts).wait()
    for i in range(len(sizes)):
        check(f"all_reduce_coalesced {dt} tensor {i}", shapes[i], wants[i])
# Mixed dtypes (not through dist, which refuses them): one all_reduce per dtype.
mixed = [torch.full((5,), float(rank + 1)), torch.full((3,), rank + 1, dtype=torch.int64),
         torch.full((2, 2), float(rank + 1), dtype=torch.float16), torch.full((7,), float(rank))]
opts = dist.AllreduceCoalescedOptions()
opts.reduceOp = dist.ReduceOp.SUM
pg.allreduce_coalesced(mixed, opts).wait()
tot = sum(r + 1 for r in range(n))
check("all_reduce_coalesced mixed f32", mixed[0], torch.full((5,), float(tot)))
check("all_reduce_coalesced mixed i64", mixed[1], torch.full((3,), tot, dtype=torch.int64))
check("all_reduce_coalesced mixed f16", mixed[2], torch.full((2, 2), float(tot), dtype=torch.float16))
check("all_reduce_coalesced mixed f32 2", mixed[3], torch.full((7,), float(tot - n)))
print(f"rank {rank}: all_reduce_coalesced ok", flush=True)

# ---- several in flight, with collectives between them ----
works, checks = [], []
for i in range(6):
    inp = val(rank * 10 + i, n * 1000, torch.float32)
    out = torch.empty(n * 1000)
    works.append(dist.all_to_all_single(out, inp, async_op=True))
    checks.append((f"async all_to_all_single {i}", out,
                   torch.cat([val(p * 10 + i, n * 1000, torch.float32)[rank * 1000:(rank + 1) * 1000] for p in range(n)])))
    y = torch.full((100,), float(i))
    works.append(dist.all_reduce(y, async_op=True))
    checks.append((f"async all_reduce {i}", y, torch.full((100,), float(i * n))))
    g = [torch.empty(10) for _ in range(n)] if rank == 0 else None
    works.append(dist.gather(torch.full((10,), float(rank + i)), g, dst=0, async_op=True))
    if rank == 0:
        for p in range(n):
            checks.append((f"async gather {i} from {p}", g[p], torch.full((10,), float(p + i))))
fut = works[0].get_future()
for w in works:
    w.wait()
fut.wait()
for name, got, want in checks:
    check(name, got, want)
print(f"rank {rank}: in flight ok", flush=True)

# A sub-group of the first and the last rank (group ranks 0 and 1 are
# global 0 and n-1): every rank calls new_group; members use it.
sub = dist.new_group([0, n - 1])
if rank in (0, n - 1):
    me = 0 if rank == 0 else 1  # the group rank
    out = torch.empty(6)
    dist.all_to_all_single(out, torch.arange(6, dtype=torch.float32) + 10 * rank, group=sub)
    check("sub-group all_to_all_single", out,
          torch.cat([torch.arange(6, dtype=torch.float32)[3 * me:3 * me + 3] + 10 * r for r in (0, n - 1)]))
    g = [torch.empty(2) for _ in range(2)] if rank == n - 1 else None
    dist.gather(torch.full((2,), float(rank)), g, dst=n - 1, group=sub)  # dst: a global rank
    if rank == n - 1:
        check("sub-group gather", torch.stack(g), torch.tensor([[0.0] * 2, [n - 1.0] * 2]))
print(f"rank {rank}: sub-group ok", flush=True)


# ---- bad input: an error naming the operation; the group stays usable ----
def expect(fn, words):
    try:
        fn()
    except (RuntimeError, ValueError) as e:
        if not all(w in str(e) for w in words):
            raise SystemExit(f"rank {rank}: error {e!r} does not mention {words}")
        return
    raise SystemExit(f"rank {rank}: no error, want one mentioning {words}")


a2a_opts = dist.AllToAllOptions()
expect(lambda: dist.all_to_all_single(torch.empty(n * 2), torch.ones(n * 2), None, [1] * n),
       ["all_to_all_single", "input_split_sizes", "sum"])
expect(lambda: dist.all_to_all_single(torch.empty(n * 2), torch.ones(n * 2), [2] * (n + 1), None),
       ["all_to_all_single", "output_split_sizes", "one per rank"])
expect(lambda: dist.all_to_all_single(torch.empty(n * 2), torch.ones(n * 2 + 1)),
       ["all_to_all_single", "divide"])
expect(lambda: pg.alltoall_base(torch.empty(n * 2), torch.ones(n * 2, dtype=torch.int32), [], [], a2a_opts),
       ["all_to_all_single", "int32", "float32"])
expect(lambda: dist.all_to_all([torch.empty(2) for _ in range(n - 1)], [torch.ones(2) for _ in range(n)]),
       ["all_to_all", str(n)])
expect(lambda: pg.alltoall([torch.empty(2) for _ in range(n)], [torch.ones(2, dtype=torch.int64)] * n, a2a_opts),
       ["all_to_all", "dtype"])
expect(lambda: dist.all_to_all([torch.empty(2) for _ in range(n)], [torch.ones(4, 4).t()] * n),
       ["all_to_all", "contiguous"])
if rank == 0:
    expect(lambda: dist.gather(torch.ones(3), [torch.empty(3) for _ in range(n + 1)], dst=0),
           ["gather", f"list of {n} output"])
    expect(lambda: dist.gather(torch.ones(3), [torch.empty(4) for _ in range(n)], dst=0), ["gather", "match"])
    expect(lambda: dist.scatter(torch.empty(3), [torch.ones(3)] * (n - 1), src=0), ["scatter", f"list of {n} input"])
    sc_opts = dist.ScatterOptions()
    sc_opts.rootRank = 0
    expect(lambda: pg.scatter([torch.empty(3)], [[torch.ones(3, dtype=torch.float64)] * n], sc_opts),
           ["scatter", "float64"])
expect(lambda: pg.allreduce_coalesced([torch.ones(3, dtype=torch.bool)], dist.AllreduceCoalescedOptions()),
       ["all_reduce_coalesced", "bool"])
expect(lambda: pg.recv_anysource([torch.empty(3)], 0), ["recv", "source"])
expect(lambda: dist.all_gather_coalesced([[torch.empty(3) for _ in range(n)]], [torch.ones(3)]),
       ["all_gather_coalesced", "not supported", "all_gather"])
dist.barrier()
x = torch.empty(n * 10)
dist.all_to_all_single(x, torch.full((n * 10,), float(rank)))
check("all_to_all_single after bad input", x, torch.cat([torch.full((10,), float(p)) for p in range(n)]))
g = [torch.empty(2) for _ in range(n)] if rank == 1 else None
dist.gather(torch.full((2,), float(rank)), g, dst=1)
if rank == 1:
    check("gather after bad input", torch.stack(g), torch.arange(n, dtype=torch.float32).view(n, 1).expand(n, 2))
print(f"rank {rank}: bad input ok", flush=True)


# ---- ranks that disagree: every rank raises, within the timeout ----
# The rank that receives a block it disagrees on raises; a rank whose own
# transfers completed first raises at its next collective on that group.
def expect_all_fail(name, fn, group, words, limit):
    t0 = time.monotonic()
    try:
        fn()
        dist.barrier(group=group)
    except RuntimeError as e:
        took = time.monotonic() - t0
        if not all(w in str(e) for w in words) or took > limit:
            raise SystemExit(f"rank {rank}: {name}: error {e!r} after {took:.1f} s; want one mentioning {words} "
                             f"within {limit} s")
        print(f"rank {rank}: {name} raised after {took:.1f} s: {e}", flush=True)
        return
    raise SystemExit(f"rank {rank}: {name}: no error")


limit = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
# Sizes: rank 0 sends rank 1 one row more than rank 1 expects.
g1 = dist.new_group(list(range(n)))
ins_splits = [2] * n
out_splits = [2] * n
if rank == 0:
    ins_splits[1] = 3
expect_all_fail("all_to_all_single with sizes the ranks disagree on",
                lambda: dist.all_to_all_single(torch.empty(sum(out_splits)), torch.ones(sum(ins_splits)), out_splits,
                                               ins_splits, group=g1), g1, ["gpumesh", "AllToAll"], limit)
# Different collectives: rank 0 calls all_to_all_single, the others gather
# to rank 0 (whichever rank reads the other's frame first reports the
# mismatch: AllToAll against Gather, or against the barrier that follows a
# gather whose send completed).
g2 = dist.new_group(list(range(n)))
if rank == 0:
    expect_all_fail("all_to_all_single against gather",
                    lambda: dist.all_to_all_single(torch.empty(n * 4), torch.ones(n * 4), group=g2), g2,
                    ["gpumesh", "all_to_all_single"], limit)
else:
    expect_all_fail("gather against all_to_all_single",
                    lambda: dist.gather(torch.ones(4), None, dst=0, group=g2), g2, ["gpumesh"], limit)
dist.barrier()
print(f"rank {rank}: COMPOSED OK", flush=True)
