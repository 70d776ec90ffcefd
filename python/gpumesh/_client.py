"""The local protocol of a gpumesh agent (see node/localapi/proto.go).

One Connection is one rank of one process group: a SOCK_SEQPACKET Unix
socket to the agent and shared-memory segments (sealed memfds whose
descriptors travel with SCM_RIGHTS). The agent's answers complete the
operations; who reads them is described at Connection.wait_for.
"""

import array
import fcntl
import math
import mmap
import os
import select
import socket
import struct
import threading
import time

VERSION = 1

MSG_HELLO, MSG_REGISTER, MSG_UNREGISTER, MSG_OP, MSG_BYE = 1, 2, 3, 4, 5
MSG_REGISTER_CUDA = 6
MSG_OP_TABLE = 7
CUDA_MEMORY, CUDA_EVENT = 1, 2
MSG_WELCOME, MSG_REGISTERED, MSG_DONE, MSG_FAILED, MSG_ERROR = 0x81, 0x82, 0x84, 0x85, 0x8F

OP_ALLREDUCE, OP_BROADCAST, OP_ALLGATHER, OP_REDUCESCATTER = 1, 2, 3, 4
OP_SEND, OP_RECV, OP_BARRIER = 5, 6, 7
OP_ALLTOALL, OP_GATHER, OP_SCATTER = 8, 9, 10

STATUS_OK, STATUS_FAILED, STATUS_MISMATCH, STATUS_BAD_REQUEST, STATUS_DENIED = 0, 1, 2, 3, 4
STATUS_UNSUPPORTED = 5

ENV_SOCKET = "GPUMESH_LOCAL_SOCKET"
ENV_SECRET = "GPUMESH_LOCAL_SECRET"
# Set instead of the two above by an agent whose local API is off: why.
ENV_LOCAL_API_OFF = "GPUMESH_LOCAL_API_OFF"

_HELLO = struct.Struct("<BBHIIIIQHHHH")
_REGISTER = struct.Struct("<B7xQQ")
_UNREGISTER = struct.Struct("<B7xQ")
_BYE = struct.Struct("<B7x")
_OP = struct.Struct("<BBBBiQQQQQQQQ")
_TABLE_ENTRY = struct.Struct("<QQQQQQ")
_REPLY = struct.Struct("<BBH4xQ")
_REGISTER_CUDA = struct.Struct("<BB6xQQ16s64s")

MAX_MESSAGE = 64 << 10

# How long close() waits for the connection's threads to end (they end at
# once unless a callback of the caller's blocks one).
_JOIN_TIMEOUT = 10.0

# The socket's receive timeout (SO_RCVTIMEO): a blocking recv returns within
# it. A reader that may wait this long receives without a poll first (one
# system call per answer instead of two), then looks at its deadline again;
# shorter waits poll with their own timeout.
_RECV_SLICE = 0.5


class AgentError(RuntimeError):
    """An operation or the connection failed; the message says why."""


class AgentConnectionLost(AgentError):
    """The agent closed the connection (it stopped or restarted)."""


class Segment:
    """A shared-memory segment: a sealed memfd mapped here and in the agent."""

    def __init__(self, size, region_id):
        self.size = size
        self.id = region_id
        fd = os.memfd_create("gpumesh", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            # The seal proves to the agent that its mapping cannot be cut
            # short under it (which would fault the agent).
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.mm = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd

    def close(self):
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mm.close()
        except BufferError:
            pass  # a tensor view still exists; the mapping goes with it


class _Pending:
    __slots__ = ("on_done", "issued", "what")

    def __init__(self, on_done, what):
        self.on_done = on_done
        self.issued = time.monotonic()
        self.what = what


class Connection:
    """One rank of one process group, attached to the local agent."""

    def __init__(self, *, socket_path, secret, job, generation, rank, group_id, group_rank, ranks, timeout,
                 caller_reads=True):
        self.timeout = timeout
        self.group_rank = group_rank
        self.size = len(ranks)
        self._lock = threading.Lock()  # issue order, ids, pending table
        self._pending = {}
        self._registering = {}
        self._next_id = 1
        self._broken = None
        self._closed = False
        self._free = {}  # size -> [Segment]
        self._segments = []
        self._stop = threading.Event()  # close() wakes the watchdog
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        sock.settimeout(max(timeout, 1.0))
        try:
            sock.connect(socket_path)
        except OSError as e:
            sock.close()
            raise AgentError(
                f"gpumesh: cannot reach the local agent at {socket_path}: {e} "
                "(is the gpumesh agent of this node running?)"
            ) from e
        jb, gb, sb = job.encode(), group_id.encode(), secret.encode()
        hello = _HELLO.pack(MSG_HELLO, VERSION, 0, rank, group_rank, len(ranks), int(timeout * 1000) & 0xFFFFFFFF,
                            generation, len(jb), len(gb), len(sb), 0)
        hello += jb + gb + sb + struct.pack(f"<{len(ranks)}I", *ranks)
        try:
            sock.send(hello)
            r = _decode_reply(sock.recv(MAX_MESSAGE))
        except (OSError, AgentError) as e:
            sock.close()
            raise AgentError(f"gpumesh: the local agent did not answer the hello: {e}") from e
        if r[0] != MSG_WELCOME:
            sock.close()
            raise AgentError(f"gpumesh: the local agent refused rank {rank} of job {job} generation {generation}: {r[3]}")
        sock.settimeout(None)
        sec = int(_RECV_SLICE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("@ll", sec, int((_RECV_SLICE - sec) * 1e6)))
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        # The reading role (see wait_for): one thread at a time reads.
        self._rcond = threading.Condition(threading.Lock())
        self._reading = False
        self._role_owner = None  # the thread that reads (its ident)
        self._blocked = 0  # threads in wait_for blocked on _rcond
        self._bg_idle = False  # the background thread is blocked on _rcond
        self._bg_look = False  # it should look at what has arrived (watchdog)
        self._ended = False  # the socket's reading side is done
        self._bg_poked = not caller_reads  # the background thread should read
        self._caller_reads = caller_reads
        self._reader = threading.Thread(target=self._background, name="gpumesh-reader", daemon=True)
        self._reader.start()
        self._watchdog = threading.Thread(target=self._watch, name="gpumesh-watchdog", daemon=True)
        self._watchdog.start()

    # ---- shared memory ----

    def acquire(self, nbytes, what=None):
        """A registered segment of at least nbytes for one operation (what
        names it in errors)."""
        size = 1 << 16
        while size < nbytes:
            size <<= 1
        with self._lock:
            free = self._free.get(size)
            if free:
                return free.pop()
            self._check(what)
        seg = Segment(size, 0)
        try:
            seg.id = self.register(seg.fd, size)
        except BaseException:
            seg.close()
            raise
        # The agent holds its own mapping now; ours stays for the tensors.
        os.close(seg.fd)
        seg.fd = -1
        with self._lock:
            self._segments.append(seg)
        return seg

    def _registration(self, send, what):
        """Sends a registration (send(rid) under the lock) and waits for the
        agent's answer; returns (rid, status, message)."""
        ev = threading.Event()
        box = {}

        def done(status, msg):
            box["r"] = (status, msg)
            ev.set()

        with self._lock:
            self._check()
            rid = self._next_id
            self._next_id += 1
            self._registering[rid] = done
            try:
                send(rid)
            except OSError as e:
                self._registering.pop(rid, None)
                raise AgentError(f"gpumesh: registering {what} with the agent: {e}") from e
        if not self.wait_for(ev, self.timeout):
            with self._lock:
                self._registering.pop(rid, None)
            raise AgentError(f"gpumesh: the agent did not answer a registration of {what} in time")
        return (rid,) + box["r"]

    def register(self, fd, size):
        """Hands the sealed memfd fd (of at least size bytes) to the agent,
        which maps it; returns its region id. The caller keeps (and closes)
        fd."""
        rid, status, msg = self._registration(
            lambda rid: self._sock.sendmsg([_REGISTER.pack(MSG_REGISTER, rid, size)],
                                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]),
            "shared memory")
        if status != STATUS_OK:
            raise AgentError(f"gpumesh: the agent refused shared memory: {msg}")
        return rid

    def register_cuda(self, what, size, device_uuid, handle):
        """Hands a CUDA IPC memory handle (what CUDA_MEMORY: a whole
        allocation of size bytes) or event handle (CUDA_EVENT) on the GPU
        device_uuid (16 bytes) to the agent. Returns (id, None), or (None,
        reason, status) where the agent cannot take it (STATUS_UNSUPPORTED:
        an agent without CUDA; STATUS_BAD_REQUEST: a handle that does not
        open; the caller stages through host memory); raises on a lost
        connection."""
        rid, status, msg = self._registration(
            lambda rid: self._sock.send(_REGISTER_CUDA.pack(MSG_REGISTER_CUDA, what, rid, size, bytes(device_uuid), bytes(handle))),
            "CUDA memory")
        if status == STATUS_FAILED:
            raise AgentError(f"gpumesh: {msg}")
        if status != STATUS_OK:
            return None, msg, status
        return rid, None, STATUS_OK

    def unregister(self, rid):
        """Tells the agent to drop region rid (it unmaps it once no operation
        uses it)."""
        with self._lock:
            if self._closed or self._broken is not None:
                return
            try:
                self._sock.send(_UNREGISTER.pack(MSG_UNREGISTER, rid))
            except OSError:
                pass

    def release(self, seg):
        with self._lock:
            self._free.setdefault(seg.size, []).append(seg)

    # ---- operations ----

    def _check(self, what=None):
        op = f"{what}: " if what else ""
        if self._broken is not None:
            raise AgentError(f"gpumesh: {op}the process group is unusable after an earlier failure: {self._broken}")
        if self._closed:
            raise AgentError(f"gpumesh: {op}the process group was destroyed")

    def submit(self, kind, dtype, reduce_op, peer, tag, a, b, on_done, what, before_send=None, table=None):
        """Issue one operation. a and b are (region id, byte offset, count)
        or None. before_send() runs under the issue lock (copy-in), so issue
        order is send order. on_done(error_message_or_None) runs on the
        reader thread. table (OP_ALLTOALL, OP_GATHER, OP_SCATTER): per group
        rank, (block sent to it, block received from it), each a (region id,
        byte offset, count) or None."""
        def ref(x):
            return (0, 0, 0) if x is None else x

        ra, rb = ref(a), ref(b)
        extra = b""
        if table is not None:
            extra = b"".join(_TABLE_ENTRY.pack(*ref(s), *ref(r)) for s, r in table)
            if _OP.size + len(extra) > MAX_MESSAGE:
                raise AgentError(f"gpumesh: {what}: a group of {len(table)} ranks is too large for one request "
                                 f"(at most {(MAX_MESSAGE - _OP.size) // _TABLE_ENTRY.size})")
        # What the agent sent unasked while nobody read (FAILED of an idle
        # group) is read before this operation's answer, which it fails:
        # the socket keeps the order, so no look is needed here.
        with self._lock:
            self._check(what)
            if before_send is not None:
                before_send()
            oid = self._next_id
            self._next_id += 1
            pkt = _OP.pack(MSG_OP if table is None else MSG_OP_TABLE, kind, dtype, reduce_op, peer, oid, tag, *ra, *rb)
            if extra:
                pkt += extra
            self._pending[oid] = _Pending(on_done, what)
            try:
                self._sock.send(pkt)
            except OSError as e:
                del self._pending[oid]
                self._broken = f"sending to the agent failed: {e}"
                raise AgentConnectionLost(f"gpumesh: {self._broken}") from e
        return oid

    def _fail_all(self, msg, exc_type=AgentError):
        with self._lock:
            if self._broken is None:
                self._broken = msg
            pend, self._pending = self._pending, {}
            regs, self._registering = self._registering, {}
        for p in pend.values():
            p.on_done(msg)
        for cb in regs.values():
            cb(STATUS_FAILED, msg)
        with self._rcond:
            self._rcond.notify_all()

    # ---- reading the agent's answers ----

    def wait_for(self, event, timeout):
        """Waits until event is set by the completion of an answer, at most
        timeout seconds; returns whether it was.

        One thread at a time reads the socket (it holds the reading role)
        and completes what it reads, in order. A thread that waits for an
        operation reads itself when nobody else does, so that its answer
        wakes it straight from the socket, with no hand-over from another
        thread (a thread wake-up per operation, which on an idle many-core
        host is a good part of a 16 MiB all_reduce's overhead), and it stops
        reading as soon as its own answer is in. Nobody else is woken unless
        it has something to do: another thread blocked here, or the
        background thread while answers nobody waits for are due. The
        background thread reads when operations are pending that nobody
        waits for (futures: DDP's buckets; see read_in_background), and
        drains, once a second, what the agent sends unasked (FAILED while
        the group is idle); an operation issued meanwhile reads it before
        its own answer."""
        deadline = time.monotonic() + timeout
        rc = self._rcond
        if self._role_owner == threading.get_ident():
            # Called from a completion this thread is handling (a future's
            # callback that waits): go on reading here.
            while not event.is_set() and not self._ended:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._read(remaining, event)
            return event.is_set()
        while not event.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            with rc:
                if event.is_set():
                    break
                if self._reading or self._ended or not self._caller_reads:
                    # Another thread reads (and wakes the blocked after
                    # each answer and when it gives the role up), or nothing
                    # will be read any more (then _fail_all has completed
                    # everything).
                    self._blocked += 1
                    try:
                        rc.wait(remaining)
                    finally:
                        self._blocked -= 1
                    continue
                self._reading = True
                self._role_owner = threading.get_ident()
            try:
                self._read(remaining, event)
            finally:
                self._release_role()
        return True

    def read_in_background(self):
        """Lets the background thread read while operations are pending and
        nobody waits for them (a future was asked for)."""
        with self._rcond:
            self._bg_poked = True
            if self._bg_idle:
                self._rcond.notify_all()

    def _look(self):
        """Has the background thread read what has arrived, without waiting
        (the watchdog, once a second: answers nobody read, FAILED while the
        group is idle)."""
        with self._rcond:
            self._bg_look = True
            if self._bg_idle:
                self._rcond.notify_all()

    def _release_role(self):
        """Gives the reading role up, waking only threads that have
        something to do: those blocked in wait_for (their answer may have
        come, or one of them takes the role) and the background thread
        when it was asked to look or to read answers still due."""
        with self._rcond:
            self._reading = False
            self._role_owner = None
            if self._blocked or (self._bg_idle and (self._bg_look or (
                    self._bg_poked and (self._pending or self._registering)))):
                self._rcond.notify_all()

    def _read(self, timeout, event=None):
        """Under the reading role: reads and handles the answers that arrive
        within timeout seconds (None or at least _RECV_SLICE: within
        _RECV_SLICE, the socket's receive timeout; the caller looks again),
        then those already there, stopping once event (if given) is set."""
        if timeout is not None and timeout < _RECV_SLICE:
            if not self._poll.poll(0 if timeout <= 0 else max(1, math.ceil(timeout * 1000))):
                return
            flags = socket.MSG_DONTWAIT
        else:
            flags = 0
        while True:
            try:
                pkt = self._sock.recv(MAX_MESSAGE, flags)
            except BlockingIOError:
                return
            except OSError as e:
                self._lost(str(e))
                return
            if not pkt:
                self._lost("")
                return
            if not self._handle(pkt):
                self._ended = True
                return
            if self._blocked:
                # Another thread waits for its answer: this one may be it.
                with self._rcond:
                    self._rcond.notify_all()
            if event is not None and event.is_set():
                return
            flags = socket.MSG_DONTWAIT

    def _lost(self, err):
        self._ended = True
        if not self._closed:
            self._fail_all(
                "the connection to the local gpumesh agent was lost (the agent stopped or restarted"
                + (f": {err}" if err else "") + "); the job's restart policy starts a new generation")

    def _handle(self, pkt):
        """Completes what one answer says; False when the connection ends."""
        try:
            typ, status, oid, msg = _decode_reply(pkt)
        except AgentError as e:
            self._fail_all(str(e))
            return False
        if typ == MSG_DONE:
            with self._lock:
                p = self._pending.pop(oid, None)
                if status in (STATUS_FAILED, STATUS_MISMATCH) and self._broken is None:
                    self._broken = msg
            if p is not None:
                p.on_done(None if status == STATUS_OK else msg)
        elif typ == MSG_REGISTERED:
            with self._lock:
                cb = self._registering.pop(oid, None)
            if cb is not None:
                cb(status, msg)
        elif typ == MSG_FAILED:
            # The group failed (a peer died or aborted), possibly with
            # nothing in flight: fail what is pending and every later
            # operation at once.
            self._fail_all(f"the process group failed: {msg}")
        elif typ == MSG_ERROR:
            self._fail_all(f"the agent closed the connection: {msg}")
            return False
        return True

    def _background(self):
        rc = self._rcond
        while True:
            with rc:
                while not (self._ended or self._closed) and (
                        self._reading or (self._blocked and self._caller_reads)
                        or not (self._bg_poked or self._bg_look)):
                    self._bg_idle = True
                    try:
                        rc.wait()
                    finally:
                        self._bg_idle = False
                if self._ended or self._closed:
                    return
                self._reading = True
                self._role_owner = threading.get_ident()
                busy = not self._caller_reads or (self._bg_poked and self.pending() > 0)
                if not busy:
                    self._bg_poked = False  # done: what was pending has completed
                self._bg_look = False
            try:
                # Blocking (a receive timeout at a time) while answers
                # nobody waits for are due; a look without waiting
                # otherwise (the watchdog's).
                self._read(None if busy else 0)
            finally:
                self._release_role()

    def _watch(self):
        """Fails operations the agent has not answered within the timeout
        (plus a margin for the agent's own, which normally fires first), so
        that nothing waits forever on a wedged agent."""
        limit = self.timeout + 10.0
        while not self._stop.wait(min(1.0, limit / 4)):
            if self._caller_reads:
                self._look()  # answers nobody read, FAILED while idle
            now = time.monotonic()
            with self._lock:
                late = [p for p in self._pending.values() if now - p.issued > limit]
            if late:
                self._fail_all(f"{late[0].what} got no answer from the local agent in {limit:.0f} s")
                return

    def pending(self):
        with self._lock:
            return len(self._pending) + len(self._registering)

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                # On purpose: the agent closes the group without aborting
                # the peers (a connection closed without BYE means that
                # this process died).
                self._sock.send(_BYE.pack(MSG_BYE))
            except OSError:
                pass
        with self._rcond:
            self._rcond.notify_all()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._stop.set()
        self._join_threads()
        for seg in self._segments:
            seg.close()
        self._segments = []
        self._free = {}

    def _join_threads(self):
        """Waits (a bounded time) until the reader and watchdog threads
        have ended, so that no daemon thread still runs PyTorch code when
        the interpreter exits. Python ends a daemon thread that takes the
        GIL after finalization has begun with pthread_exit, whose unwinding
        through PyTorch's C++ frames (a staging tensor's deleter re-taking
        the GIL, a future's callbacks) calls std::terminate: the process
        dies with SIGABRT ("terminate called without an active exception")
        after the script has finished. The socket is shut down by now, so
        the reader's recv returns at once; close() is called at exit at the
        latest (weakref.finalize in gpumesh.torch)."""
        me = threading.current_thread()
        deadline = time.monotonic() + _JOIN_TIMEOUT
        for th in (self._reader, self._watchdog):
            if th is not me:
                th.join(max(0.0, deadline - time.monotonic()))


def _decode_reply(pkt):
    if len(pkt) == 8 and pkt[0] == MSG_WELCOME:
        return (MSG_WELCOME, pkt[1], 0, "")
    if len(pkt) < _REPLY.size:
        raise AgentError(f"gpumesh: a reply of {len(pkt)} bytes from the agent does not decode (agent and package versions differ?)")
    typ, status, n, oid = _REPLY.unpack_from(pkt)
    if len(pkt) != _REPLY.size + n:
        raise AgentError("gpumesh: a reply from the agent does not decode (agent and package versions differ?)")
    return (typ, status, oid, pkt[_REPLY.size:].decode("utf-8", "replace"))
