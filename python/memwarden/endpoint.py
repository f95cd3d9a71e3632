"""One protocol connection seen from the Python side: reads requests line by line, runs them,
writes replies. Shared by the worker (stdio) and the client (Unix socket).

``ping`` is answered on the reading thread; every other action runs on a small thread pool, so a
long ``loadModel`` never delays a health check. Writes are serialized by a lock, one line each.
A line that cannot be understood gets an error reply when it named a request, and is logged
(to stderr) otherwise; it never ends the loop.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO, Callable, Dict

from . import protocol as P
from .models import WorkerError

Handler = Callable[[str, Dict[str, Any]], Any]


def log(msg: str) -> None:
    sys.stderr.write(f"memwarden: {msg}\n")
    sys.stderr.flush()


class Endpoint:
    def __init__(self, rfile: BinaryIO, wfile: BinaryIO, handler: Handler, threads: int = 2):
        self.rfile = rfile
        self.wfile = wfile
        self.handler = handler
        self._write_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="memwarden")
        self.stopping = threading.Event()

    def send(self, body: Dict[str, Any]) -> None:
        line = (P.encode(body) + "\n").encode()
        with self._write_lock:
            self.wfile.write(line)
            self.wfile.flush()

    def _run(self, rid: str, action: str, data: Dict[str, Any]) -> None:
        try:
            result = self.handler(action, data)
            reply = P.ok(rid, result if result is not None else {})
        except (WorkerError, P.ProtocolError) as e:
            reply = P.error(rid, e.code, e.message)
        except Exception as e:  # a bug in a handler or a callback: reported, the loop goes on
            reply = P.error(rid, P.INTERNAL, f"{type(e).__name__}: {e}")
        try:
            self.send(reply)
        except (OSError, ValueError):
            self.stopping.set()
        if action == "shutdown" and reply["success"]:
            self.stopping.set()

    def serve(self) -> None:
        """Runs until end of input or a `shutdown` request."""
        try:
            for raw in iter(self.rfile.readline, b""):
                if not raw.strip():
                    continue
                try:
                    msg = P.decode(raw.decode("utf-8", errors="replace"))
                except P.ProtocolError as e:
                    if e.request_id is not None:
                        self.send(P.error(e.request_id, e.code, e.message))
                    else:
                        log(f"ignored a line: {e}")
                    continue
                if msg.kind != "request":
                    log(f"ignored a {msg.kind} line (only requests are expected)")
                    continue
                rid, action, data = msg.request_id, msg.action, msg.data
                if action == "ping":
                    self._run(rid, action, data)
                elif action == "shutdown":
                    self._pool.shutdown(wait=True)
                    self._run(rid, action, data)
                else:
                    self._pool.submit(self._run, rid, action, data)
                if self.stopping.is_set():
                    break
        finally:
            self._pool.shutdown(wait=False)
            self.stopping.set()
