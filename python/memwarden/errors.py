"""The package's errors, shared by the worker, the client and held weights.

- ``WorkerError``: a request this process cannot do; the endpoint answers it as a failed reply
  with ``code`` (a ``memwarden.protocol`` error code such as ``MODEL_NOT_FOUND``) and ``message``.
- ``DaemonError``: the reverse, a request this process sent that the daemon answered with a
  failed reply.
"""

from __future__ import annotations


class WorkerError(Exception):
    """A request this side cannot do: answered to the daemon as a failed reply with ``code`` (a
    ``memwarden.protocol`` error code) and ``message``."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


class DaemonError(Exception):
    """A request this side sent was answered with a failed reply: ``code`` and ``message`` are the
    reply's ``error`` (e.g. ``FILE_NOT_FOUND``, ``IN_USE``, ``INSUFFICIENT_MEMORY``)."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
