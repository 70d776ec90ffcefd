"""A rank ends cleanly (run as ranks of a gpumesh group by
node/localapi/python_test.go): once its process group is destroyed, the
group's connection to the agent is closed and no thread of it is left, so
that nothing of gpumesh runs PyTorch code while the interpreter exits.
(A daemon thread inside PyTorch at exit makes the process die with
SIGABRT, "terminate called without an active exception", after the script
has finished.) Prints "EXIT OK".

With --keep the script exits with its group alive (no destroy, as many
scripts do): the connection is then closed at exit, and the process must
still exit 0 (the caller checks)."""

import sys

import torch
import torch.distributed as dist

import gpumesh.torch  # noqa: F401

keep = "--keep" in sys.argv
dist.init_process_group("gpumesh")
rank, n = dist.get_rank(), dist.get_world_size()
pg = dist.distributed_c10d._get_default_group()
conn = pg._conn

# What a short script does: a blocking all_reduce, asynchronous ones waited
# through their futures (with a callback, as DDP's hooks do), a broadcast.
x = torch.full((8,), float(rank + 1))
dist.all_reduce(x)
assert x.tolist() == [n * (n + 1) / 2] * 8, x
works = [dist.all_reduce(torch.full((1 << k,), 1.0), async_op=True) for k in range(4, 12)]
futs = [w.get_future().then(lambda f: f.value()[0].sum().item()) for w in works]
assert [f.wait() for f in futs] == [float(n << k) for k in range(4, 12)]
y = torch.arange(16, dtype=torch.float32) * (rank + 1)
dist.broadcast(y, 0)
assert y.tolist() == list(range(16)), y
print("ALL OK", flush=True)
if keep:
    sys.exit(0)

dist.destroy_process_group()
del pg, works, futs
# The group's connection closes when the group goes (at exit at the
# latest); once close() has returned, its threads have ended.
conn.close()
alive = [t.name for t in (conn._reader, conn._watchdog) if t.is_alive()]
if alive:
    raise SystemExit(f"threads of the destroyed group still run: {alive}")
print("EXIT OK", flush=True)
