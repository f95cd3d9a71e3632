"""One protocol connection seen from the Python side, shared by the worker (stdio) and the client
(Unix socket). Requests go both ways (docs/PROTOCOL.md, version 2):

- Requests from the daemon: ``ping`` is answered on the reading thread; every other action runs on
  a thread pool, so a long ``loadModel`` never delays a health check and a handler blocked on a
  ``use()`` (``unmapWeights``) never blocks the replies to this side's own requests.
- Requests from this side: ``call()`` sends one with the id ``c1``, ``c2``, … and waits for the
  reply with that id, which the reading thread hands over.

Writes are serialized by a lock, one line each. A line that cannot be understood gets an error
reply when it named a request, and is logged (to stderr) otherwise; it never ends the loop. An
``error`` notification from the daemon (a notification of this side's was refused, e.g. a model on
a device the daemon's host lacks) is kept and raised as ``DaemonError`` by the next ``call()``.

File descriptors travel only over a socket (``SocketTransport``): a line that carries ``n`` says
``"fds": n`` and its descriptors ride, as one ``SCM_RIGHTS`` message, on the ``sendmsg`` whose data
starts with the line's first byte. The receiver queues descriptors in arrival order and gives the
next ``n`` to a line that declares ``n``; those no line claims are closed.

Ownership of descriptors: a handler receives the request's descriptors as a list and takes one by
removing it from the list; whatever is left when it returns (or raises) is closed. A handler may
return ``WithFds(data, fds)`` to reply with descriptors, which are closed once sent. ``call()``
returns the reply's descriptors to the caller, who owns them; ``send(body, fds)`` and ``call(...,
fds=...)`` leave the caller's descriptors open.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import sys
import threading
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Deque, Dict, List, Optional, Sequence, Set, Tuple

from . import protocol as P
from .errors import DaemonError, WorkerError

Handler = Callable[[str, Dict[str, Any], List[int]], Any]

MAX_FDS_PER_READ = 64  # SCM_RIGHTS descriptors accepted per recvmsg (the kernel allows 253 per message)
READ_BYTES = 1 << 16


def log(msg: str) -> None:
    sys.stderr.write(f"memwarden: {msg}\n")
    sys.stderr.flush()


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class WithFds:
    """A handler's result that replies with descriptors; they are closed once sent."""

    data: Any
    fds: List[int] = field(default_factory=list)


class PipeTransport:
    """Lines over a pair of byte streams (a supervised worker's stdin and stdout). No descriptor
    can travel: a line that declares some is malformed, and sending some is a bug."""

    def __init__(self, rfile: BinaryIO, wfile: BinaryIO):
        self.rfile = rfile
        self.wfile = wfile

    def read_line(self) -> Optional[bytes]:
        """The next line with its newline, or None at end of input."""
        return self.rfile.readline() or None

    def take_fds(self, n: int) -> List[int]:
        if n:
            raise P.ProtocolError(P.MALFORMED_MESSAGE, f"the line declares {n} descriptors; none travel over a pipe")
        return []

    def line_done(self) -> None:
        pass

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        if fds:
            raise ValueError("file descriptors cannot travel over a pipe")
        self.wfile.write(data)
        self.wfile.flush()

    def close(self) -> None:
        pass


class SocketTransport:
    """Lines and their descriptors over a connected Unix stream socket.

    Each received descriptor is queued with the stream offset at which the ``recvmsg`` that brought
    it ended: its line starts before that offset. Once a line ending at offset ``e`` is handled,
    queued descriptors that arrived by ``e`` belonged to it or to an earlier line and were not
    claimed, so they are closed.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self._buf = bytearray()
        self._received = 0  # stream offset of the end of what was read so far
        self._line_end = 0  # stream offset of the end of the last line handed out
        self._fds: Deque[Tuple[int, int]] = collections.deque()  # (offset of arrival, fd)

    def read_line(self) -> Optional[bytes]:
        while True:
            nl = self._buf.find(b"\n")
            if nl >= 0:
                line = bytes(self._buf[: nl + 1])
                del self._buf[: nl + 1]
                self._line_end += len(line)
                return line
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, READ_BYTES, MAX_FDS_PER_READ, socket.MSG_CMSG_CLOEXEC)
            except OSError:
                data, fds, flags = b"", [], 0
            self._received += len(data)
            self._fds.extend((self._received, fd) for fd in fds)
            if flags & socket.MSG_CTRUNC:
                log(f"more than {MAX_FDS_PER_READ} descriptors arrived at once; the kernel dropped the rest")
            if not data:
                return None  # a last unterminated fragment is dropped, as readline's would not parse
            self._buf += data

    def take_fds(self, n: int) -> List[int]:
        """The next `n` queued descriptors, for the line just read."""
        if n > len(self._fds):
            raise P.ProtocolError(P.MALFORMED_MESSAGE, f"the line declares {n} descriptors; {len(self._fds)} arrived")
        return [self._fds.popleft()[1] for _ in range(n)]

    def line_done(self) -> None:
        """Closes the descriptors that came with the line just handled or before it, unclaimed."""
        while self._fds and self._fds[0][0] <= self._line_end:
            fd = self._fds.popleft()[1]
            log(f"closed a descriptor no line claimed (fd {fd})")
            close_fds([fd])

    def write(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Sends one line; its descriptors go with the sendmsg that carries its first byte."""
        sent = socket.send_fds(self.sock, [data], list(fds)) if fds else 0
        if sent < len(data):
            self.sock.sendall(data[sent:])

    def close(self) -> None:
        close_fds([fd for _, fd in self._fds])
        self._fds.clear()


class _Pending:
    """A call waiting for its reply."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.body: Optional[Dict[str, Any]] = None
        self.fds: List[int] = []
        self.lost = False  # the connection closed first


class Endpoint:
    def __init__(self, transport: Any, handler: Handler, threads: int = 4):
        self.transport = transport
        self.handler = handler
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memwarden")
        self._running: Set[futures.Future] = set()  # requests on the pool, not yet answered
        self._ids = itertools.count(1)
        self._pending: Dict[str, _Pending] = {}
        self._pending_lock = threading.Lock()
        self._notice: Optional[DaemonError] = None  # the daemon's last `error` notification, not yet raised
        self.stopping = threading.Event()

    # ---- sending ----

    def send(self, body: Dict[str, Any], fds: Sequence[int] = ()) -> None:
        """Writes one line; `fds` (left open) travel with it. Sets `"fds"` in the line to their count."""
        if fds:
            body = dict(body, fds=len(fds))
        line = (P.encode(body) + "\n").encode()
        with self._write_lock:
            self.transport.write(line, fds)

    def notify(self, event: str, data: Any) -> None:
        self.send(P.notification(event, data))

    def call(self, action: str, data: Optional[Dict[str, Any]] = None, timeout_s: float = 10.0,
             fds: Sequence[int] = ()) -> Tuple[Any, List[int]]:
        """Sends a request to the daemon and waits for its reply: returns the reply's data and the
        descriptors it carried (the caller owns them). Raises DaemonError on a failed reply,
        TimeoutError when none comes in `timeout_s` (a late reply is dropped), ConnectionError when
        the connection closes first. An ``error`` notification that came since the last call is
        raised first, as DaemonError, and the request is not sent."""
        rid = f"c{next(self._ids)}"
        pending = _Pending()
        with self._pending_lock:
            notice, self._notice = self._notice, None
            if notice is not None:
                raise notice
            if self.stopping.is_set():
                raise ConnectionError("the connection to the daemon is closed")
            self._pending[rid] = pending
        try:
            try:
                self.send(P.request(rid, action, data), fds)
            except (OSError, ValueError) as e:
                raise ConnectionError(f"sending `{action}` failed: {e}") from e
            pending.done.wait(timeout_s)
        finally:
            with self._pending_lock:  # from here on no reply can reach `pending`
                self._pending.pop(rid, None)
        if not pending.done.is_set():
            raise TimeoutError(f"no reply to `{action}` ({rid}) within {timeout_s:g} s")
        if pending.lost:
            raise ConnectionError(f"the connection closed before the reply to `{action}` ({rid})")
        body = pending.body or {}
        if not body.get("success"):
            close_fds(pending.fds)
            err = body.get("error") or {}
            raise DaemonError(err.get("code", P.INTERNAL), err.get("message", ""))
        result = body.get("data")
        return ({} if result is None else result), pending.fds

    # ---- receiving ----

    def _deliver(self, rid: str, body: Dict[str, Any], fds: List[int]) -> None:
        """Hands a reply to the call waiting for it; a reply nobody waits for is dropped."""
        with self._pending_lock:
            pending = self._pending.get(rid)
            if pending is not None and not pending.done.is_set():
                pending.body, pending.fds = body, fds
                pending.done.set()
                return
        log(f"dropped a reply to {rid!r}: no call waits for it (late or unknown)")
        close_fds(fds)

    def _fail_pending(self) -> None:
        with self._pending_lock:
            for pending in self._pending.values():
                pending.lost = True
                pending.done.set()

    def _run(self, rid: str, action: str, data: Dict[str, Any], fds: List[int]) -> None:
        reply_fds: List[int] = []
        try:
            result = self.handler(action, data, fds)
            if isinstance(result, WithFds):
                result, reply_fds = result.data, result.fds
            reply = P.ok(rid, result if result is not None else {})
        except (WorkerError, P.ProtocolError) as e:
            reply = P.error(rid, e.code, e.message)
        except Exception as e:  # a bug in a handler or a callback: reported, the loop goes on
            reply = P.error(rid, P.INTERNAL, f"{type(e).__name__}: {e}")
        finally:
            close_fds(fds)  # those the handler did not take
        try:
            self.send(reply, reply_fds)
        except (OSError, ValueError):
            self.stopping.set()
        finally:
            close_fds(reply_fds)
        if action == "shutdown" and reply["success"]:
            self.stopping.set()

    def _handle_line(self, raw: bytes) -> None:
        try:
            msg = P.decode(raw.decode("utf-8", errors="replace"))
        except P.ProtocolError as e:
            if e.request_id is not None:
                self.send(P.error(e.request_id, e.code, e.message))
            else:
                log(f"ignored a line: {e}")
            return
        try:
            fds = self.transport.take_fds(msg.fds)
        except P.ProtocolError as e:
            log(f"a {msg.kind} line lacks descriptors: {e}")
            if msg.kind == "request":
                self.send(P.error(msg.request_id, e.code, e.message))
            elif msg.kind == "reply":  # the call fails now instead of waiting for its timeout
                self._deliver(msg.request_id, P.error(msg.request_id, e.code, e.message), [])
            return
        if msg.kind == "reply":
            self._deliver(msg.request_id, msg.body, fds)
        elif msg.kind == "notification" and msg.event == "error":
            close_fds(fds)
            data = msg.data if isinstance(msg.data, dict) else {}
            notice = DaemonError(str(data.get("code") or P.INTERNAL), str(data.get("message") or ""))
            log(f"the daemon refused a notification: {notice}")
            with self._pending_lock:
                self._notice = notice
        elif msg.kind != "request":
            close_fds(fds)
            log(f"ignored a {msg.kind} line (only requests and replies are expected)")
        elif msg.action == "ping":
            self._run(msg.request_id, msg.action, msg.data, fds)
        elif msg.action == "shutdown":  # answered once the requests under way are
            futures.wait(list(self._running))
            self._run(msg.request_id, msg.action, msg.data, fds)
        else:
            fut = self._pool.submit(self._run, msg.request_id, msg.action, msg.data, fds)
            self._running.add(fut)
            fut.add_done_callback(self._running.discard)

    def serve(self) -> None:
        """Runs until end of input or a `shutdown` request; then calls still waiting fail."""
        try:
            while not self.stopping.is_set():
                raw = self.transport.read_line()
                if raw is None:
                    break
                if raw.strip():
                    self._handle_line(raw)
                self.transport.line_done()
        except (OSError, ValueError) as e:  # writing an error reply failed: the connection is gone
            log(f"connection lost: {e}")
        finally:
            self.stopping.set()
            self._fail_pending()
            self._pool.shutdown(wait=False)
            self.transport.close()

