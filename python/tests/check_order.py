"""Operations of one group complete correctly when point-to-point operations
and collectives are in flight together (run with 2 or 3 ranks).

Every rank issues, many times and in the same order, asynchronous sends
and receives around the ring (to the next rank, from the previous one), an
all_reduce, more sends and receives the other way round, an all_gather and
a batch_isend_irecv ring exchange, and only then waits for all of them.
The agent must run them in issue order per group (a collective after every
operation issued before it, a send or receive after the collectives issued
before it) while consecutive sends and receives still run at once: a rank
that ran them in another order than its peer would receive the peer's
collective frame in a recv (a mismatch) or wait for it until the timeout.
Large sends wait for their receiver, so the ring exchange also shows that
sends and receives issued together do not wait for each other.

Arguments: iterations (default 20), then "cuda" to run the same on CUDA
tensors (the agent's CUDA IPC path; asserts that no operation was staged),
or "fail" to check instead that operations queued behind a failing one
raise within argv[3] seconds. Prints "ORDER OK" when every result was
right."""

import os
import sys
import time

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
nxt, prv = (rank + 1) % n, (rank - 1) % n
iters = int(sys.argv[1]) if len(sys.argv) > 1 else 20
mode = sys.argv[2] if len(sys.argv) > 2 else "order"
dev = torch.device("cpu")
if mode == "cuda":
    dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    torch.cuda.set_device(dev)
# Small (one frame, recursive doubling), 1 MiB and 4 MiB of float32 (many
# chunks: a send waits for its receiver).
COUNTS = [1000, 1 << 18, 1 << 20]


def val(r, it, k, count):
    # Distinct per sender, iteration and operation; exact in float32.
    return torch.arange(count, dtype=torch.float32, device=dev) % 1024 + float(r * 100_000 + it * 100 + k * 10_000)


def check(name, got, want):
    if not torch.equal(got, want):
        bad = (got != want).nonzero()[:3].flatten().tolist()
        raise SystemExit(f"rank {rank}: {name}: differs at {bad}: {got[:4].tolist()} vs {want[:4].tolist()}")


def fail_mode(limit):
    # Rank 1 sends 4 elements where rank 0 receives 8: the receive fails
    # (a mismatch); an all_reduce and a send issued after it on every rank
    # must raise too (when issued, if the failure is known by then, or
    # when waited for), within the limit, not at the collective timeout.
    t0 = time.monotonic()
    issue = []
    if rank == 0:
        issue.append(("recv", lambda: dist.irecv(torch.empty(8), 1)))
    elif rank == 1:
        issue.append(("send", lambda: dist.isend(torch.ones(4), 0)))
    issue.append(("all_reduce", lambda: dist.all_reduce(torch.ones(1 << 18), async_op=True)))
    issue.append(("send", lambda: dist.isend(torch.ones(1 << 18), nxt)))
    works, raised = [], []
    for name, f in issue:
        try:
            works.append((name, f()))
        except RuntimeError as e:
            raised.append(name)
            print(f"{name} raised when issued after {time.monotonic() - t0:.2f} s: {e}", flush=True)
    for name, w in works:
        try:
            w.wait()
        except RuntimeError as e:
            raised.append(name)
            print(f"{name} raised after {time.monotonic() - t0:.2f} s: {e}", flush=True)
    took = time.monotonic() - t0
    if "all_reduce" not in raised or took > limit:
        raise SystemExit(f"rank {rank}: want the all_reduce after the failed receive to raise within {limit} s "
                         f"(raised: {raised}, after {took:.1f} s)")


if mode == "fail":
    fail_mode(float(sys.argv[3]))
    print("ORDER OK", flush=True)
    sys.exit(0)

for it in range(iters):
    count = COUNTS[it % len(COUNTS)]
    small = COUNTS[(it + 1) % len(COUNTS)]
    works = []
    # Around the ring, forward.
    r1 = torch.empty(count, device=dev)
    works.append(dist.isend(val(rank, it, 1, count), nxt))
    works.append(dist.irecv(r1, prv))
    ar = val(rank, it, 2, small)
    works.append(dist.all_reduce(ar, async_op=True))
    # Backward.
    r3 = torch.empty(small, device=dev)
    works.append(dist.isend(val(rank, it, 3, small), prv))
    works.append(dist.irecv(r3, nxt))
    ag = [torch.empty(count, device=dev) for _ in range(n)]
    works.append(dist.all_gather(ag, val(rank, it, 4, count), async_op=True))
    # A batch: send to the next rank and receive from the previous at once.
    r5 = torch.empty(count, device=dev)
    works += dist.batch_isend_irecv([dist.P2POp(dist.isend, val(rank, it, 5, count), nxt),
                                     dist.P2POp(dist.irecv, r5, prv)])
    bc = val(rank, it, 6, small)
    works.append(dist.broadcast(bc, src=it % n, async_op=True))
    for w in works:
        w.wait()
    check(f"iteration {it}: recv from {prv}", r1, val(prv, it, 1, count))
    check(f"iteration {it}: all_reduce", ar, sum(val(r, it, 2, small) for r in range(n)))
    check(f"iteration {it}: recv from {nxt}", r3, val(nxt, it, 3, small))
    for r in range(n):
        check(f"iteration {it}: all_gather block {r}", ag[r], val(r, it, 4, count))
    check(f"iteration {it}: batch recv from {prv}", r5, val(prv, it, 5, count))
    check(f"iteration {it}: broadcast", bc, val(it % n, it, 6, small))

if mode == "cuda":
    st = dist.distributed_c10d._get_default_group().cuda_stats()
    assert st["off"] is None and st["staged"] == 0 and st["registered"] > 0, st
    print(f"CUDA IPC path: {st}", flush=True)
dist.destroy_process_group()
print(f"ORDER OK ({iters} iterations)", flush=True)
