"""The models a worker holds, and the memory they really occupy.

Backends, picked per load:
- ``torch``: for ``cuda:N`` devices (and offloaded models on the CPU); tensors are torch tensors.
- ``numpy``: for ``cpu`` when numpy is installed (with ``safetensors`` installed, its loader).
- ``bytes``: for ``cpu`` with the standard library only: the data section in one anonymous
  mapping, tensors as views into it; unloading unmaps it, so the RSS drops at once.

A model's size is the sum of its tensors' bytes. Unloading drops every reference, runs
``gc.collect()``, returns freed host heap to the OS (``malloc_trim``) and, for torch,
``torch.cuda.empty_cache()`` so the bytes go back to the driver, where the daemon measures them.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
import time
from datetime import datetime, timezone
from typing import Any, Dict, List, Optional

from . import protocol as P
from . import safetensors_io as st
from .dtypes import DTYPE_BYTES, NUMPY_DTYPES, NUMPY_LACKS, torch_dtype
from .errors import WorkerError
from .runtime import cuda_devices, has_module, import_torch, malloc_trim, rss_bytes

_ids = itertools.count(1)


def pool_reserved_bytes(pool: Any) -> Optional[int]:
    """Bytes of the segments a torch.cuda.MemPool holds (what unloading returns to the driver)."""
    if pool is None or not hasattr(pool, "snapshot"):
        return None
    try:
        return int(sum(seg["total_size"] for seg in pool.snapshot()))
    except Exception:
        return None


class Model:
    def __init__(self, model_id: str, name: str, path: Optional[str], device_id: str, priority: int, pinned: bool):
        self.model_id = model_id
        self.name = name
        self.path = path
        self.device_id = device_id
        self.priority = priority
        self.pinned = pinned
        self.loaded_at = datetime.now(timezone.utc)
        self.last_access = self.loaded_at
        self.load_time_ms = 0.0
        self.tensor_count = 0
        self.size_bytes = 0
        self.backend = "bytes"
        self.tensors: Any = None  # mmap (bytes), {name: array/tensor}, or the mapped Weights (memwarden)
        # torch on a GPU: the model's own caching-allocator pool (torch.cuda.MemPool), so its
        # segments are not shared with other models' tensors and unloading returns all of them.
        self.pool: Any = None
        self.reserved_bytes: Optional[int] = None  # that pool's segments, when there is one

    def info(self) -> Dict[str, Any]:
        return {
            "modelId": self.model_id,
            "modelName": self.name,
            "deviceId": self.device_id,
            "sizeBytes": self.size_bytes,
            "bytesByDevice": {self.device_id: self.size_bytes},
            "loadedAt": P.timestamp(self.loaded_at),
            "lastAccess": P.timestamp(self.last_access),
            "loadTimeMs": round(self.load_time_ms, 3),
            "priority": self.priority,
            "pinned": self.pinned,
            "path": self.path,
            "tensorCount": self.tensor_count,
            "backend": self.backend,
            "reservedBytes": self.reserved_bytes,
        }

    def release(self) -> None:
        tensors, self.tensors = self.tensors, None
        if hasattr(tensors, "close"):
            tensors.close()
        elif isinstance(tensors, dict):
            tensors.clear()
        del tensors
        gc.collect()
        self.pool = None  # after the tensors: a pool is freed once nothing in it is alive


class ModelStore:
    """Thread-safe: loads run outside the lock, so a long load does not block getModelInfo."""

    def __init__(self, backend: str = "auto"):
        if backend not in ("auto", "bytes", "numpy", "torch"):
            raise ValueError(f"unknown backend {backend}")
        self.backend = backend
        self._lock = threading.Lock()
        self._models: Dict[str, Model] = {}

    # ---- queries ----

    def get(self, model_id: str) -> Model:
        with self._lock:
            m = self._models.get(model_id)
        if m is None:
            raise WorkerError(P.MODEL_NOT_FOUND, f"no model {model_id!r} is loaded here")
        return m

    def models(self, device_id: Optional[str] = None) -> List[Model]:
        with self._lock:
            ms = list(self._models.values())
        return [m for m in ms if device_id is None or m.device_id == device_id]

    def memory(self) -> Dict[str, Dict[str, int]]:
        out: Dict[str, Dict[str, int]] = {}
        for m in self.models():
            d = out.setdefault(m.device_id, {"allocatedBytes": 0, "reservedBytes": 0})
            d["allocatedBytes"] += m.size_bytes
            d["reservedBytes"] += m.size_bytes
        if "torch" in __import__("sys").modules:
            torch = import_torch()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    out[f"cuda:{i}"] = {
                        "allocatedBytes": int(torch.cuda.memory_allocated(i)),
                        "reservedBytes": int(torch.cuda.memory_reserved(i)),
                    }
        return out

    def report(self, device_id: Optional[str] = None) -> Dict[str, Any]:
        return {
            "models": [m.info() for m in self.models(device_id)],
            "memory": self.memory(),
            "rssBytes": rss_bytes(),
        }

    # ---- load ----

    def _pick_backend(self, device_id: str) -> str:
        if device_id.startswith("cuda"):
            if self.backend not in ("auto", "torch"):
                raise WorkerError(P.DEVICE_UNAVAILABLE, f"backend {self.backend} cannot place models on {device_id}")
            if device_id not in cuda_devices():
                raise WorkerError(P.DEVICE_UNAVAILABLE, f"{device_id} is not available to this worker (torch with CUDA is needed)")
            return "torch"
        if device_id != "cpu":
            raise WorkerError(P.DEVICE_UNAVAILABLE, f"unknown device {device_id!r}")
        if self.backend != "auto":
            if self.backend == "numpy" and not has_module("numpy"):
                raise WorkerError(P.DEVICE_UNAVAILABLE, "numpy is not installed")
            return self.backend
        return "numpy" if has_module("numpy") else "bytes"

    def load(self, path: str, name: Optional[str] = None, device_id: str = "cpu", priority: int = 50,
             pinned: bool = False, model_id: Optional[str] = None) -> Model:
        if not 0 <= priority <= 100:
            raise WorkerError(P.INVALID_DATA, f"priority {priority} is outside 0-100")
        if not os.path.isfile(path):
            raise WorkerError(P.FILE_NOT_FOUND, f"{path}: no such file")
        model_id = model_id or f"{os.getpid()}-{next(_ids)}"
        with self._lock:
            if model_id in self._models:
                raise WorkerError(P.INVALID_DATA, f"model id {model_id!r} is already loaded")
        backend = self._pick_backend(device_id)
        m = Model(model_id, name or os.path.basename(path).rsplit(".", 1)[0], path, device_id, priority, pinned)
        m.backend = backend
        t0 = time.perf_counter()
        try:
            header = st.read_header(path)
            m.tensor_count = len(header.tensors)
            if backend == "bytes":
                m.tensors = st.read_data(path, header)
                m.size_bytes = header.tensor_bytes
            elif backend == "numpy":
                m.tensors = self._load_numpy(path, header)
                m.size_bytes = sum(int(a.nbytes) for a in m.tensors.values())
            else:
                m.tensors, m.pool = self._load_torch(path, header, device_id)
                m.size_bytes = sum(t.numel() * t.element_size() for t in m.tensors.values())
                m.reserved_bytes = pool_reserved_bytes(m.pool)
        except st.SafetensorsError as e:
            raise WorkerError(P.LOAD_FAILED, str(e)) from None
        except MemoryError as e:
            raise WorkerError(P.LOAD_FAILED, f"out of memory loading {path}: {e}") from None
        except WorkerError:
            raise
        except Exception as e:  # a framework's own failure (CUDA OOM, bad dtype): reported, not fatal
            m.release()
            raise WorkerError(P.LOAD_FAILED, f"{type(e).__name__}: {e}") from None
        m.load_time_ms = (time.perf_counter() - t0) * 1000
        with self._lock:
            if model_id in self._models:
                m.release()
                raise WorkerError(P.INVALID_DATA, f"model id {model_id!r} is already loaded")
            self._models[model_id] = m
        return m

    @staticmethod
    def _load_numpy(path: str, header: st.Header) -> Dict[str, Any]:
        if has_module("safetensors") and not any(t.dtype in NUMPY_LACKS for t in header.tensors):
            from safetensors.numpy import load_file  # numpy has no bfloat16/float8: those use the reader below

            return dict(load_file(path))
        import numpy as np

        out = {}
        with open(path, "rb") as f:
            for t in header.tensors:
                count = t.nbytes // DTYPE_BYTES[t.dtype]
                arr = np.empty(count, dtype=NUMPY_DTYPES[t.dtype])
                f.seek(header.data_start + t.begin)
                if t.nbytes and f.readinto(memoryview(arr).cast("B")) != t.nbytes:
                    raise st.SafetensorsError(f"{path}: short read in {t.name}")
                out[t.name] = arr.reshape(t.shape)
        return out

    @staticmethod
    def _load_torch(path: str, header: st.Header, device_id: str):
        """Returns (tensors, pool). On a GPU the tensors are allocated in a private
        ``torch.cuda.MemPool`` when this torch has one (2.6+): PyTorch's caching allocator
        otherwise packs tensors of different models into shared 20 MiB segments, and unloading
        one model would return only the segments no other model touches."""
        torch = import_torch()
        pool = None
        ctx = contextlib.nullcontext()
        if device_id.startswith("cuda") and hasattr(torch.cuda, "MemPool") and hasattr(torch.cuda, "use_mem_pool"):
            pool = torch.cuda.MemPool()
            ctx = torch.cuda.use_mem_pool(pool, device=device_id)
        with ctx:
            tensors = ModelStore._load_torch_tensors(torch, path, header, device_id)
        return tensors, pool

    @staticmethod
    def _load_torch_tensors(torch: Any, path: str, header: st.Header, device_id: str) -> Dict[str, Any]:
        if has_module("safetensors"):
            from safetensors.torch import load_file

            return dict(load_file(path, device=device_id))
        out = {}
        buf = st.read_data(path, header)
        try:
            for t in header.tensors:
                dtype = torch_dtype(torch, t.dtype)
                if dtype is None or t.dtype not in DTYPE_BYTES:
                    raise WorkerError(P.INVALID_DATA, f"{path}: tensor {t.name!r} has dtype {t.dtype}, "
                                      f"which this torch ({torch.__version__}) cannot load")
                if t.nbytes == 0:
                    out[t.name] = torch.empty(t.shape, dtype=dtype, device=device_id)
                    continue
                src = torch.frombuffer(buf, dtype=dtype, count=t.nbytes // DTYPE_BYTES[t.dtype], offset=t.begin)
                out[t.name] = src.reshape(t.shape).to(device_id, copy=True)
                del src
            if device_id.startswith("cuda"):
                torch.cuda.synchronize(device_id)
        finally:
            gc.collect()
            buf.close()
        return out

    # ---- release ----

    def _after_release(self, device_id: str) -> None:
        gc.collect()
        if device_id.startswith("cuda") and "torch" in __import__("sys").modules:
            torch = import_torch()
            torch.cuda.synchronize(device_id)
            torch.cuda.empty_cache()
        else:
            malloc_trim()

    def adopt(self, model_id: str, name: str, path: Optional[str], device_id: str, priority: int, pinned: bool,
              weights: Any) -> Model:
        """Holds a model whose weights the daemon holds (``weights``: a mapped ``memwarden.weights.
        Weights``): no bytes are loaded here, the tensors are the mapping."""
        m = Model(model_id, name, path, device_id, priority, pinned)
        m.backend = "memwarden"
        m.tensors = weights
        m.tensor_count = len(weights)
        m.size_bytes = int(weights.grant["dataBytes"])
        with self._lock:
            if model_id in self._models:
                raise WorkerError(P.INVALID_DATA, f"model id {model_id!r} is already loaded")
            self._models[model_id] = m
        return m

    def forget(self, model_id: str) -> Optional[Model]:
        """Drops a model from the listing without releasing anything (its owner did)."""
        with self._lock:
            return self._models.pop(model_id, None)

    def unload(self, model_id: str) -> Dict[str, Any]:
        with self._lock:
            m = self._models.pop(model_id, None)
        if m is None:
            raise WorkerError(P.MODEL_NOT_FOUND, f"no model {model_id!r} is loaded here")
        freed, device = m.size_bytes, m.device_id
        m.release()
        del m
        self._after_release(device)
        return {"freedBytes": freed, "freedByDevice": {device: freed}, "actions": [f"unload:{model_id}"]}

    def offload(self, model_id: str, target: str = "cpu") -> Dict[str, Any]:
        m = self.get(model_id)
        if target != "cpu":
            raise WorkerError(P.NOT_SUPPORTED, f"offload target {target!r} is not supported (only cpu)")
        if m.device_id == "cpu":
            return {"freedBytes": 0, "freedByDevice": {}, "actions": [], "model": m.info()}
        if m.backend != "torch":
            raise WorkerError(P.NOT_SUPPORTED, f"model {model_id} ({m.backend}) cannot move")
        source = m.device_id
        m.tensors = {k: v.to("cpu") for k, v in m.tensors.items()}
        gc.collect()
        m.pool = None
        m.reserved_bytes = None
        m.device_id = "cpu"
        m.last_access = datetime.now(timezone.utc)
        self._after_release(source)
        return {"freedBytes": m.size_bytes, "freedByDevice": {source: m.size_bytes},
                "actions": [f"offload:{model_id}"], "model": m.info()}

    def trim(self, device_id: Optional[str] = None) -> Dict[str, Any]:
        before_rss = rss_bytes()
        freed_by: Dict[str, int] = {}
        gc.collect()
        malloc_trim()
        freed_by["cpu"] = max(0, before_rss - rss_bytes())
        if "torch" in __import__("sys").modules:
            torch = import_torch()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                for i in range(torch.cuda.device_count()):
                    dev = f"cuda:{i}"
                    if device_id not in (None, dev):
                        continue
                    before = torch.cuda.memory_reserved(i)
                    with torch.cuda.device(i):
                        torch.cuda.empty_cache()
                    freed_by[dev] = max(0, int(before - torch.cuda.memory_reserved(i)))
        if device_id is not None:
            freed_by = {k: v for k, v in freed_by.items() if k == device_id}
        return {"freedBytes": sum(freed_by.values()), "freedByDevice": freed_by, "actions": ["trimCache"]}

    def optimize(self, device_id: str, nbytes: int, deadline_ms: Optional[int] = None,
                 exclude: Optional[List[str]] = None) -> Dict[str, Any]:
        """Frees at least `nbytes` on `device_id`: trim caches, then unload the least valuable
        models (lowest priority, then least recently used), never pinned or excluded ones."""
        deadline = time.monotonic() + (deadline_ms / 1000 if deadline_ms else 3600)
        out = self.trim(device_id)
        freed = out["freedByDevice"].get(device_id, 0)
        actions = list(out["actions"])
        excluded = set(exclude or [])
        victims = sorted(
            (m for m in self.models(device_id) if not m.pinned and m.model_id not in excluded),
            key=lambda m: (m.priority, m.last_access),
        )
        for m in victims:
            if freed >= nbytes or time.monotonic() > deadline:
                break
            r = self.unload(m.model_id)
            freed += r["freedBytes"]
            actions += r["actions"]
        return {"freedBytes": freed, "freedByDevice": {device_id: freed}, "actions": actions}

    def touch(self, model_id: str) -> None:
        self.get(model_id).last_access = datetime.now(timezone.utc)
