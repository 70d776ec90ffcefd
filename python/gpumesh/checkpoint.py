"""Checkpoints through the gpumesh agent: save, load, and preempt_requested().

A job whose spec has a ``checkpoint: {uri: ..., keep: 3, every: N}`` block
gets ``$GPUMESH_CHECKPOINT_URI`` (and ``_KEEP``, ``_EVERY``) in its ranks'
environment. This module saves a state (anything ``torch.save`` takes) for a
training step, finds the newest complete checkpoint at start, and says when
the node is about to go away (a spot interruption notice, a drain, or any
stop of the job: the agent sends SIGTERM and writes
``$GPUMESH_PREEMPT_DEADLINE_FILE``). The loop a user writes::

    from gpumesh import checkpoint as ckpt

    state, step = ckpt.load()               # (None, -1) on a fresh start
    if state is not None:
        model.load_state_dict(state["model"]); opt.load_state_dict(state["opt"])
    for step in range(step + 1, total_steps):
        train_one_step(step)                # data order a function of step
        if ckpt.should_save(step):          # every N steps, or preempted
            ckpt.save({"model": model.state_dict(), "opt": opt.state_dict()}, step)
            if ckpt.preempt_requested():
                break                       # exit 0: the next generation resumes at step + 1

``preempt_requested`` and ``should_save`` are collectives when
torch.distributed is initialised (every rank calls them at the same step;
the ranks agree, so they all save the same step), and ``save`` is one too
(rank 0 writes, or every rank its shard with ``shard=True``; all ranks return
once the checkpoint is committed). A checkpoint is visible only once every
part is stored (its manifest is written last), so a rank killed mid-save
leaves the previous checkpoint in place.

Inside a gpumesh job the rank's agent does the storage work (S3 multipart
uploads, checksums, pruning to ``keep``) over its local socket: ``save``
writes the state once, with ``torch.save``, into a file the agent hands
over (the store's own temporary file, or a spool it uploads), and ``load``
is handed the copy the agent prefetched when the rank started, which it
maps instead of reading (tensors share the page cache until written).
A job resumes only from its own checkpoints (those of a job of its name):
when the URI holds another job's newest checkpoint, its agent refuses it,
``load`` and ``save`` raise, and the job fails to start saying whose they
are (``checkpoint.resume_from: NAME`` continues from them on purpose).
Outside a gpumesh job (e.g. under torchrun) call ``configure(uri=...)`` or
set the variables yourself: the gpumesh binary (``$GPUMESH_BIN``, else
``gpumesh`` on PATH) then does the work, ``gpumesh checkpoint
put|commit|latest|get``. The module depends on the standard library; save
and load import torch.
"""

import ctypes
import inspect
import io
import json
import mmap
import os
import pickle
import shutil
import struct
import signal
import subprocess
import sys
import tempfile
import threading
import time
import zipfile

from . import _ckpt_client, _client

ENV_URI = "GPUMESH_CHECKPOINT_URI"
ENV_KEEP = "GPUMESH_CHECKPOINT_KEEP"
ENV_EVERY = "GPUMESH_CHECKPOINT_EVERY"
ENV_BIN = "GPUMESH_BIN"
ENV_DEADLINE_FILE = "GPUMESH_PREEMPT_DEADLINE_FILE"
ENV_ALLOC_DIR = "GPUMESH_ALLOC_DIR"


class CheckpointError(RuntimeError):
    """Saving or loading failed; the message says why and what to do."""


_lock = threading.Lock()
_config = {"uri": None, "keep": None, "every": None, "bin": None}
_sigterm = threading.Event()
_installed = False
last_load = {}
# Where the last save's time went (rank 0 or shard writers; seconds):
# write_seconds (torch.save into the agent's file), store_seconds (the agent
# stores it: checksums, sync or upload), commit_seconds (the manifest).
last_save = {}


def configure(uri=None, keep=None, every=None, binary=None):
    """Override what the environment says (for use outside a gpumesh job)."""
    if uri is not None:
        _config["uri"] = uri
    if keep is not None:
        _config["keep"] = int(keep)
    if every is not None:
        _config["every"] = int(every)
    if binary is not None:
        _config["bin"] = binary


def uri():
    """Where checkpoints live, or None when the job has no checkpoint block."""
    return _config["uri"] or os.environ.get(ENV_URI) or None


def every():
    """Steps between periodic saves (0: only when preempted)."""
    if _config["every"] is not None:
        return _config["every"]
    return int(os.environ.get(ENV_EVERY, "0") or 0)


def _binary():
    b = _config["bin"] or os.environ.get(ENV_BIN) or shutil.which("gpumesh")
    if not b:
        raise CheckpointError("the gpumesh binary was not found: set $GPUMESH_BIN or put gpumesh on PATH "
                              "(inside a gpumesh job the agent sets it)")
    return b


_agent_conn = {}


def _agent():
    """The connection to this rank's agent, or None outside a gpumesh job
    (or when configure() names another location than the job's)."""
    if _config["uri"] is not None and _config["uri"] != os.environ.get(ENV_URI):
        return None
    with _lock:
        if "conn" not in _agent_conn:
            try:
                _agent_conn["conn"] = _ckpt_client.from_env()
            except _client.AgentError as e:
                # e.g. an agent without the local API: the binary does the work.
                print("gpumesh.checkpoint: %s; using the gpumesh binary instead" % e, file=sys.stderr, flush=True)
                _agent_conn["conn"] = None
        return _agent_conn["conn"]


# How long a rank waits for its agent to come back when the connection
# drops (an agent restart or upgrade: ranks outlive it and are adopted).
RECONNECT_SECONDS = 120.0

# Requests that may be sent again on a new connection: they either change
# nothing or write the same thing twice (a manifest). PUT_END and PUT_ABORT
# name a part of the old connection, which the agent dropped with it: the
# whole put is redone (see save).
_RETRYABLE = {_ckpt_client.PUT_BEGIN, _ckpt_client.COMMIT, _ckpt_client.LATEST,
              _ckpt_client.LIST, _ckpt_client.OPEN}


def _reconnect(cause):
    """Drop the lost connection and wait for the agent to answer again."""
    with _lock:
        old = _agent_conn.pop("conn", None)
    if old is not None:
        old.close()
    print("gpumesh.checkpoint: %s; waiting up to %.0f s for the agent to come back" % (cause, RECONNECT_SECONDS),
          file=sys.stderr, flush=True)
    deadline = time.monotonic() + RECONNECT_SECONDS
    while True:
        try:
            conn = _ckpt_client.from_env()
        except _client.AgentError as e:
            if time.monotonic() >= deadline:
                raise CheckpointError("the local agent did not come back within %.0f s: %s" % (RECONNECT_SECONDS, e)) from e
            time.sleep(0.25)
            continue
        with _lock:
            _agent_conn["conn"] = conn
        return conn


def _ask(kind, body=None):
    try:
        return _agent().request(kind, body)
    except _client.AgentConnectionLost as e:
        conn = _reconnect(e)
        if kind not in _RETRYABLE:
            raise _PutLost(str(e)) from e
        try:
            return conn.request(kind, body)
        except _client.AgentError as e2:
            raise CheckpointError(str(e2)) from e2
    except _client.AgentError as e:
        raise CheckpointError(str(e)) from e


class _PutLost(CheckpointError):
    """The agent went away in the middle of a put; it dropped the part."""


def _run(*args):
    u = uri()
    if not u:
        raise CheckpointError("no checkpoint location: add checkpoint: {uri: s3://bucket/prefix} to the job spec, "
                              "or call gpumesh.checkpoint.configure(uri=...)")
    cmd = [_binary(), "checkpoint", "--uri", u]
    keep = _config["keep"] if _config["keep"] is not None else os.environ.get(ENV_KEEP)
    if keep:
        cmd += ["--keep", str(keep)]
    p = subprocess.run(cmd + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise CheckpointError("gpumesh checkpoint %s: %s" % (args[0], p.stderr.strip() or "exit %d" % p.returncode))
    return p.stdout


def _on_sigterm(signum, frame):
    _sigterm.set()


def install_handler():
    """Catch SIGTERM (what the agent sends to stop a rank) so that the loop
    can save at its next step boundary instead of dying mid-step. Called by
    load() and preempt_requested(); call it earlier if a step may be long."""
    global _installed
    with _lock:
        if _installed or threading.current_thread() is not threading.main_thread():
            return
        signal.signal(signal.SIGTERM, _on_sigterm)
        _installed = True


def _local_preempt():
    if _sigterm.is_set():
        return True
    f = os.environ.get(ENV_DEADLINE_FILE)
    return bool(f) and os.path.exists(f)


def _dist():
    try:
        import torch.distributed as dist
    except ImportError:
        return None
    if dist.is_available() and dist.is_initialized():
        return dist
    return None


def _agree(flag):
    """True on every rank if it is true on any (a collective)."""
    dist = _dist()
    if dist is None or dist.get_world_size() == 1:
        return flag
    import torch
    t = _flag_tensor(torch, _device(dist))
    t.fill_(1 if flag else 0)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# The tensors _agree reduces, one per device (see _flag_tensor).
_flags = {}


def _flag_tensor(torch, dev):
    """The tensor _agree reduces on dev: one per device, never freed.

    A backend's own thread (Gloo's workers, NCCL's watchdog) drops its
    reference to a collective's tensor a moment after the operation has
    completed. If the tensor's Python object is gone by then, PyTorch (1.13)
    has that thread free it, which takes the GIL; once the interpreter has
    begun to exit, Python ends a thread that takes the GIL with
    pthread_exit, and its unwinding through PyTorch's destructors calls
    std::terminate: the rank dies with SIGABRT ("terminate called without
    an active exception") after its script has finished. _agree is the last
    collective of the checkpoint loop, right before a script ends, so its
    tensor holds one reference that is never released: the backend thread
    never frees it."""
    key = str(dev)
    t = _flags.get(key)
    if t is None:
        t = torch.zeros(1, dtype=torch.int32, device=dev)
        ctypes.pythonapi.Py_IncRef(ctypes.py_object(t))
        _flags[key] = t
    return t


def _device(dist):
    """The device a collective of dist's backend takes tensors on."""
    import torch
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# The tensors _gather_parts gathers from and into, by (device, role,
# shape); like _flags, kept for the life of the process.
_kept = {}


def _kept_tensor(torch, dev, role, shape):
    """A zeroed int64 tensor of shape on dev that is never freed, and its
    rows (views, each a tensor of its own to a backend), never freed
    either."""
    key = (str(dev), role, shape)
    got = _kept.get(key)
    if got is None:
        t = torch.zeros(shape, dtype=torch.int64, device=dev)
        rows = list(t.unbind(0)) if len(shape) > 1 else []
        for x in [t] + rows:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(x))
        got = _kept[key] = (t, rows)
    return got


def _gather_parts(dist, part, world):
    """Every rank's part ({"rank", "size", "crc32c"}), by rank: what rank 0
    lists in the manifest of a sharded checkpoint.

    Gathered as int64 tensors that are never freed (see _flag_tensor), not
    with all_gather_object, whose pickled temporaries a backend thread may
    free after the interpreter began to exit: first each rank's rank, size
    and number of checksums (-1 for null: the agent says null for an empty
    part written as a stream, [] for one written as a file), then the
    checksums (CRC32C values, 8 hex digits each) padded to the longest list.
    The parts are those the agent returned (checkpoint.Part: rank, size,
    crc32c), as all_gather_object would give them."""
    import torch
    dev = _device(dist)
    crc = part["crc32c"]
    sums = [int(x, 16) for x in crc or []]
    head, _ = _kept_tensor(torch, dev, "head", (3,))
    head.copy_(torch.tensor([int(part["rank"]), int(part["size"]), -1 if crc is None else len(sums)], dtype=torch.int64))
    heads, rows = _kept_tensor(torch, dev, "heads", (world, 3))
    dist.all_gather(rows, head)
    heads = heads.cpu().tolist()
    n = max(h[2] for h in heads)
    bodies = []
    if n > 0:
        # Rounded up to a power of two, so that few shapes are ever kept.
        n = 1 << (n - 1).bit_length()
        body, _ = _kept_tensor(torch, dev, "body", (n,))
        body.zero_()
        body[:len(sums)] = torch.tensor(sums, dtype=torch.int64)
        out, rows = _kept_tensor(torch, dev, "bodies", (world, n))
        dist.all_gather(rows, body)
        bodies = out.cpu().tolist()
    parts = []
    for r, (rank, size, count) in enumerate(heads):
        crc = None if count < 0 else ["%08x" % v for v in bodies[r][:count]] if count else []
        parts.append({"rank": rank, "size": size, "crc32c": crc})
    return parts


def preempt_requested():
    """True once this node is being taken away or the job stopped (spot
    notice, drain, regrow of an elastic job): save now and exit 0. With
    torch.distributed initialised it is a collective and true on every rank
    if any rank was told, so that all save the same step."""
    install_handler()
    return _agree(_local_preempt())


_progress = {}


def _record(**kw):
    """Keep the agent informed: the step this generation resumed from and
    the last step it finished end up in the allocation's result (job
    status), so lost steps can be counted after a crash."""
    _progress.update(kw)
    d = os.environ.get(ENV_ALLOC_DIR)
    if not d or not os.path.isdir(d):
        return
    tmp = os.path.join(d, ".checkpoint-progress.json.tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(_progress, f)
        os.replace(tmp, os.path.join(d, "checkpoint-progress.json"))
    except OSError:
        pass


def should_save(step):
    """True every `every` steps (step counted from 0) and when preempted. A
    collective like preempt_requested(). Records `step` as finished."""
    _record(last_step=int(step))
    n = every()
    periodic = n > 0 and (step + 1) % n == 0
    return preempt_requested() or periodic


def _rank_world():
    dist = _dist()
    if dist is None:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    return dist.get_rank(), dist.get_world_size()


def _scratch():
    d = os.environ.get(ENV_ALLOC_DIR)
    if d and os.path.isdir(d):
        return d
    return None


def save(state, step, shard=False, meta=None):
    """Save `state` as the checkpoint of `step` (the last step finished).

    shard=False: rank 0's state is saved (DDP: every rank holds the same
    parameters); shard=True: every rank saves its own state and load()
    gives each rank its own part back (the world size must then match).
    meta: small str->str data kept in the manifest. A collective when
    torch.distributed is initialised: every rank returns once the
    checkpoint is committed. last_save says where the time went."""
    import torch
    last_save.clear()
    rank, world = _rank_world()
    agent = _agent()
    part = None
    if (shard or rank == 0) and agent is not None:
        try:
            part = _put(state, step)
        except _PutLost:
            # The agent restarted mid-put (we are connected to its
            # successor now): write the state again.
            part = _put(state, step)
    elif shard or rank == 0:
        with tempfile.NamedTemporaryFile(dir=_scratch(), prefix="ckpt-", suffix=".pt", delete=False) as f:
            path = f.name
        try:
            torch.save(state, path)
            part = json.loads(_run("put", "--step", str(step), "--rank", str(rank), path))
        finally:
            os.unlink(path)
    dist = _dist()
    parts = [part]
    if shard and dist is not None and world > 1:
        parts = _gather_parts(dist, part, world)
    err = None
    if rank == 0 and agent is not None:
        t2 = time.monotonic()
        try:
            _ask(_ckpt_client.COMMIT, {"step": int(step), "world_size": world, "parts": parts,
                                       "meta": {str(k): str(v) for k, v in (meta or {}).items()}})
        except CheckpointError as e:
            err = e
        last_save["commit_seconds"] = time.monotonic() - t2
    elif rank == 0:
        args = ["commit", "--step", str(step), "--world", str(world), "--parts", json.dumps(parts)]
        for k, v in sorted((meta or {}).items()):
            args += ["--meta", "%s=%s" % (k, v)]
        try:
            _run(*args)
        except CheckpointError as e:
            err = e
    if dist is not None and world > 1:
        # No rank leaves (and no next generation starts) before the commit.
        # Only rank 0 commits, so "failed on any rank" is rank 0's result;
        # _agree's tensor is safe as a script's last collective.
        if _agree(err is not None) and err is None:
            raise CheckpointError("rank 0 failed to commit the checkpoint of step %d (see its log)" % step)
    if err is not None:
        raise err


def _put(state, step):
    """Write state once, into the file the agent stores; returns its part."""
    import torch
    t0 = time.monotonic()
    _, fd, rid = _ask(_ckpt_client.PUT_BEGIN, {"step": int(step)})
    try:
        with open(fd, "wb") as f:
            torch.save(state, f)
        last_save["write_seconds"] = time.monotonic() - t0
    except BaseException:
        try:
            _ask(_ckpt_client.PUT_ABORT, {"id": rid})
        except CheckpointError:
            pass
        raise
    t1 = time.monotonic()
    part = _ask(_ckpt_client.PUT_END, {"id": rid})[0]["parts"][0]
    last_save["store_seconds"] = time.monotonic() - t1
    return part


def latest():
    """The manifest (a dict: step, world_size, parts, ...) of the newest
    complete checkpoint, or None."""
    if _agent() is not None:
        out = _ask(_ckpt_client.LATEST)[0]
    else:
        out = json.loads(_run("latest"))
    return out.get("manifest") if out.get("found") else None


def load(step=None, map_location="cpu"):
    """Load the newest complete checkpoint (or that of `step`): returns
    (state, step), or (None, -1) when there is none. A rank gets its own
    part of a sharded checkpoint, and rank 0's part otherwise. Inside a
    gpumesh job the agent has started fetching it when the rank started,
    and hands that copy over when it is of the step asked for; it is mapped,
    not read. last_load says where it came from and how long it took
    (wait_seconds: the agent's answer; load_seconds: torch.load)."""
    import torch
    install_handler()
    if uri() is None:
        return None, -1
    if _agent() is not None:
        return _load_from_agent(step, map_location)
    if step is None:
        m = latest()
    else:
        m = next((x for x in json.loads(_run("list", "--json")) if x["step"] == int(step)), None)
        if m is None:
            raise CheckpointError("no complete checkpoint of step %d under %s" % (int(step), uri()))
    if m is None:
        _record(resumed_step=-1)
        return None, -1
    rank, world = _rank_world()
    want = 0
    if m["parts"] is not None and len(m["parts"]) > 1:
        if m["world_size"] != world:
            raise CheckpointError("the checkpoint of step %d holds %d shards of a world of %d; this job has %d ranks: "
                                  "load it with the same world size, or save with shard=False"
                                  % (m["step"], len(m["parts"]), m["world_size"], world))
        want = rank
    t0 = time.monotonic()
    with tempfile.NamedTemporaryFile(dir=_scratch(), prefix="ckpt-", suffix=".pt", delete=False) as f:
        path = f.name
    try:
        _run("get", "--step", str(m["step"]), "--rank", str(want), path)
        state = torch.load(path, map_location=map_location)
    finally:
        if os.path.exists(path):
            os.unlink(path)
    last_load.update(step=int(m["step"]), part=want, source="store", seconds=time.monotonic() - t0)
    _record(resumed_step=int(m["step"]))
    return state, int(m["step"])


def _load_from_agent(step, map_location):
    t0 = time.monotonic()
    rank, world = _rank_world()
    body = {"step": -1 if step is None else int(step), "part": -1, "world_size": world}
    out, fd, _ = _ask(_ckpt_client.OPEN, body)
    if not out.get("found"):
        _record(resumed_step=-1)
        return None, -1
    m = out["manifest"]
    try:
        if m["parts"] is not None and len(m["parts"]) > 1 and m["world_size"] != world:
            raise CheckpointError("the checkpoint of step %d holds %d shards of a world of %d; this job has %d ranks: "
                                  "load it with the same world size, or save with shard=False"
                                  % (m["step"], len(m["parts"]), m["world_size"], world))
        if fd is None:
            raise CheckpointError("the agent sent no file with the checkpoint of step %d" % m["step"])
    except BaseException:
        if fd is not None:
            os.close(fd)
        raise
    t1 = time.monotonic()
    state, how = _load_fd(fd, map_location)
    last_load.update(step=int(m["step"]), part=out.get("part", 0), source=out.get("source", "store"),
                     wait_seconds=t1 - t0, agent_seconds=out.get("wait_seconds"),
                     prefetch_seconds=out.get("prefetch_seconds"), load_seconds=time.monotonic() - t1, load=how)
    _record(resumed_step=int(m["step"]))
    return state, int(m["step"])


def _load_fd(fd, map_location):
    """torch.load of the file behind fd (which it closes), mapped rather
    than read where this torch allows: tensors share the mapping (private:
    writing to them copies the page) until written."""
    import torch
    try:
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    except (OSError, ValueError):
        mm = None
    if mm is None:
        with open(fd, "rb") as f:
            return torch.load(f, map_location=map_location), "read"
    if "mmap" in inspect.signature(torch.load).parameters:
        try:
            return torch.load("/proc/self/fd/%d" % fd, mmap=True, map_location=map_location), "mmap"
        except Exception:
            pass
        finally:
            os.close(fd)
        return torch.load(_MappedFile(mm), map_location=map_location), "read"
    os.close(fd)
    try:
        return _load_mapped_zip(mm, map_location), "mmap"
    except _NotMappable:
        return torch.load(_MappedFile(mm), map_location=map_location), "read"


class _NotMappable(Exception):
    pass


class _MappedFile(io.RawIOBase):
    """A read-only, seekable file over a mapping (what zipfile and
    torch.load read)."""

    def __init__(self, mm):
        super().__init__()
        self._mm = mm
        self._pos = 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self._pos

    def seek(self, off, whence=io.SEEK_SET):
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._mm)}[whence]
        self._pos = max(0, base + off)
        return self._pos

    def readinto(self, b):
        n = min(len(b), max(0, len(self._mm) - self._pos))
        b[:n] = self._mm[self._pos:self._pos + n]
        self._pos += n
        return n


_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def _load_mapped_zip(mm, map_location):
    """torch.load of a zip-format checkpoint whose storages are views of the
    mapping (torch.save stores them uncompressed, 64-byte aligned): what
    torch >= 2.1 does with torch.load(mmap=True), for the torch versions
    whose torch.serialization._load takes a reader of records (1.13, 2.0)."""
    import torch
    import torch.serialization as ser
    if not hasattr(ser, "_load") or list(inspect.signature(ser._load).parameters)[:3] != ["zip_file", "map_location", "pickle_module"]:
        raise _NotMappable()
    try:
        zf = zipfile.ZipFile(_MappedFile(mm))
    except zipfile.BadZipFile as e:
        raise _NotMappable() from e  # the legacy (non-zip) format
    infos = zf.infolist()
    if not infos:
        raise _NotMappable()
    prefix = infos[0].filename.split("/", 1)[0] + "/"
    offsets = {}
    for info in infos:
        if info.compress_type != zipfile.ZIP_STORED:
            raise _NotMappable()
        h = _LOCAL_HEADER.unpack_from(mm, info.header_offset)
        if h[0] != b"PK\x03\x04":
            raise _NotMappable()
        offsets[info.filename] = (info.header_offset + _LOCAL_HEADER.size + h[9] + h[10], info.file_size)

    class Records:
        def get_record(self, name):
            return zf.read(prefix + name)

        def has_record(self, name):
            return prefix + name in offsets

        def get_storage_from_record(self, name, numel, _storage_type):
            off, size = offsets[prefix + name]
            if numel > size:
                raise _NotMappable()
            if numel == 0:
                return torch.empty(0, dtype=torch.uint8)
            return torch.frombuffer(mm, dtype=torch.uint8, count=numel, offset=off)

    return ser._load(Records(), map_location, pickle, encoding="utf-8")
