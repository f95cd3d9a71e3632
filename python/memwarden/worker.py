"""The model worker: ``python -m memwarden.worker [--worker-id ID] [--devices cpu,cuda:0]``.

The daemon starts it, reads protocol lines from its stdout and logs from its stderr, and writes
requests to its stdin (docs/PROTOCOL.md). When stdin is a Unix socket (the daemon's end of a
socketpair), requests may carry file descriptors: the worker then maps weights the daemon holds
(``loadModel`` with ``weights``) and follows their ``unmapWeights`` / ``remapWeights``. It loads ``.safetensors`` models, reports what each
occupies, and frees memory on request. Anything printed to stdout, by Python code or by a C
library writing to file descriptor 1, goes to stderr, so it cannot corrupt the protocol stream.
"""

from __future__ import annotations

import argparse
import os
import socket
import stat
import sys
from typing import Any, Dict, List, Optional

from . import protocol as P
from .endpoint import Endpoint, PipeTransport, SocketTransport, log
from .errors import WorkerError
from .models import ModelStore
from .runtime import cuda_devices, frameworks


class Worker:
    def __init__(self, store: ModelStore, devices: List[str]):
        self.store = store
        self.devices = devices
        # Sends an event to the daemon (the endpoint's, once it exists).
        self.notify: Any = lambda event, data: None

    def _device(self, device_id: Optional[str]) -> None:
        if device_id is not None and device_id not in self.devices:
            raise WorkerError(P.DEVICE_UNAVAILABLE, f"{device_id} is not one of this worker's devices {self.devices}")

    def handle(self, action: str, data: Dict[str, Any], fds: List[int]) -> Any:
        """Answers one request from the daemon; `fds` (a socket stdin only) carry weights."""
        if action in P.ACTION_DATA:
            P.check_data(P.ACTION_DATA[action], data)
        if action in P.PEER_ACTIONS:
            raise WorkerError(P.NOT_SUPPORTED, f"`{action}` is a request to the daemon")
        if action == "ping":
            return {"pong": True, "pid": os.getpid()}
        if action == "getModelInfo":
            return self.store.report(data.get("deviceId"))
        if action == "loadModel" and data.get("weights") is not None:
            return self._adopt(data, fds)
        if action == "loadModel":
            device = data.get("deviceId") or "cpu"
            self._device(device)
            m = self.store.load(
                data["path"], data.get("name"), device, data.get("priority", 50), bool(data.get("pinned")),
                data.get("modelId"),
            )
            return m.info()
        if action == "unloadModel":
            return self.store.unload(data["modelId"])
        if action == "offloadModel":
            return self.store.offload(data["modelId"], data.get("target") or "cpu")
        if action == "trimCache":
            return self.store.trim(data.get("deviceId"))
        if action == "optimizeMemory":
            return self.store.optimize(data["deviceId"], data["bytes"], data.get("deadlineMs"), data.get("excludeModels"))
        if action == "shutdown":
            return {}
        if action == "unmapWeights":
            return self._unmap(data)
        if action == "remapWeights":
            w = self._weights(data["modelId"])
            if not fds:
                raise WorkerError(P.INVALID_DATA, "remapWeights needs a descriptor per piece")
            taken, fds[:] = list(fds), []
            return {"sameAddress": w.remap(data, taken)}
        raise WorkerError(P.UNKNOWN_ACTION, f"unknown action `{action}`")

    def _weights(self, model_id: str) -> Any:
        m = self.store.get(model_id)
        if m.backend != "memwarden":
            raise WorkerError(P.MODEL_NOT_FOUND, f"model {model_id!r} is not held by the daemon")
        return m.tensors

    def _adopt(self, data: Dict[str, Any], fds: List[int]) -> Dict[str, Any]:
        """`loadModel` of weights the daemon holds: map them (no file is read here)."""
        from .weights import Weights  # noqa: PLC0415 (imports ctypes/mmap only when used)

        device = data.get("deviceId") or "cpu"
        self._device(device)
        if not fds:
            raise WorkerError(P.INVALID_DATA, "loadModel with weights needs a descriptor per piece")
        grant = data["weights"]
        P.check_data("WeightsGrant", grant)
        taken, fds[:] = list(fds), []
        w = Weights(grant, taken)
        m = self.store.adopt(grant["modelId"], data.get("name") or grant["name"], data.get("path"), device,
                             data.get("priority", 50), bool(data.get("pinned")), w)
        return m.info()

    def _unmap(self, data: Dict[str, Any]) -> Dict[str, Any]:
        w = self._weights(data["modelId"])
        if not w.wait_unused(data["timeoutMs"] / 1000):
            raise WorkerError(P.IN_USE, f"model {data['modelId']} is still in use after {data['timeoutMs']} ms")
        if data.get("confirmEarly"):  # quiet now: the daemon copies out while this unmaps
            w.settle()
            self.notify("weightsQuiesced", {"modelId": data["modelId"]})
        w.unmap(final=bool(data.get("final")))
        if data.get("final"):
            self.store.forget(data["modelId"])
        return {"unmapped": True}


class StdinSocketTransport(SocketTransport):
    """Requests and their descriptors arrive on stdin, a Unix socket; replies go to stdout, as
    over pipes (the daemon reads them there)."""

    def __init__(self, sock: socket.socket, wfile: Any):
        super().__init__(sock)
        self.wfile = wfile

    def write(self, data: bytes, fds: Any = ()) -> None:
        if fds:
            raise ValueError("a worker sends no descriptors")
        self.wfile.write(data)
        self.wfile.flush()


def transport(protocol_out: Any) -> Any:
    """A socket stdin carries descriptors; a pipe does not."""
    if stat.S_ISSOCK(os.fstat(0).st_mode):
        return StdinSocketTransport(socket.socket(fileno=os.dup(0)), protocol_out)
    return PipeTransport(sys.stdin.buffer, protocol_out)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m memwarden.worker", description=__doc__)
    ap.add_argument("--worker-id", default=os.environ.get("MEMWARDEN_WORKER_ID", f"worker-{os.getpid()}"))
    ap.add_argument("--devices", default="", help="comma-separated devices to serve (default: cpu and every CUDA device torch sees)")
    ap.add_argument("--backend", default=os.environ.get("MEMWARDEN_BACKEND", "auto"), choices=["auto", "bytes", "numpy", "torch"],
                    help="how CPU models are held (default auto: numpy when installed; env MEMWARDEN_BACKEND)")
    args = ap.parse_args(argv)

    # The protocol gets a private copy of fd 1; fd 1 itself (and sys.stdout) become stderr, so
    # stray prints, even from C libraries writing to fd 1, go to the log, never into the stream.
    sys.stdout.flush()
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    asked = [d for d in args.devices.split(",") if d]
    # Importing torch to list GPUs takes seconds: only when a GPU is asked for, or nothing is named.
    available = ["cpu"] + (cuda_devices() if not asked or any(d.startswith("cuda") for d in asked) else [])
    devices = asked or available
    missing = [d for d in devices if d not in available]
    if missing:
        log(f"devices {missing} are not available here (available: {available}); serving the rest")
        devices = [d for d in devices if d in available]
    worker = Worker(ModelStore(args.backend), devices)
    ep = Endpoint(transport(protocol_out), worker.handle)
    worker.notify = ep.notify
    ep.send(P.hello(args.worker_id, os.getpid(), "worker", frameworks(), devices))
    log(f"worker {args.worker_id} ready (pid {os.getpid()}, devices {devices})")
    ep.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
