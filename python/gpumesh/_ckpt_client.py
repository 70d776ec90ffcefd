"""The checkpoint connection of the local protocol (node/localapi/ckpt_proto.go).

A rank's gpumesh.checkpoint module talks to its agent on the socket the
PyTorch backend uses, authenticated the same way (the task's secret): it
asks for a file to write its part into, has the agent store it, commits
the manifest, and is handed the part to load as a file descriptor (the
agent's prefetched copy) that it maps.
"""

import array
import json
import os
import socket
import struct
import threading

from . import _client

MSG_CKPT_HELLO, MSG_CKPT_REQUEST, MSG_CKPT_REPLY = 16, 17, 0x90
PUT_BEGIN, PUT_END, PUT_ABORT, COMMIT, LATEST, LIST, OPEN = 1, 2, 3, 4, 5, 6, 7
FLAG_BODY_IN_FD, FLAG_FILE = 1, 2

_HELLO = struct.Struct("<BBHHHIIQ")
_PACKET = struct.Struct("<BBBBIQ")
_MAX_INLINE = _client.MAX_MESSAGE - _PACKET.size


class RequestFailed(_client.AgentError):
    """The agent answered a request with an error (the message says why)."""


def from_env(env=None):
    """A connection for this process's rank, or None when it is not an
    exec rank of a gpumesh job whose agent serves the local API."""
    env = os.environ if env is None else env
    sock, secret = env.get(_client.ENV_SOCKET), env.get(_client.ENV_SECRET)
    job, gen = env.get("GPUMESH_JOB_ID"), env.get("GPUMESH_GENERATION")
    rank = env.get("GPUMESH_RANK", env.get("RANK"))
    if not sock or not secret or not job or not gen or rank is None:
        return None
    return AgentCheckpoints(sock, secret, job, int(gen), int(rank))


class AgentCheckpoints:
    """One checkpoint connection to the local agent; requests are answered
    in order, one at a time."""

    def __init__(self, socket_path, secret, job, generation, rank):
        self._lock = threading.Lock()
        self._next_id = 1
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            sock.connect(socket_path)
        except OSError as e:
            sock.close()
            raise _client.AgentError(
                f"gpumesh: cannot reach the local agent at {socket_path}: {e} "
                "(is the gpumesh agent of this node running?)") from e
        jb, sb = job.encode(), secret.encode()
        try:
            sock.send(_HELLO.pack(MSG_CKPT_HELLO, _client.VERSION, len(jb), len(sb), 0, rank, 0, generation) + jb + sb)
            r = _client._decode_reply(sock.recv(_client.MAX_MESSAGE))
        except (OSError, _client.AgentError) as e:
            sock.close()
            raise _client.AgentError(f"gpumesh: the local agent did not answer the checkpoint hello: {e}") from e
        if r[0] != _client.MSG_WELCOME:
            sock.close()
            raise _client.AgentError(
                f"gpumesh: the local agent refused checkpoints of rank {rank} of job {job} generation {generation}: {r[3]}")
        self._sock = sock

    def request(self, kind, body=None):
        """Send one request; returns (reply body dict, file descriptor or
        None, request id). A failed request raises RequestFailed."""
        b = json.dumps(body or {}).encode()
        with self._lock:
            rid = self._next_id
            self._next_id += 1
            fds = []
            flags = 0
            if len(b) > _MAX_INLINE:
                fds.append(_memfd_with(b))
                flags |= FLAG_BODY_IN_FD
            pkt = _PACKET.pack(MSG_CKPT_REQUEST, kind, flags, 0, len(b), rid)
            if not flags & FLAG_BODY_IN_FD:
                pkt += b
            try:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                self._sock.sendmsg([pkt], anc)
                msg, anc, _, _ = self._sock.recvmsg(_client.MAX_MESSAGE, socket.CMSG_SPACE(2 * 4))
            except OSError as e:
                raise _client.AgentConnectionLost(f"gpumesh: the connection to the local agent failed: {e}") from e
            finally:
                for fd in fds:
                    os.close(fd)
        got = []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[:len(data) - len(data) % a.itemsize])
                got.extend(a)
        try:
            if not msg:
                raise _client.AgentConnectionLost("gpumesh: the local agent closed the checkpoint connection "
                                                  "(it stopped or restarted)")
            if msg[0] != MSG_CKPT_REPLY:
                raise _client.AgentError(f"gpumesh: the agent closed the checkpoint connection: {_client._decode_reply(msg)[3]}")
            typ, status, rflags, _, n, oid = _PACKET.unpack_from(msg)
            if oid != rid:
                raise _client.AgentError(f"gpumesh: the agent answered request {oid}, not {rid}")
            if rflags & FLAG_BODY_IN_FD:
                if not got:
                    raise _client.AgentError("gpumesh: a reply from the agent lacks its body's descriptor")
                body_fd = got.pop(0)
                try:
                    data = os.pread(body_fd, n, 0)
                finally:
                    os.close(body_fd)
            else:
                data = msg[_PACKET.size:]
            if status != _client.STATUS_OK:
                raise RequestFailed(data.decode("utf-8", "replace"))
            fd = got.pop(0) if rflags & FLAG_FILE and got else None
            return json.loads(data or b"{}"), fd, rid
        except BaseException:
            for fd in got:
                os.close(fd)
            raise

    def close(self):
        self._sock.close()


def _memfd_with(b):
    fd = os.memfd_create("gpumesh-ckpt-body", os.MFD_CLOEXEC)
    os.pwrite(fd, b, 0)
    return fd
