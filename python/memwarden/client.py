"""Attach an existing inference process to the memwarden daemon.

    import memwarden.client

    client = memwarden.client.connect(name="sd-server")          # $XDG_RUNTIME_DIR/memwarden.sock
    handle = client.register("sdxl-unet", unet, device="cuda:0", priority=70,
                             on_release=lambda model_id, action: drop_unet())
    ...
    client.touch(handle)          # on each use: least recently used models go first
    client.unregister(handle)     # when the process frees the model itself

    weights = client.load_weights("/models/unet.safetensors", device="cuda:0")   # held by memwarden
    unet.load_state_dict(weights, assign=True)    # or weights.bind(unet): re-assigned after a move
    with weights.use():                           # not parked meanwhile; resumed if it was
        image = pipe(prompt)
    client.release_weights(weights)
    client.close()

The daemon sees the registered models in ``GET /api/memory/models`` and, under pressure, asks this
process to free memory: ``trimCache`` (gc + ``torch.cuda.empty_cache()`` + the ``on_trim``
callback), ``offloadModel`` / ``unloadModel`` (the model's ``on_release(model_id, action)``
callback; the model is forgotten after an unload), ``optimizeMemory`` (trim, then release the
least valuable unpinned models until enough is freed). Requests are answered on a background
thread; callbacks must be thread-safe. Sizes are the sum of the model's tensors' bytes, per device.

Weights loaded with ``load_weights`` stay in memwarden's memory and are mapped here without a copy
(``memwarden.weights``); the daemon unmaps them (``unmapWeights``, once no ``use()`` is open) and
remaps them (``remapWeights``) as memory pressure comes and goes. A failed request raises
``DaemonError`` with the daemon's error code. Closing the connection unmaps nothing: the daemon
counts this process as a holder no more.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Dict, Iterable, List, Optional

from . import protocol as P
from .endpoint import Endpoint, SocketTransport, close_fds
from .errors import DaemonError, WorkerError
from .runtime import frameworks, malloc_trim, rss_bytes
from .weights import Weights

__all__ = ["Client", "DaemonError", "Weights", "connect", "default_socket_path", "tensor_bytes"]

ReleaseCallback = Callable[[str, str], Any]


def default_socket_path() -> str:
    """``$MEMWARDEN_SOCKET``, else ``$XDG_RUNTIME_DIR/memwarden.sock``, else
    ``/tmp/memwarden-<uid>/memwarden.sock`` (the daemon's defaults, docs/CONFIG.md)."""
    if os.environ.get("MEMWARDEN_SOCKET"):
        return os.environ["MEMWARDEN_SOCKET"]
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run:
        return os.path.join(run, "memwarden.sock")
    return f"/tmp/memwarden-{os.getuid()}/memwarden.sock"


def tensor_bytes(obj: Any) -> Dict[str, int]:
    """Bytes per device of a model's tensors: a torch Module (parameters and buffers), a mapping
    of tensors / numpy arrays / bytes, or an iterable of them."""
    out: Dict[str, int] = {}

    def add(dev: str, n: int) -> None:
        out[dev] = out.get(dev, 0) + int(n)

    def visit(x: Any) -> None:
        if hasattr(x, "parameters") and hasattr(x, "buffers"):  # torch.nn.Module
            seen = set()
            for t in itertools.chain(x.parameters(), x.buffers()):
                if id(t) not in seen:
                    seen.add(id(t))
                    visit(t)
        elif hasattr(x, "element_size") and hasattr(x, "numel"):  # torch.Tensor
            dev = x.device
            add("cpu" if dev.type == "cpu" else f"{dev.type}:{dev.index or 0}", x.numel() * x.element_size())
        elif hasattr(x, "nbytes") and hasattr(x, "dtype"):  # numpy array
            add("cpu", x.nbytes)
        elif isinstance(x, (bytes, bytearray, memoryview)):
            add("cpu", len(x) if not isinstance(x, memoryview) else x.nbytes)
        elif isinstance(x, dict):
            for v in x.values():
                visit(v)
        elif isinstance(x, Iterable) and not isinstance(x, str):
            for v in x:
                visit(v)
        else:
            raise TypeError(f"cannot size a {type(x).__name__}: pass a torch Module, tensors, arrays or bytes")

    visit(obj)
    return out


class Registration:
    def __init__(self, model_id: str, name: str, obj: Any, device: str, priority: int, pinned: bool,
                 on_release: Optional[ReleaseCallback]):
        self.model_id = model_id
        self.name = name
        self.obj: Any = obj
        self.device = device
        self.priority = priority
        self.pinned = pinned
        self.on_release = on_release
        self.loaded_at = datetime.now(timezone.utc)
        self.last_access = self.loaded_at
        self.by_device = tensor_bytes(obj) if obj is not None else {}

    def info(self) -> Dict[str, Any]:
        size = sum(self.by_device.values())
        return {
            "modelId": self.model_id,
            "modelName": self.name,
            "deviceId": self.device,
            "sizeBytes": size,
            "bytesByDevice": dict(self.by_device),
            "loadedAt": P.timestamp(self.loaded_at),
            "lastAccess": P.timestamp(self.last_access),
            "loadTimeMs": 0.0,
            "priority": self.priority,
            "pinned": self.pinned,
            "path": None,
            "tensorCount": 0,
            "backend": "client",
        }


class Client:
    def __init__(self, sock: socket.socket, name: str, on_trim: Optional[Callable[[], Any]] = None):
        self.name = name
        self.on_trim = on_trim
        self._sock = sock
        self._models: Dict[str, Registration] = {}
        self._weights: Dict[str, Weights] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._endpoint = Endpoint(SocketTransport(sock), self._handle)
        devices = ["cpu"]
        self._endpoint.send(P.hello(name, os.getpid(), "client", frameworks(), devices))
        self._thread = threading.Thread(target=self._endpoint.serve, name="memwarden-client", daemon=True)
        self._thread.start()

    # ---- the application's side ----

    def register(self, name: str, model: Any, device: str = "cpu", priority: int = 50, pinned: bool = False,
                 on_release: Optional[ReleaseCallback] = None, timeout_s: float = 10.0) -> str:
        """Tells the daemon this process holds `model` on `device` (a `register` request); returns
        the model id the daemon answers with. The daemon's canonical device id (``gpu-0`` →
        ``cuda:0``) replaces `device`. Raises DaemonError when the daemon refuses, e.g.
        ``DEVICE_NOT_FOUND`` (``tpu:7``) or ``BACKEND_UNAVAILABLE`` (``cuda:0`` on a host without
        a GPU): nothing is registered then."""
        if not 0 <= priority <= 100:
            raise ValueError("priority must be 0-100")
        # Ids go into URLs (DELETE /api/memory/models/{id}): letters, digits, '.', '_', '-' only.
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{self.name}.{name}")
        reg = Registration(f"{safe}-{next(self._ids)}", name, model, device, priority, pinned, on_release)
        reply, fds = self._endpoint.call("register", reg.info(), timeout_s)
        close_fds(fds)
        reg.model_id = reply.get("modelId") or reg.model_id
        reg.device = reply.get("deviceId") or reg.device
        with self._lock:
            self._models[reg.model_id] = reg
        return reg.model_id

    def touch(self, model_id: str) -> None:
        with self._lock:
            reg = self._models.get(model_id)
        if reg is not None:
            reg.last_access = datetime.now(timezone.utc)

    def unregister(self, model_id: str) -> None:
        with self._lock:
            reg = self._models.pop(model_id, None)
        if reg is not None:
            self._endpoint.send(P.notification("modelUnloaded", {"modelId": model_id, "freedBytes": sum(reg.by_device.values())}))

    def allocate(self, size_bytes: int, device: str = "cpu", memory_type: Optional[str] = None,
                 purpose: Optional[str] = None, owner: Optional[str] = None, alignment: Optional[int] = None,
                 movable: bool = False, timeout_s: float = 60) -> Dict[str, Any]:
        """Allocates memory owned by this connection: the daemon frees it (``reclaimed``) when the
        connection closes, whether by ``close()`` or because this process died. ``memory_type`` is
        ``host``, ``pinned``, ``device`` or ``reservation`` (the device's default when None); the
        quota owner is ``owner`` or this client's name. Returns the REST API's allocation object
        (``allocationId``, ``address``, ``ownerClient``, ...). Raises DaemonError
        (INSUFFICIENT_MEMORY, QUOTA_EXCEEDED, DEVICE_NOT_FOUND, INVALID_ARGUMENT, ...)."""
        data: Dict[str, Any] = {"sizeBytes": size_bytes, "deviceId": device, "movable": movable}
        for key, value in (("memoryType", memory_type), ("purpose", purpose), ("owner", owner),
                           ("alignment", alignment)):
            if value is not None:
                data[key] = value
        reply, fds = self._endpoint.call("allocate", data, timeout_s)
        close_fds(fds)
        return reply

    def free(self, allocation_id: str, timeout_s: float = 60) -> Dict[str, Any]:
        """Frees an allocation this connection made with ``allocate``: ``{allocationId, freedBytes}``.
        Raises DaemonError (ALLOCATION_NOT_FOUND; PERMISSION_DENIED for another's allocation)."""
        reply, fds = self._endpoint.call("free", {"allocationId": allocation_id}, timeout_s)
        close_fds(fds)
        return reply

    def export(self, allocation_id: str, timeout_s: float = 60) -> "tuple[Dict[str, Any], Optional[int]]":
        """What another process needs to map an allocation: the REST export's answer (``kind``
        ``shm``, ``cudaIpc`` or ``vulkanOpaqueFd``, ``offset``, ...) and, for Vulkan memory, its
        opaque file descriptor, which only this socket can carry. Returns ``(export, fd)``; the
        caller owns ``fd`` (import it with ``VkImportMemoryFdInfoKHR``: ``allocationBytes``,
        ``memoryTypeIndex``, ``dedicated``, on the device whose UUID is ``deviceUuid``; or close
        it); ``fd`` is None for the other kinds. The allocation is never moved afterwards. Raises
        DaemonError (ALLOCATION_NOT_FOUND; INVALID_OPERATION for memory that cannot be shared)."""
        reply, fds = self._endpoint.call("export", {"allocationId": allocation_id}, timeout_s)
        if len(fds) > 1:
            close_fds(fds[1:])
        return reply, (fds[0] if fds else None)

    def load_weights(self, path: str, device: str = "cpu", name: Optional[str] = None, priority: int = 50,
                     pinned: bool = False, keep_alive_ms: Optional[int] = None, timeout_s: float = 600) -> Weights:
        """Has the daemon load `path` (a .safetensors file, a sharded checkpoint's
        *.safetensors.index.json, or a model folder: one mapping for all its shards) onto `device`, or share what it already
        holds of it, and maps its memory here: returns the tensors as ``Weights``. One process
        holds a model once: loading it again returns the same ``Weights``. Raises DaemonError
        (FILE_NOT_FOUND, INVALID_MODEL_FILE, INSUFFICIENT_MEMORY, …)."""
        data: Dict[str, Any] = {"path": os.path.abspath(path), "deviceId": device, "priority": priority, "pinned": pinned}
        if name is not None:
            data["name"] = name
        if keep_alive_ms is not None:
            data["keepAliveMs"] = keep_alive_ms
        grant, fds = self._endpoint.call("loadWeights", data, timeout_s)
        pieces = grant.get("pieces") if isinstance(grant, dict) else None
        want = len(pieces) if isinstance(pieces, list) and pieces else 1
        if len(fds) != want:
            close_fds(fds)
            raise P.ProtocolError(
                P.MALFORMED_MESSAGE, f"a loadWeights reply must carry {want} descriptor(s), it carried {len(fds)}")
        with self._lock:
            held = self._weights.get(grant.get("modelId")) if isinstance(grant, dict) else None
        if held is not None:
            close_fds(fds)
            return held
        try:
            weights = Weights(grant, fds, peer=self._endpoint)
        except Exception:
            self._tell_released(grant.get("modelId") if isinstance(grant, dict) else None)
            raise
        with self._lock:
            self._weights[weights.model_id] = weights
        return weights

    def release_weights(self, weights: Weights, timeout_s: float = 10.0) -> Dict[str, Any]:
        """Unmaps `weights` here (after any open use(), waiting at most `timeout_s`: IN_USE after)
        and tells the daemon (`releaseWeights`); the weights stay in memwarden for other holders or
        until evicted. Returns the daemon's ``{"modelId", "state", "holders"}``."""
        if not weights.wait_unused(timeout_s):
            raise WorkerError(P.IN_USE, f"a use() of {weights.model_id} stayed open past {timeout_s:g} s")
        with self._lock:
            self._weights.pop(weights.model_id, None)
        weights.unmap(final=True)
        reply, fds = self._endpoint.call("releaseWeights", {"modelId": weights.model_id})
        close_fds(fds)
        return reply

    def _tell_released(self, model_id: Optional[str]) -> None:
        """After a grant could not be mapped: the daemon must not count this process as a holder."""
        if model_id:
            try:
                self._endpoint.call("releaseWeights", {"modelId": model_id})
            except (DaemonError, OSError):
                pass

    def close(self) -> None:
        self._endpoint.stopping.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=2)

    @property
    def connected(self) -> bool:
        return not self._endpoint.stopping.is_set()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- the daemon's requests ----

    def _get(self, model_id: str) -> Registration:
        with self._lock:
            reg = self._models.get(model_id)
        if reg is None:
            raise WorkerError(P.MODEL_NOT_FOUND, f"no model {model_id!r} is registered here")
        return reg

    def _release(self, reg: Registration, action: str) -> Dict[str, Any]:
        if reg.pinned:
            raise WorkerError(P.NOT_SUPPORTED, f"model {reg.model_id} is pinned")
        if reg.on_release is None:
            raise WorkerError(P.NOT_SUPPORTED, f"model {reg.model_id} has no on_release callback")
        freed_by = dict(reg.by_device)
        reg.on_release(reg.model_id, action)
        if action == "unload":
            with self._lock:
                self._models.pop(reg.model_id, None)
            reg.obj = None
        else:
            freed_by = {k: v for k, v in freed_by.items() if k != "cpu"}
            reg.by_device = {"cpu": sum(reg.by_device.values())}
            reg.device = "cpu"
        self._after_release()
        return {"freedBytes": sum(freed_by.values()), "freedByDevice": freed_by, "actions": [f"{action}:{reg.model_id}"]}

    @staticmethod
    def _after_release() -> None:
        gc.collect()
        import sys

        if "torch" in sys.modules:
            torch = sys.modules["torch"]
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.empty_cache()
        malloc_trim()

    def _trim(self) -> Dict[str, Any]:
        before = rss_bytes()
        if self.on_trim is not None:
            self.on_trim()
        self._after_release()
        freed = max(0, before - rss_bytes())
        return {"freedBytes": freed, "freedByDevice": {"cpu": freed}, "actions": ["trimCache"]}

    def _held(self, model_id: str) -> Weights:
        with self._lock:
            weights = self._weights.get(model_id)
        if weights is None:
            raise WorkerError(P.MODEL_NOT_FOUND, f"weights {model_id!r} are not mapped here")
        return weights

    def _unmap_weights(self, data: Dict[str, Any]) -> Dict[str, Any]:
        weights = self._held(data["modelId"])
        if not weights.wait_unused(data["timeoutMs"] / 1000):
            raise WorkerError(P.IN_USE, f"a use() of {weights.model_id} stayed open past {data['timeoutMs']} ms")
        if data.get("confirmEarly"):
            # No use() is open and none can start, and the kernels they launched are done: the
            # daemon may copy the memory out while this process unmaps (the unmap is the slow
            # part with several holders at once).
            weights.settle()
            self._endpoint.notify("weightsQuiesced", {"modelId": weights.model_id})
        if data.get("final"):
            with self._lock:
                self._weights.pop(weights.model_id, None)
        weights.unmap(final=bool(data.get("final")))
        return {"unmapped": True}

    def _remap_weights(self, data: Dict[str, Any], fds: List[int]) -> Dict[str, Any]:
        if not fds:
            raise WorkerError(P.INVALID_DATA, "remapWeights must carry a descriptor per piece, it carried none")
        weights = self._held(data["modelId"])
        taken, fds[:] = list(fds), []
        return {"sameAddress": weights.remap(data, taken)}

    def _handle(self, action: str, data: Dict[str, Any], fds: List[int]) -> Any:
        if action in P.ACTION_DATA:
            P.check_data(P.ACTION_DATA[action], data)
        if action in P.PEER_ACTIONS:
            raise WorkerError(P.NOT_SUPPORTED, f"`{action}` is a request to the daemon")
        if action == "unmapWeights":
            return self._unmap_weights(data)
        if action == "remapWeights":
            return self._remap_weights(data, fds)
        if action == "ping":
            return {"pong": True, "pid": os.getpid()}
        if action == "getModelInfo":
            with self._lock:
                regs = list(self._models.values())
            dev = data.get("deviceId")
            return {"models": [r.info() for r in regs if dev in (None, r.device)], "memory": {}, "rssBytes": rss_bytes()}
        if action == "unloadModel":
            return self._release(self._get(data["modelId"]), "unload")
        if action == "offloadModel":
            if (data.get("target") or "cpu") != "cpu":
                raise WorkerError(P.NOT_SUPPORTED, "only offloading to cpu is supported")
            return self._release(self._get(data["modelId"]), "offload")
        if action == "trimCache":
            return self._trim()
        if action == "optimizeMemory":
            deadline = time.monotonic() + (data.get("deadlineMs") or 3_600_000) / 1000
            out = self._trim()
            freed, actions = 0, list(out["actions"])
            excluded = set(data.get("excludeModels") or [])
            with self._lock:
                regs = [r for r in self._models.values() if r.device == data["deviceId"] and not r.pinned
                        and r.on_release is not None and r.model_id not in excluded]
            for reg in sorted(regs, key=lambda r: (r.priority, r.last_access)):
                if freed >= data["bytes"] or time.monotonic() > deadline:
                    break
                r = self._release(reg, "unload")
                freed += r["freedBytes"]
                actions += r["actions"]
            return {"freedBytes": freed, "freedByDevice": {data["deviceId"]: freed}, "actions": actions}
        if action == "loadModel":
            raise WorkerError(P.NOT_SUPPORTED, "an attached client loads its own models")
        if action == "shutdown":
            raise WorkerError(P.NOT_SUPPORTED, "an attached client is not shut down by the daemon")
        raise WorkerError(P.UNKNOWN_ACTION, f"unknown action `{action}`")


def connect(path: Optional[str] = None, name: Optional[str] = None, timeout_s: float = 5.0,
            on_trim: Optional[Callable[[], Any]] = None) -> Client:
    """Connects to the daemon's socket and says hello. Raises OSError when no daemon listens."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    sock.connect(path or default_socket_path())
    sock.settimeout(None)
    return Client(sock, name or f"client-{os.getpid()}", on_trim)
