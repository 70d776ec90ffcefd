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

The storage work (S3 multipart uploads, checksums, pruning to ``keep``) is
done by the gpumesh binary (``$GPUMESH_BIN``, else ``gpumesh`` on PATH):
``gpumesh checkpoint put|commit|latest|get``. Outside a gpumesh job (e.g.
under torchrun) call ``configure(uri=...)`` or set the variables yourself.
The module depends on the standard library; save and load import torch.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time

ENV_URI = "GPUMESH_CHECKPOINT_URI"
ENV_KEEP = "GPUMESH_CHECKPOINT_KEEP"
ENV_EVERY = "GPUMESH_CHECKPOINT_EVERY"
ENV_BIN = "GPUMESH_BIN"
ENV_DEADLINE_FILE = "GPUMESH_PREEMPT_DEADLINE_FILE"
ENV_ALLOC_DIR = "GPUMESH_ALLOC_DIR"
ENV_CACHE = "GPUMESH_CHECKPOINT_CACHE"

# How long load() waits for the agent's prefetch before downloading itself.
PREFETCH_WAIT_SECONDS = 600.0


class CheckpointError(RuntimeError):
    """Saving or loading failed; the message says why and what to do."""


_lock = threading.Lock()
_config = {"uri": None, "keep": None, "every": None, "bin": None}
_sigterm = threading.Event()
_installed = False
last_load = {}


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
    dev = "cpu"
    if dist.get_backend() == "nccl":
        dev = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


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
    checkpoint is committed."""
    import torch
    rank, world = _rank_world()
    part = None
    if shard or rank == 0:
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
        parts = [None] * world
        dist.all_gather_object(parts, part)
    err = None
    if rank == 0:
        args = ["commit", "--step", str(step), "--world", str(world), "--parts", json.dumps(parts)]
        for k, v in sorted((meta or {}).items()):
            args += ["--meta", "%s=%s" % (k, v)]
        try:
            _run(*args)
        except CheckpointError as e:
            err = e
    if dist is not None and world > 1:
        # No rank leaves (and no next generation starts) before the commit.
        ok = [err is None]
        dist.broadcast_object_list(ok, src=0)
        if not ok[0] and err is None:
            raise CheckpointError("rank 0 failed to commit the checkpoint of step %d (see its log)" % step)
    if err is not None:
        raise err


def latest():
    """The manifest (a dict: step, world_size, parts, ...) of the newest
    complete checkpoint, or None."""
    out = json.loads(_run("latest"))
    return out.get("manifest") if out.get("found") else None


def load(step=None, map_location="cpu"):
    """Load the newest complete checkpoint (or that of `step`): returns
    (state, step), or (None, -1) when there is none. A rank gets its own
    part of a sharded checkpoint, and rank 0's part otherwise. Inside a
    gpumesh job the agent has started fetching it when the rank started
    ($GPUMESH_CHECKPOINT_CACHE); load() uses that copy when it is of the
    newest step. last_load says where it came from and how long it took."""
    import torch
    install_handler()
    if uri() is None:
        return None, -1
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
    local = _prefetched(int(m["step"]), want)
    if local is not None:
        state = torch.load(local, map_location=map_location)
        last_load.update(step=int(m["step"]), part=want, source="prefetch", wait_seconds=time.monotonic() - t0)
        _record(resumed_step=int(m["step"]))
        return state, int(m["step"])
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


def _prefetched(step, part):
    """The agent's prefetched copy of (step, part), once its record is
    written, or None (no prefetch, another step, or it failed)."""
    d = os.environ.get(ENV_CACHE)
    if not d:
        return None
    rec_path = os.path.join(d, "prefetch.json")
    deadline = time.monotonic() + PREFETCH_WAIT_SECONDS
    while not os.path.exists(rec_path):
        if time.monotonic() > deadline:
            return None
        time.sleep(0.02)
    with open(rec_path) as f:
        rec = json.load(f)
    if not rec.get("found") or rec.get("step") != step or rec.get("part") != part:
        return None
    last_load["prefetch_seconds"] = rec.get("seconds")
    path = os.path.join(d, rec["file"])
    return path if os.path.exists(path) else None
