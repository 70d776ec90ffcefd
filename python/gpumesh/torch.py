"""The ``torch.distributed`` backend ``"gpumesh"``.

Importing this module registers the backend::

    import gpumesh.torch  # noqa: F401
    dist.init_process_group("gpumesh")

Every collective of the group is performed by the gpumesh agent of this
node on the cluster's data plane (rings over the agents' TCP lanes; ranks on
one node meet inside their agent). The process finds its agent through the
variables the agent sets for every exec task (GPUMESH_LOCAL_SOCKET,
GPUMESH_LOCAL_SECRET, GPUMESH_JOB_ID, GPUMESH_GENERATION, RANK).

Copies per operation (host tensors): none in the rank for a tensor of at
least 256 KiB whose storage is used again (DDP's gradient buckets, reused
buffers): the second time such a storage is seen it moves, once and in
place, into a segment the agent maps (_zerocopy), and the agent's ring
works in the tensor's memory. Other tensors are staged: copied into a
shared segment before the operation (one memcpy) and back into the tensor
when it ends (one memcpy). GPUMESH_ZERO_COPY=0 stages every host tensor.

Copies per operation (CUDA tensors; GPUMESH_CUDA_IPC=0 turns the path off
and stages every CUDA tensor as below): none in the rank and none
through host memory. The tensor's allocation is registered with the agent by CUDA
IPC handle once (_cudaipc) and the agent runs the collective in the
rank's device memory: between two ranks of one agent a hop is a device
copy or a reduce kernel reading the other rank's memory. What remains:
reduce_scatter_tensor's input is cloned on the device (the ring reduces in
its input, which the caller keeps); the list forms of all_gather and
reduce_scatter copy to or from their list on the device; an operation
waits on the host for the rank's stream (an IPC event) in the agent, and
the agent synchronises its streams before it answers. Tensors the path
cannot take (bool, empty, mixed devices, memory without an IPC handle,
an agent without CUDA) are staged through host
segments (a device-to-host copy in, a host-to-device copy out).

Operations are asynchronous: each returns a Work whose future completes when
the agent answers; several may be in flight (DDP overlaps its bucket
all-reduces with the backward pass). A group's operations run in issue
order, as NCCL's do within a communicator: a collective after everything
issued before it, a send or recv after the collectives issued before it;
consecutive sends and recvs (batch_isend_irecv) run at once, in order per
peer and direction. Every rank must issue a group's collectives, and its
sends and recvs relative to them, in the same order. A caller that
waits reads its answer itself; futures are completed by a background thread
(_client.Connection.wait_for; GPUMESH_CALLER_READS=0 leaves every answer to
that thread).

Supported: all_reduce (sum, avg, product, min, max), all_reduce_coalesced,
broadcast, all_gather, all_gather_into_tensor, reduce_scatter,
reduce_scatter_tensor, reduce (as an all-reduce), all_to_all,
all_to_all_single (equal, uneven and empty splits), gather, scatter (and so
gather_object, scatter_object_list), send, recv (with a source rank),
barrier; float32, float64, float16, bfloat16, int32, int64, uint8 tensors
(also bool, as uint8). Anything else raises an error that names it.

all_to_all, all_to_all_single, gather and scatter are one agent operation
each (a table of blocks, one per peer): the agent moves every block between
each pair of ranks over their own link, all pairs at once, nothing relayed
through a third rank, in order with the other collectives; the rank's own
block is copied by the rank (on its current stream for CUDA tensors). Their
tensors take the paths above: a host tensor is staged (in and out) unless
its storage was moved into a segment; CUDA tensors are used in place.
all_reduce_coalesced packs each dtype's tensors into one buffer (host: a
staging segment, one copy in and one back; CUDA: one device buffer, a
device copy in and back), one all-reduce per dtype.

``allreduce_hook`` is a DDP communication hook for scripts that keep Gloo or
NCCL as their process group and send only the gradients through gpumesh::

    model.register_comm_hook(gpumesh.torch.hook_state(), gpumesh.torch.allreduce_hook)
"""

import collections
import datetime
import inspect
import os
import threading
import weakref

import torch
import torch.distributed as dist

from gpumesh import _client, _cudaipc, _zerocopy

BACKEND = "gpumesh"

# At most how many Work objects a group keeps alive for C++ callers (see
# _Keep).
_KEEP_WORKS = 64

_WorkBase = getattr(dist, "_Work", None) or dist.Work

_DTYPES = {
    torch.float32: 1,
    torch.float64: 2,
    torch.float16: 3,
    torch.bfloat16: 4,
    torch.int32: 5,
    torch.int64: 6,
    torch.uint8: 7,
    torch.bool: 7,
}

_OP_SUM, _OP_AVG, _OP_MAX, _OP_MIN, _OP_PROD = 1, 2, 3, 4, 5
_STRIDED = torch.strided


def _reduce_table():
    R = dist.ReduceOp
    table = [(R.SUM, _OP_SUM), (R.PRODUCT, _OP_PROD), (R.MIN, _OP_MIN), (R.MAX, _OP_MAX)]
    if hasattr(R, "AVG"):
        table.append((R.AVG, _OP_AVG))
    return table


_REDUCE_TABLE = _reduce_table()
# The same by the op's hash where ReduceOp hashes by value (PyTorch 1.13's
# enum): one lookup per operation instead of a comparison per entry. An op
# that is not found here (other versions: a hash by identity, or none) takes
# the comparisons.
_REDUCE_BY_OP = {}
for _r, _code in _REDUCE_TABLE:
    try:
        _REDUCE_BY_OP[_r] = _code
    except TypeError:
        _REDUCE_BY_OP = {}
        break


def _reduce_code(op):
    try:
        return _REDUCE_BY_OP[op]
    except (KeyError, TypeError):
        pass
    for r, code in _REDUCE_TABLE:
        try:
            if op == r:
                return code
        except TypeError:
            continue
    raise RuntimeError(f"gpumesh: reduce op {op} is not supported (use SUM, AVG, PRODUCT, MIN or MAX)")


def _seconds(t):
    if t is None:
        return None
    if isinstance(t, datetime.timedelta):
        s = t.total_seconds()
    else:
        s = float(t)
    return s if s > 0 else None


class _Staged:
    """Where a tensor is for one operation: in its own storage (view None)
    or in a staging segment (view: its place there)."""

    __slots__ = ("seg", "off", "tensor", "view", "rid")

    def __init__(self, seg, off, tensor, view, rid):
        self.seg, self.off, self.tensor, self.view, self.rid = seg, off, tensor, view, rid


class _Flag:
    """Whether a Work has completed, for Works that wait through their
    connection (Connection.wait_for looks at is_set and is woken by the
    reading thread, never by the flag): a threading.Event costs a Condition
    and a lock per operation, and its set() takes that lock."""

    __slots__ = ("_set",)

    def __init__(self):
        self._set = False

    def set(self):
        self._set = True

    def is_set(self):
        return self._set


class _Failed:
    __slots__ = ("msg",)

    def __init__(self, msg):
        self.msg = msg


def _unwrap(fut):
    v = fut.value()
    if isinstance(v, _Failed):
        raise RuntimeError(v.msg)
    return v


class _Keep:
    """The Work objects a group keeps alive for C++ callers.

    C++ callers (DDP's parameter broadcast and checks) hold our Work objects
    only by their C++ half; once the Python object is gone, C++ wait() no
    longer reaches our override and waits forever (PyTorch 1.13). So a group
    keeps each Work until it has completed and has been asked for (wait()
    or get_future(): after that, C++ code holds the future, and Python
    callers their own reference), and never more than _KEEP_WORKS of them
    (the oldest go first), so that finished operations do not hold their
    tensors."""

    def __init__(self, limit=_KEEP_WORKS):
        self._lock = threading.Lock()
        self._works = collections.OrderedDict()
        self._limit = limit
        self.conn = None  # the group's connection: its Work objects wait through it

    def add(self, work):
        with self._lock:
            self._works[id(work)] = work
            while len(self._works) > self._limit:
                self._works.popitem(last=False)

    def done(self, work):
        with self._lock:
            self._works.pop(id(work), None)

    def __len__(self):
        with self._lock:
            return len(self._works)


class Work(_WorkBase):
    """An operation in flight. wait() blocks until the agent has answered (and
    the result is copied back); get_future() completes at the same time."""

    def __init__(self, result, what, timeout, keep=None):
        super().__init__()
        self._keep = keep
        self._conn = getattr(keep, "conn", None)
        self._asked = False
        self._result = result
        self._what = what
        self._timeout = timeout
        self._event = _Flag() if self._conn is not None else threading.Event()
        self._error = None
        # The future is made when it is asked for (get_future: DDP's
        # buckets), not for every operation (dist.all_reduce waits on the
        # Work): making and completing one costs as much as the rest of the
        # rank's side of a small operation. Exactly one of _complete and
        # get_future completes it: whichever comes second (_flock).
        self._flock = threading.Lock()
        self._done = False
        self._raw = None
        self._future = None

    def _complete(self, error):
        self._error = error
        self._event.set()
        with self._flock:
            self._done = True
            raw = self._raw
        if raw is not None:
            raw.set_result(self._value())
        if self._asked and self._keep is not None:
            self._keep.done(self)

    def _value(self):
        return _Failed(self._error) if self._error is not None else self._result

    def _ask(self):
        self._asked = True
        if self._event.is_set() and self._keep is not None:
            self._keep.done(self)

    def wait(self, timeout=None):
        self._ask()
        t = _seconds(timeout) or self._timeout
        # Through the connection: the waiting thread reads the agent's
        # answer itself where it can (_client.Connection.wait_for).
        done = self._conn.wait_for(self._event, t) if self._conn is not None else self._event.wait(t)
        if not done:
            raise RuntimeError(f"gpumesh: {self._what} did not complete within {t:.0f} s")
        if self._error is not None:
            raise RuntimeError(self._error)
        return True

    def get_future(self):
        made = False
        with self._flock:
            if self._future is None:
                # The future callers see is a continuation of _raw that
                # raises on failure: a callback that raises marks the
                # continuation failed in C++ too, so DDP's reducer (which
                # reads the value in C++) gets an exception. (PyTorch 1.13's
                # Future.set_exception only stores the exception as the
                # value, which C++ code would take for a result.)
                self._raw = torch.futures.Future()
                self._future = self._raw.then(_unwrap)
                made = True
            fut, done = self._future, self._done
        if made and done:
            self._raw.set_result(self._value())
        self._ask()
        if self._conn is not None and not done:
            # Nobody may wait in Python: the connection's background thread
            # completes the future.
            self._conn.read_in_background()
        return fut

    def is_completed(self):
        return self._event.is_set()

    def is_success(self):
        return self._event.is_set() and self._error is None

    def exception(self):
        return None if self._error is None else RuntimeError(self._error)

    def result(self):
        return self._result

    def synchronize(self):
        pass

    def source_rank(self):
        return -1

    def _source_rank(self):
        return -1


def _flat(t, what):
    # The common case in a few cheap checks (this runs for every operation).
    if (type(t) is torch.Tensor and t.layout is _STRIDED and t.is_contiguous() and (t.is_cpu or t.is_cuda)
            and t.dtype in _DTYPES):
        return t if t.dim() == 1 else t.view(-1)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"gpumesh: {what}: expected a tensor, got {type(t).__name__}")
    if t.is_sparse:
        raise RuntimeError(f"gpumesh: {what}: sparse tensors are not supported")
    if not t.is_contiguous():
        raise RuntimeError(f"gpumesh: {what}: the tensor is not contiguous (call .contiguous() first)")
    if t.dtype not in _DTYPES:
        raise RuntimeError(
            f"gpumesh: {what}: dtype {t.dtype} is not supported "
            "(float32, float64, float16, bfloat16, int32, int64, uint8, bool)")
    if t.device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"gpumesh: {what}: tensors on {t.device.type} are not supported (cpu, cuda)")
    return t.view(-1) if t.dim() != 1 else t


def _blocks(what, name, shape, split_sizes, n):
    """The (element offset, element count) of each rank's block of a tensor
    of shape, split along its first dimension by split_sizes (empty or None:
    equally), as all_to_all_single splits its input and output."""
    rows, per = (shape[0], 1) if shape else (1, 1)
    for d in shape[1:]:
        per *= d
    if not split_sizes:
        if rows % n:
            raise RuntimeError(
                f"gpumesh: {what}: {name}'s first dimension ({rows}) does not divide by the group size ({n}); "
                f"pass {name}_split_sizes")
        sizes = [rows // n] * n
    else:
        sizes = [int(s) for s in split_sizes]
        if len(sizes) != n:
            raise RuntimeError(f"gpumesh: {what}: {name}_split_sizes has {len(sizes)} entries, want one per rank ({n})")
        if any(s < 0 for s in sizes):
            raise RuntimeError(f"gpumesh: {what}: {name}_split_sizes {sizes} has a negative size")
        if sum(sizes) != rows:
            raise RuntimeError(
                f"gpumesh: {what}: {name}_split_sizes {sizes} sum to {sum(sizes)}, but {name}'s first dimension "
                f"is {rows}")
    out, off = [], 0
    for s in sizes:
        out.append((off * per, s * per))
        off += s
    return out


def _overlap(a, b):
    """Whether tensors a and b (flat, contiguous) share memory."""
    if a.device != b.device or not a.numel() or not b.numel():
        return False
    pa, pb = a.data_ptr(), b.data_ptr()
    return pa < pb + b.numel() * b.element_size() and pb < pa + a.numel() * a.element_size()


def _same_dtype(what, tensors):
    for t in tensors[1:]:
        if t.dtype != tensors[0].dtype:
            raise RuntimeError(f"gpumesh: {what}: the tensors must have one dtype, got {tensors[0].dtype} and {t.dtype}")


def _same_shape(what, name, like, tensors):
    for t in tensors:
        if t.numel() != like.numel() or t.dtype != like.dtype:
            raise RuntimeError(
                f"gpumesh: {what}: every {name} tensor must match {like.dtype}[{like.numel()}], got {t.dtype}[{t.numel()}]")


class ProcessGroupGpumesh(dist.ProcessGroup):
    """A process group whose collectives the local gpumesh agent performs."""

    def __init__(self, rank, size, *, group_id, global_ranks, timeout, env=None):
        super().__init__(rank, size)
        env = os.environ if env is None else env
        sock, secret = env.get(_client.ENV_SOCKET), env.get(_client.ENV_SECRET)
        job, gen = env.get("GPUMESH_JOB_ID"), env.get("GPUMESH_GENERATION")
        grank = env.get("GPUMESH_RANK", env.get("RANK"))
        off = env.get(_client.ENV_LOCAL_API_OFF)
        if (not sock or not secret) and off:
            raise RuntimeError(
                f"gpumesh backend: {off}. The backend needs that API, so every restart of this rank on that node "
                "fails the same way: fix and restart the agent as the reason says, or use backend 'gloo' (CPU) "
                "or 'nccl' (GPU) for this job.")
        if (not sock or not secret) and job:
            raise RuntimeError(
                f"gpumesh backend: job {job} gave this rank no way to its agent ({_client.ENV_SOCKET} or "
                f"{_client.ENV_SECRET} is not set): the node's agent runs without its local API, and its log says "
                "why ('the local data-plane API (PyTorch backend) is off'). Fix and restart that agent, or use "
                "backend 'gloo' (CPU) or 'nccl' (GPU) for this job.")
        if not sock or not secret or not job or not gen or grank is None:
            raise RuntimeError(
                "gpumesh backend: this process is not an exec rank of a gpumesh job "
                f"({_client.ENV_SOCKET}, {_client.ENV_SECRET}, GPUMESH_JOB_ID or GPUMESH_GENERATION is not set). "
                "Run the script with `gpumesh job run`, or use backend 'gloo' or 'nccl' outside gpumesh.")
        self._timeout = _seconds(timeout) or 1800.0
        self._keep = _Keep()
        self._rank, self._size = rank, size
        # GPUMESH_CALLER_READS=0: a reader thread completes every operation
        # (a waiting caller is woken by it) instead of the waiting caller
        # reading its answer itself.
        self._conn = _client.Connection(
            socket_path=sock, secret=secret, job=job, generation=int(gen), rank=int(grank),
            group_id=group_id, group_rank=rank, ranks=list(global_ranks), timeout=self._timeout,
            caller_reads=env.get("GPUMESH_CALLER_READS", "1") != "0")
        self._keep.conn = self._conn
        # Host tensors used again and again (DDP's buckets) move into
        # agent-mapped segments (_zerocopy); GPUMESH_ZERO_COPY=0 turns it off.
        self._zc = None if env.get("GPUMESH_ZERO_COPY", "1") == "0" else _zerocopy.ZeroCopy(self._conn)
        # CUDA tensors by CUDA IPC handle (_cudaipc); GPUMESH_CUDA_IPC=0
        # stages them through host memory instead.
        self._ipc = _cudaipc.CudaIPC(self._conn, torch=torch)
        if env.get("GPUMESH_CUDA_IPC", "1") == "0":
            self._ipc._off = "GPUMESH_CUDA_IPC=0"
        weakref.finalize(self, self._conn.close)

    # ---- plumbing ----

    def getBackendName(self):
        return BACKEND

    def _stage(self, tensors, n_in, copy_inputs, what=None):
        """Places flat, contiguous tensors for one operation: a tensor whose
        storage lives in an agent-mapped segment (see _zerocopy) is named
        where it is; the others get a place in one staging segment (64-byte
        aligned), and the first n_in of those are copied in. Tensors whose
        index is in copy_inputs are never used in place."""
        zc = self._zc
        staged = [None] * len(tensors)
        todo = []
        for i, t in enumerate(tensors):
            d = zc.ref(t) if (zc is not None and t.numel() and i not in copy_inputs) else None
            if d is not None:
                staged[i] = _Staged(None, d[1], t, None, d[0])
            else:
                todo.append(i)
        if not todo:
            return None, staged
        total = 0
        offs = []
        for i in todo:
            t = tensors[i]
            total = (total + 63) & ~63
            offs.append(total)
            total += t.numel() * t.element_size()
        seg = self._conn.acquire(max(total, 1), what)
        for i, off in zip(todo, offs):
            t = tensors[i]
            n = t.numel()
            dt = torch.uint8 if t.dtype == torch.bool else t.dtype
            view = torch.frombuffer(seg.mm, dtype=dt, count=n, offset=off) if n else None
            if i < n_in and n:
                view.copy_(t.view(dt) if dt != t.dtype else t)
            staged[i] = _Staged(seg, off, t, view, seg.id)
        return seg, staged

    def _issue(self, kind, what, dtype_of, inputs, outputs, a_idx, b_idx, reduce_op=0, peer=0, tag=0, result=None,
               post=None, copy_inputs=()):
        """Runs one operation: the agent runs kind on buffers A and B
        (indices into inputs followed by the outputs that are not inputs),
        in place where a tensor lives in a segment, else through a staging
        segment (inputs copied in, outputs copied back when it answers).
        copy_inputs: indices of inputs the agent would overwrite but the
        caller must keep (always staged)."""
        code = _DTYPES[dtype_of.dtype] if dtype_of is not None else 0
        # Outputs that are also inputs (in place) share the input's place:
        # tensors is the inputs, then the other outputs; out_idx, where
        # each output is in it. (Plain loops: this runs for every operation.)
        tensors = list(inputs)
        out_idx = []
        cuda = False
        for t in inputs:
            cuda = cuda or t.is_cuda
        for o in outputs:
            for j, t in enumerate(inputs):
                if o is t:
                    out_idx.append(j)
                    break
            else:
                out_idx.append(len(tensors))
                tensors.append(o)
                cuda = cuda or o.is_cuda
        if cuda:
            work = self._issue_cuda(kind, what, code, inputs, tensors[len(inputs):], a_idx, b_idx, reduce_op, peer,
                                    tag, result, post, copy_inputs)
            if work is not None:
                return work
        work = Work(result, what, self._timeout + 10.0, self._keep)
        self._keep.add(work)
        conn = self._conn
        seg, st = self._stage(tensors, len(inputs), copy_inputs, what)
        outs = [st[j] for j in out_idx if st[j].view is not None]
        a = None if a_idx is None else st[a_idx]
        b = None if b_idx is None else st[b_idx]

        def on_done(err):
            try:
                if err is None:
                    for s in outs:
                        t = s.tensor
                        (t.view(torch.uint8) if t.dtype == torch.bool else t).copy_(s.view)
                    if post is not None:
                        post()
            except Exception as e:  # a copy-out failure is the op's failure
                err = f"copying the result back: {e}"
            finally:
                if seg is not None:
                    conn.release(seg)
            work._complete(None if err is None else f"gpumesh: {what} failed: {err}")

        try:
            conn.submit(kind, code, reduce_op, peer, tag,
                        None if a is None else (a.rid, a.off, a.tensor.numel()),
                        None if b is None else (b.rid, b.off, b.tensor.numel()), on_done, what)
        except Exception:
            if seg is not None:
                conn.release(seg)
            raise
        return work

    def _issue_cuda(self, kind, what, code, inputs, extra, a_idx, b_idx, reduce_op, peer, tag, result, post,
                    copy_inputs):
        """_issue for CUDA tensors of one GPU: the agent works in their
        memory through CUDA IPC (_cudaipc). None: stage them instead."""
        tensors = inputs + extra
        dev = tensors[0].device
        if any(t.device != dev or t.numel() == 0 or t.dtype == torch.bool for t in tensors):
            return None
        # Inputs the agent would overwrite but the caller keeps: a device copy.
        tensors = [t.clone() if i in copy_inputs else t for i, t in enumerate(tensors)]
        refs = self._ipc.refs(tensors)
        if refs is None:
            return None
        work = Work(result, what, self._timeout + 10.0, self._keep)
        self._keep.add(work)

        def ref(i):
            return None if i is None else (refs[i][0], refs[i][1], tensors[i].numel())

        def on_done(err, keep=tensors):
            try:
                if err is None and post is not None:
                    post()
            except Exception as e:
                err = f"finishing the result: {e}"
            work._complete(None if err is None else f"gpumesh: {what} failed: {err}")

        self._conn.submit(kind, code, reduce_op, peer, tag, ref(a_idx), ref(b_idx), on_done, what)
        return work

    def _issue_parts(self, what, parts, result, seg=None, post=None, keep=None):
        """Runs several agent operations as one: parts are (kind, dtype
        code, reduce op, peer, tag, A ref, label). The Work completes when
        every part has answered: failed with the first failure (its label
        names the part) if any failed, else after post() (copies out). seg,
        the staging segment the parts use, goes back to the pool only then.
        keep: what must stay alive until then (device tensors the agent
        works in)."""
        work = Work(result, what, self._timeout + 10.0, self._keep)
        self._keep.add(work)
        conn = self._conn
        lock = threading.Lock()
        state = [len(parts), None]  # parts still due, first error

        def finish(err, keep=keep):
            try:
                if err is None and post is not None:
                    post()
            except Exception as e:  # a copy-out failure is the op's failure
                err = f"copying the result back: {e}"
            finally:
                if seg is not None:
                    conn.release(seg)
            work._complete(None if err is None else f"gpumesh: {what} failed: {err}")

        def done(label, err):
            with lock:
                state[0] -= 1
                if err is not None and state[1] is None:
                    state[1] = f"{label}: {err}"
                last = state[0] == 0
                err = state[1]
            if last:
                finish(err)

        if not parts:
            finish(None)
            return work
        for i, (kind, code, red, peer, tag, a, label) in enumerate(parts):
            try:
                conn.submit(kind, code, red, peer, tag, a, None, lambda err, label=label: done(label, err), what)
            except Exception as e:
                if i == 0:
                    # Nothing in flight: fail now, as a single operation does.
                    self._keep.done(work)
                    if seg is not None:
                        conn.release(seg)
                    raise
                # Parts in flight use seg: the Work completes (failed) when
                # they have answered; the rest count as failed now.
                for _, _, _, _, _, _, rest in parts[i:]:
                    done(rest, f"not issued: {e}")
                break
        return work

    def _issue_table(self, kind, what, root, tensors, n_in, send, recv, result):
        """Runs an all-to-all, gather or scatter: tensors are flat tensors
        of one dtype, the first n_in sent from and the rest received into;
        send[p] and recv[p] are the (tensor index, element offset, count) of
        the block sent to and received from group rank p, or None. The agent
        moves every block in one operation (a table of blocks, see
        node/localapi/proto.go): each pair of ranks over its own link, all
        at once. The rank's own block (send[rank] to recv[rank]) is copied
        here, before the operation is sent; the agent never touches it.
        Device tensors are named by CUDA IPC handle; host tensors where they
        are when their storage is in an agent-mapped segment (_zerocopy),
        else in one staging segment (inputs copied in before, outputs copied
        back after)."""
        dt = tensors[0].dtype
        code = _DTYPES[dt]
        es = tensors[0].element_size()
        places = None
        seg, outs = None, []
        dev = tensors[0].device
        if dev.type == "cuda" and dt != torch.bool and all(t.device == dev for t in tensors):
            # Empty tensors (empty blocks) name no memory.
            full = [t for t in tensors if t.numel()]
            refs = self._ipc.refs(full) if full else []
            if refs is not None:
                it = iter(refs)
                places = [(*next(it), None) if t.numel() else (0, 0, None) for t in tensors]
        if places is None:
            seg, st = self._stage(tensors, n_in, (), what)
            places = [(s.rid, s.off, s.view) for s in st]
            outs = [st[i] for i in range(n_in, len(tensors)) if st[i].view is not None]
        me = self._rank
        try:
            mine, into = send[me], recv[me]
            if mine is not None and into is not None and into[2]:
                (si, so, sn), (di, do, dn) = mine, into
                src = tensors[si]
                view = places[di][2]
                dst = view if view is not None else tensors[di]
                if src.dtype == torch.bool:
                    src = src.view(torch.uint8)
                if dst.dtype == torch.bool:
                    dst = dst.view(torch.uint8)
                dst[do:do + dn].copy_(src[so:so + sn])
        except Exception:
            if seg is not None:
                self._conn.release(seg)
            raise

        def ref(b):
            if b is None or not b[2]:
                return None
            rid, base, _ = places[b[0]]
            return (rid, base + b[1] * es, b[2])

        table = [(None, None) if p == me else (ref(send[p]), ref(recv[p])) for p in range(self._size)]
        work = Work(result, what, self._timeout + 10.0, self._keep)
        self._keep.add(work)
        conn = self._conn

        def on_done(err, keep=tensors):
            try:
                if err is None:
                    for s in outs:
                        t = s.tensor
                        (t.view(torch.uint8) if t.dtype == torch.bool else t).copy_(s.view)
            except Exception as e:  # a copy-out failure is the op's failure
                err = f"copying the result back: {e}"
            finally:
                if seg is not None:
                    conn.release(seg)
            work._complete(None if err is None else f"gpumesh: {what} failed: {err}")

        try:
            conn.submit(kind, code, 0, root, 0, None, None, on_done, what, table=table)
        except Exception:
            self._keep.done(work)
            if seg is not None:
                conn.release(seg)
            raise
        return work

    def cuda_stats(self):
        """Counts of the CUDA IPC path (hits: operations on an allocation
        already registered; registered: handles sent; staged: operations
        staged through host memory instead; off: why the path is off)."""
        return dict(self._ipc.stats, off=self._ipc.off)

    # ---- collectives ----

    def allreduce(self, tensors, opts=None):
        op = _reduce_code(opts.reduceOp) if opts is not None else _OP_SUM
        if len(tensors) != 1:
            raise RuntimeError(f"gpumesh: all_reduce takes one tensor per process, got {len(tensors)}")
        t = _flat(tensors[0], "all_reduce")
        if t.dtype == torch.bool and op not in (_OP_MAX, _OP_MIN):
            raise RuntimeError("gpumesh: all_reduce of bool tensors supports MAX and MIN only")
        return self._issue(_client.OP_ALLREDUCE, "all_reduce", t, [t], [t], 0, None, reduce_op=op, result=tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        """all_reduce_coalesced: the tensors of each dtype are packed into
        one buffer (host: a staging segment; CUDA: a device buffer), reduced
        by one all_reduce, and copied back."""
        what = "all_reduce_coalesced"
        op = _reduce_code(opts.reduceOp) if opts is not None else _OP_SUM
        flats = [_flat(t, what) for t in tensors]
        groups = collections.OrderedDict()  # dtype -> flat tensors, in order
        for t in flats:
            if t.dtype == torch.bool and op not in (_OP_MAX, _OP_MIN):
                raise RuntimeError(f"gpumesh: {what} of bool tensors supports MAX and MIN only")
            if t.numel():
                groups.setdefault(t.dtype, []).append(t)
        if not groups:
            return self._issue_parts(what, [], tensors)
        dev = flats[0].device
        if dev.type == "cuda" and torch.bool not in groups and all(t.device == dev for t in flats):
            bufs = [torch.cat(g) for g in groups.values()]
            refs = self._ipc.refs(bufs)
            if refs is not None:
                parts = [(_client.OP_ALLREDUCE, _DTYPES[b.dtype], op, 0, 0, (rid, off, b.numel()), f"the {b.dtype} tensors")
                         for b, (rid, off) in zip(bufs, refs)]

                def unpack():
                    for b, g in zip(bufs, groups.values()):
                        at = 0
                        for t in g:
                            t.copy_(b[at:at + t.numel()])
                            at += t.numel()
                    torch.cuda.current_stream(dev).synchronize()
                return self._issue_parts(what, parts, tensors, post=unpack, keep=bufs)
        # Host memory (or CUDA tensors the IPC path cannot take): each
        # dtype's tensors packed into a staging segment, back after.
        total, layout = 0, []
        for dt, g in groups.items():
            total = (total + 63) & ~63
            count = sum(t.numel() for t in g)
            layout.append((dt, g, total, count))
            total += count * g[0].element_size()
        seg = self._conn.acquire(max(total, 1), what)
        views, parts = [], []
        try:
            for dt, g, off, count in layout:
                vdt = torch.uint8 if dt == torch.bool else dt
                at = off
                for t in g:
                    v = torch.frombuffer(seg.mm, dtype=vdt, count=t.numel(), offset=at)
                    tv = t.view(vdt) if vdt != dt else t
                    v.copy_(tv)
                    views.append((tv, v))
                    at += t.numel() * t.element_size()
                parts.append((_client.OP_ALLREDUCE, _DTYPES[dt], op, 0, 0, (seg.id, off, count), f"the {dt} tensors"))
        except Exception:
            self._conn.release(seg)
            raise

        def unpack_host():
            for t, v in views:
                t.copy_(v)
        return self._issue_parts(what, parts, tensors, seg=seg, post=unpack_host)

    def reduce(self, tensors, opts=None):
        # Every rank receives the result; the root's is what reduce promises.
        op = _reduce_code(opts.reduceOp) if opts is not None else _OP_SUM
        t = _flat(tensors[0], "reduce")
        return self._issue(_client.OP_ALLREDUCE, "reduce", t, [t], [t], 0, None, reduce_op=op, result=tensors)

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank if opts is not None else 0
        if len(tensors) != 1:
            raise RuntimeError(f"gpumesh: broadcast takes one tensor per process, got {len(tensors)}")
        t = _flat(tensors[0], "broadcast")
        # The root's tensor goes in; every other rank's comes out.
        if self._rank == root:
            return self._issue(_client.OP_BROADCAST, "broadcast", t, [t], [], 0, None, peer=root, result=tensors)
        return self._issue(_client.OP_BROADCAST, "broadcast", t, [], [t], 0, None, peer=root, result=tensors)

    def allgather(self, output_tensors, input_tensors, opts=None):
        if len(input_tensors) != 1 or len(output_tensors) != 1:
            raise RuntimeError("gpumesh: all_gather takes one tensor (and one output list) per process")
        inp = _flat(input_tensors[0], "all_gather")
        outs = output_tensors[0]
        if len(outs) != self._size:
            raise RuntimeError(f"gpumesh: all_gather needs {self._size} output tensors, got {len(outs)}")
        for o in outs:
            if o.numel() != inp.numel() or o.dtype != inp.dtype:
                raise RuntimeError(
                    f"gpumesh: all_gather output tensors must match the input ({inp.dtype}[{inp.numel()}]), "
                    f"got {o.dtype}[{o.numel()}]")
        flat = torch.empty(inp.numel() * self._size, dtype=inp.dtype, device=inp.device)
        k = inp.numel()

        def scatter():
            for i, o in enumerate(outs):
                o.copy_(flat[i * k:(i + 1) * k].view_as(o))
            if flat.is_cuda:
                torch.cuda.current_stream(flat.device).synchronize()
        return self._issue(_client.OP_ALLGATHER, "all_gather", inp, [inp], [flat], 1, 0, result=output_tensors,
                           post=scatter)

    def _allgather_base(self, output, input, opts=None):
        inp = _flat(input, "all_gather_into_tensor")
        out = _flat(output, "all_gather_into_tensor")
        if out.numel() != inp.numel() * self._size or out.dtype != inp.dtype:
            raise RuntimeError(
                f"gpumesh: all_gather_into_tensor output must be {inp.dtype}[{inp.numel() * self._size}], "
                f"got {out.dtype}[{out.numel()}]")
        return self._issue(_client.OP_ALLGATHER, "all_gather_into_tensor", inp, [inp], [out], 1, 0, result=[output])

    def reduce_scatter(self, output_tensors, input_tensors, opts=None):
        op = _reduce_code(opts.reduceOp) if opts is not None else _OP_SUM
        if len(output_tensors) != 1 or len(input_tensors) != 1:
            raise RuntimeError("gpumesh: reduce_scatter takes one output tensor (and one input list) per process")
        out = _flat(output_tensors[0], "reduce_scatter")
        ins = input_tensors[0]
        if len(ins) != self._size:
            raise RuntimeError(f"gpumesh: reduce_scatter needs {self._size} input tensors, got {len(ins)}")
        for i in ins:
            if i.numel() != out.numel() or i.dtype != out.dtype:
                raise RuntimeError(
                    f"gpumesh: reduce_scatter input tensors must match the output ({out.dtype}[{out.numel()}]), "
                    f"got {i.dtype}[{i.numel()}]")
        flat = torch.cat([_flat(i, "reduce_scatter") for i in ins]) if ins else out.new_empty(0)
        return self._issue(_client.OP_REDUCESCATTER, "reduce_scatter", out, [flat], [out], 1, 0, reduce_op=op,
                           result=output_tensors)

    def _reduce_scatter_base(self, output, input, opts=None):
        op = _reduce_code(opts.reduceOp) if opts is not None else _OP_SUM
        out = _flat(output, "reduce_scatter_tensor")
        inp = _flat(input, "reduce_scatter_tensor")
        if inp.numel() != out.numel() * self._size or inp.dtype != out.dtype:
            raise RuntimeError(
                f"gpumesh: reduce_scatter_tensor input must be {out.dtype}[{out.numel() * self._size}], "
                f"got {inp.dtype}[{inp.numel()}]")
        # The agent reduces in place in its input: the caller's is staged.
        return self._issue(_client.OP_REDUCESCATTER, "reduce_scatter_tensor", out, [inp], [out], 1, 0, reduce_op=op,
                           result=[output], copy_inputs=(0,))

    def send(self, tensors, dst, tag=0):
        t = _flat(tensors[0], "send")
        return self._issue(_client.OP_SEND, f"send to rank {dst}", t, [t], [], 0, None, peer=dst, tag=tag,
                           result=tensors)

    def recv(self, tensors, src, tag=0):
        t = _flat(tensors[0], "recv")
        return self._issue(_client.OP_RECV, f"recv from rank {src}", t, [], [t], 0, None, peer=src, tag=tag,
                           result=tensors)

    def recv_anysource(self, tensors, tag=0):
        raise RuntimeError("gpumesh: recv without a source rank is not supported (pass src=)")

    def allgather_coalesced(self, output_lists, input_tensors, opts=None):
        raise RuntimeError("gpumesh: all_gather_coalesced is not supported (call all_gather for each tensor)")

    def barrier(self, opts=None):
        return self._issue(_client.OP_BARRIER, "barrier", None, [], [], None, None, result=[])

    def alltoall_base(self, output, input, output_split_sizes=None, input_split_sizes=None, opts=None):
        """all_to_all_single: rank p gets block p of this rank's input
        (split along the first dimension by input_split_sizes, or equally)
        into its output's block for this rank."""
        what = "all_to_all_single"
        inp, out = _flat(input, what), _flat(output, what)
        if inp.dtype != out.dtype:
            raise RuntimeError(f"gpumesh: {what}: the input is {inp.dtype} but the output is {out.dtype}")
        n = self._size
        sb = _blocks(what, "input", tuple(input.shape), input_split_sizes, n)
        rb = _blocks(what, "output", tuple(output.shape), output_split_sizes, n)
        if sb[self._rank][1] != rb[self._rank][1]:
            raise RuntimeError(
                f"gpumesh: {what}: this rank sends itself {sb[self._rank][1]} elements but receives "
                f"{rb[self._rank][1]} (input and output split sizes disagree)")
        if _overlap(inp, out):
            inp = inp.clone()  # the receives would overwrite what is still to be sent
        return self._issue_table(_client.OP_ALLTOALL, what, 0, [inp, out], 1, [(0,) + b for b in sb],
                                 [(1,) + b for b in rb], [output])

    def alltoall(self, output_tensors, input_tensors, opts=None):
        """all_to_all: rank p gets input_tensors[p] into its
        output_tensors[this rank]."""
        what = "all_to_all"
        n = self._size
        if len(input_tensors) != n or len(output_tensors) != n:
            raise RuntimeError(
                f"gpumesh: {what} needs {n} input and {n} output tensors (one per rank), got {len(input_tensors)} "
                f"and {len(output_tensors)}")
        ins = [_flat(t, what) for t in input_tensors]
        outs = [_flat(t, what) for t in output_tensors]
        _same_dtype(what, ins + outs)
        me = self._rank
        if ins[me].numel() != outs[me].numel():
            raise RuntimeError(
                f"gpumesh: {what}: this rank's own input has {ins[me].numel()} elements but its output "
                f"{outs[me].numel()}")
        ins = [i.clone() if any(_overlap(i, o) for o in outs) else i for i in ins]
        return self._issue_table(_client.OP_ALLTOALL, what, 0, ins + outs, n,
                                 [(p, 0, ins[p].numel()) for p in range(n)],
                                 [(n + p, 0, outs[p].numel()) for p in range(n)], output_tensors)

    def _root(self, what, opts):
        root = opts.rootRank if opts is not None else 0
        if not 0 <= root < self._size:
            raise RuntimeError(f"gpumesh: {what}: root rank {root} is not a rank of the group (0..{self._size - 1})")
        return root

    def gather(self, output_tensors, input_tensors, opts=None):
        """gather: the root gets every rank's input into its list."""
        what = "gather"
        root, n = self._root(what, opts), self._size
        if len(input_tensors) != 1:
            raise RuntimeError(f"gpumesh: {what} takes one input tensor per process, got {len(input_tensors)}")
        inp = _flat(input_tensors[0], what)
        k = inp.numel()
        if self._rank != root:
            if any(len(o) for o in output_tensors):
                raise RuntimeError(f"gpumesh: {what}: only the root (rank {root}) takes an output list")
            send = [(0, 0, k) if p == root else None for p in range(n)]
            return self._issue_table(_client.OP_GATHER, what, root, [inp], 1, send, [None] * n, output_tensors)
        if len(output_tensors) != 1 or len(output_tensors[0]) != n:
            got = len(output_tensors[0]) if len(output_tensors) == 1 else f"{len(output_tensors)} lists"
            raise RuntimeError(f"gpumesh: {what} needs a list of {n} output tensors on the root, got {got}")
        outs = [_flat(o, what) for o in output_tensors[0]]
        _same_shape(what, "output", inp, outs)
        if any(_overlap(inp, o) for o in outs):
            inp = inp.clone()
        send = [(0, 0, k) if p == root else None for p in range(n)]
        return self._issue_table(_client.OP_GATHER, what, root, [inp] + outs, 1, send,
                                 [(1 + p, 0, k) for p in range(n)], output_tensors)

    def scatter(self, output_tensors, input_tensors, opts=None):
        """scatter: rank p gets the root's input_tensors[p] into its
        output."""
        what = "scatter"
        root, n = self._root(what, opts), self._size
        if len(output_tensors) != 1:
            raise RuntimeError(f"gpumesh: {what} takes one output tensor per process, got {len(output_tensors)}")
        out = _flat(output_tensors[0], what)
        k = out.numel()
        if self._rank != root:
            if any(len(i) for i in input_tensors):
                raise RuntimeError(f"gpumesh: {what}: only the root (rank {root}) takes an input list")
            recv = [(0, 0, k) if p == root else None for p in range(n)]
            return self._issue_table(_client.OP_SCATTER, what, root, [out], 0, [None] * n, recv, output_tensors)
        if len(input_tensors) != 1 or len(input_tensors[0]) != n:
            got = len(input_tensors[0]) if len(input_tensors) == 1 else f"{len(input_tensors)} lists"
            raise RuntimeError(f"gpumesh: {what} needs a list of {n} input tensors on the root, got {got}")
        ins = [_flat(i, what) for i in input_tensors[0]]
        _same_shape(what, "input", out, ins)
        ins = [i.clone() if _overlap(i, out) else i for i in ins]
        recv = [(n, 0, k) if p == root else None for p in range(n)]
        return self._issue_table(_client.OP_SCATTER, what, root, ins + [out], n,
                                 [(p, 0, k) for p in range(n)], recv, output_tensors)

    def shutdown(self):
        self._conn.close()


def backend_of(group=None):
    """The ProcessGroupGpumesh behind group (default: the default group):
    the group itself on PyTorch 1.13, its CPU backend on 2.x (for tools and
    tests that look inside the backend); None if the group is not
    gpumesh's."""
    pg = group if group is not None else dist.distributed_c10d._get_default_group()
    if isinstance(pg, ProcessGroupGpumesh):
        return pg
    get = getattr(pg, "_get_backend", None)
    if get is not None:
        try:
            b = get(torch.device("cpu"))
        except RuntimeError:
            return None
        if isinstance(b, ProcessGroupGpumesh):
            return b
    return None


def _create(opts, pg_options=None):
    """The backend's creator (extended API: it gets the group's name and its
    global ranks, which name the group to the agent)."""
    ranks = list(opts.global_ranks_in_group) or list(range(opts.group_size))
    gid = str(opts.group_id) or "world"
    gid = "".join(c if (c.isalnum() or c in "._:-") else "_" for c in gid)
    return ProcessGroupGpumesh(opts.group_rank, opts.group_size, group_id=gid, global_ranks=ranks,
                               timeout=opts.timeout)


def _register():
    if BACKEND.upper() in getattr(dist.Backend, "_plugins", {}):
        return
    params = inspect.signature(dist.Backend.register_backend).parameters
    kwargs = {"extended_api": True}
    if "devices" in params:
        # PyTorch 2.x: one backend for both device types (CUDA tensors are
        # staged through host shared memory).
        kwargs["devices"] = ["cpu", "cuda"]
    dist.Backend.register_backend(BACKEND, _create, **kwargs)


_register()


# ---- DDP communication hook ----

class HookState:
    """State of allreduce_hook: its own gpumesh group of every rank."""

    def __init__(self, timeout=1800.0):
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        self.pg = ProcessGroupGpumesh(rank, size, group_id="ddp-hook", global_ranks=list(range(size)),
                                      timeout=timeout)
        self.size = size

    def __getstate__(self):
        raise TypeError("gpumesh.torch.HookState cannot be pickled")


def hook_state(timeout=1800.0):
    """A HookState for allreduce_hook (call once per process, after the
    script's own init_process_group)."""
    return HookState(timeout)


def allreduce_hook(state, bucket):
    """DDP communication hook: averages the bucket's gradients through the
    gpumesh agent (register with model.register_comm_hook(hook_state(),
    allreduce_hook))."""
    buf = bucket.buffer() if callable(getattr(bucket, "buffer", None)) else bucket.get_tensor()
    opts = dist.AllreduceOptions()
    opts.reduceOp = dist.ReduceOp.SUM
    buf.div_(state.size)
    fut = state.pg.allreduce([buf], opts).get_future()
    return fut.then(lambda f: f.value()[0])
