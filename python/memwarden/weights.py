"""Model weights held by the daemon, mapped into this process without a copy.

The daemon loads a ``.safetensors`` file once and grants each holder its memory as a file
descriptor plus a ``WeightsGrant`` (docs/PROTOCOL.md, version 2). ``Weights`` maps it and exposes
the tensors as a read-only mapping, so ``module.load_state_dict(weights, assign=True)`` makes a
module's parameters views into the daemon's memory:

- ``shm`` (host memory, a tmpfs file): ``mmap(MAP_SHARED)``; tensors are torch tensors when torch is
  installed, else numpy arrays (``BF16``/``F8`` as unsigned integers of that width, numpy has no
  such types), else ``memoryview`` slices of each tensor's raw bytes.
- ``cudaVmm`` (GPU memory, a CUDA VMM allocation): imported with the driver API into an address
  range this process reserves for the model's life; tensors are torch CUDA tensors.

The daemon may park GPU weights under memory pressure: it asks every holder to unmap (``unmapWeights``,
answered once no ``use()`` is open) and later to remap (``remapWeights``). Code that touches the
tensors wraps the work in ``with weights.use():``: entering while parked asks the daemon to resume
and waits for the remap. On the same device the memory comes back at the same address, so existing
tensors and the parameters assigned from them are valid again. On another device (or size) the
tensors are rebuilt and the modules given to ``bind()`` are re-assigned; CUDA graphs captured over
the old addresses must be captured again. Host (``shm``) weights are never parked, only unloaded:
after the final unmap their tensors are invalid.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from . import protocol as P
from .dtypes import DTYPE_BITS, NUMPY_DTYPES, tensor_nbytes, torch_dtype
from .endpoint import close_fds
from .errors import WorkerError
from .runtime import has_module, import_torch

RESUME_TIMEOUT_S = 300.0  # how long use() waits for parked weights to come back
USED_EVERY_S = 1.0  # weightsUsed is sent at most this often per model


# ---- the grant ----


def check_layout(grant: Dict[str, Any]) -> None:
    """Every tensor lies inside the mapping, its bytes match its shape, and its offset is aligned
    to its element size (a typed view needs it). Raises INVALID_DATA."""
    size = grant["allocationBytes"]
    for t in grant["tensors"]:
        if t["dtype"] not in DTYPE_BITS:
            raise P.ProtocolError(P.INVALID_DATA, f"tensor {t['name']!r}: unknown dtype {t['dtype']!r}")
        item = max(1, DTYPE_BITS[t["dtype"]] // 8)
        if t["nbytes"] != tensor_nbytes(t["dtype"], t["shape"]):
            raise P.ProtocolError(P.INVALID_DATA, f"tensor {t['name']!r}: {t['nbytes']} bytes do not fit {t['dtype']}{t['shape']}")
        if t["offset"] + t["nbytes"] > size:
            raise P.ProtocolError(P.INVALID_DATA, f"tensor {t['name']!r} ends past the {size}-byte mapping")
        if t["offset"] % item:
            raise P.ProtocolError(P.INVALID_DATA, f"tensor {t['name']!r}: offset {t['offset']} is not aligned to {item} bytes")


def grant_pieces(grant: Dict[str, Any]) -> List[Tuple[int, int]]:
    """``(offset, bytes)`` of each piece of the grant's memory, in order (one descriptor each);
    without ``pieces``, one piece covering the allocation. The pieces must tile
    ``[0, allocationBytes)`` exactly, else INVALID_DATA."""
    size = grant["allocationBytes"]
    pieces = [(p["offset"], p["bytes"]) for p in grant.get("pieces") or []] or [(0, size)]
    at = 0
    for off, n in pieces:
        if off != at:
            raise P.ProtocolError(P.INVALID_DATA, f"grant piece at {off} does not follow the previous one (ends at {at})")
        at += n
    if at != size:
        raise P.ProtocolError(P.INVALID_DATA, f"grant pieces cover {at} bytes of a {size}-byte mapping")
    return pieces


def cuda_ordinal(device_id: str) -> int:
    """``cuda:N`` → N (``cuda`` → 0)."""
    kind, _, index = device_id.partition(":")
    if kind != "cuda" or not (index or "0").isdigit():
        raise P.ProtocolError(P.INVALID_DATA, f"a cudaVmm grant needs a cuda device, got {device_id!r}")
    return int(index or 0)


def _check_fd_count(grant: Dict[str, Any], fds: List[int], pieces: List[Tuple[int, int]]) -> None:
    want = 1 if grant["handle"] == "shm" else len(pieces)
    if len(fds) != want:
        raise P.ProtocolError(P.INVALID_DATA, f"the grant needs {want} descriptor(s), {len(fds)} came")


# ---- the CUDA driver (ctypes on libcuda.so.1) ----

CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR = 1
CU_MEM_LOCATION_TYPE_DEVICE = 1
CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


class CUmemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class CUmemAccessDesc(ctypes.Structure):
    _fields_ = [("location", CUmemLocation), ("flags", ctypes.c_int)]


class CudaError(WorkerError):
    """A CUDA driver call failed; the message names the call and the CUresult
    (``CUDA_ERROR_OUT_OF_MEMORY`` is ``INSUFFICIENT_MEMORY``, anything else ``INTERNAL``)."""


_u64, _size = ctypes.c_uint64, ctypes.c_size_t
_SIGNATURES = {
    "cuInit": [ctypes.c_uint],
    "cuGetErrorName": [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)],
    "cuDeviceGet": [ctypes.POINTER(ctypes.c_int), ctypes.c_int],
    "cuDevicePrimaryCtxRetain": [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int],
    "cuCtxSetCurrent": [ctypes.c_void_p],
    "cuCtxSynchronize": [],
    "cuMemImportFromShareableHandle": [ctypes.POINTER(_u64), ctypes.c_void_p, ctypes.c_int],
    "cuMemAddressReserve": [ctypes.POINTER(_u64), _size, _size, _u64, _u64],
    "cuMemAddressFree": [_u64, _size],
    "cuMemMap": [_u64, _size, _size, _u64, _u64],
    "cuMemUnmap": [_u64, _size],
    "cuMemSetAccess": [_u64, _size, ctypes.POINTER(CUmemAccessDesc), _size],
    "cuMemRelease": [_u64],
}


class CudaDriver:
    """The few driver calls mapping needs. Every call's CUresult is checked. Each operation first
    makes the device's primary context (the one torch uses) current on the calling thread, since
    requests run on the endpoint's pool threads."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        for name, args in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self._contexts: Dict[int, ctypes.c_void_p] = {}
        self.check(self.lib.cuInit(0), "cuInit")

    def check(self, result: int, call: str) -> None:
        if result == 0:
            return
        name = ctypes.c_char_p()
        known = self.lib.cuGetErrorName(result, ctypes.byref(name)) == 0 and name.value
        text = name.value.decode() if known else f"CUresult {result}"
        code = P.INSUFFICIENT_MEMORY if text == "CUDA_ERROR_OUT_OF_MEMORY" else P.INTERNAL
        raise CudaError(code, f"{call}: {text}")

    def use_device(self, ordinal: int) -> None:
        ctx = self._contexts.get(ordinal)
        if ctx is None:
            dev, ctx = ctypes.c_int(), ctypes.c_void_p()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self._contexts[ordinal] = ctx
        self.check(self.lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")

    def reserve(self, size: int) -> int:
        ptr = _u64()
        self.check(self.lib.cuMemAddressReserve(ctypes.byref(ptr), size, 0, 0, 0), "cuMemAddressReserve")
        return ptr.value

    def free(self, ptr: int, size: int) -> None:
        self.check(self.lib.cuMemAddressFree(ptr, size), "cuMemAddressFree")

    def map_fd(self, fd: int, ptr: int, size: int, ordinal: int) -> None:
        """Imports the exported allocation `fd` and maps it read-write at `ptr` for `ordinal`. The
        imported handle is released once mapped (the mapping keeps the memory); `fd` is closed."""
        handle = _u64()
        try:
            self.check(self.lib.cuMemImportFromShareableHandle(
                ctypes.byref(handle), ctypes.c_void_p(fd), CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR),
                "cuMemImportFromShareableHandle")
        finally:
            os.close(fd)
        try:
            self.check(self.lib.cuMemMap(ptr, size, 0, handle, 0), "cuMemMap")
            desc = CUmemAccessDesc(CUmemLocation(CU_MEM_LOCATION_TYPE_DEVICE, ordinal), CU_MEM_ACCESS_FLAGS_PROT_READWRITE)
            try:
                self.check(self.lib.cuMemSetAccess(ptr, size, ctypes.byref(desc), 1), "cuMemSetAccess")
            except CudaError:
                self.lib.cuMemUnmap(ptr, size)
                raise
        finally:
            self.check(self.lib.cuMemRelease(handle), "cuMemRelease")

    def map_pieces(self, fds: List[int], ptr: int, pieces: List[Tuple[int, int]], ordinal: int) -> None:
        """Maps each piece's descriptor at ``ptr + offset`` (closes every descriptor); on a
        failure, the pieces mapped so far are unmapped again."""
        done: List[Tuple[int, int]] = []
        try:
            for i, (fd, (off, n)) in enumerate(zip(fds, pieces)):
                fds[i] = -1
                self.map_fd(fd, ptr + off, n, ordinal)
                done.append((off, n))
        except BaseException:
            for off, n in done:
                self.lib.cuMemUnmap(ptr + off, n)
            close_fds([fd for fd in fds if fd >= 0])
            raise

    def synchronize(self) -> None:
        """Waits for the work queued on the current context (every stream torch uses)."""
        self.check(self.lib.cuCtxSynchronize(), "cuCtxSynchronize")

    def unmap(self, ptr: int, pieces: List[Tuple[int, int]]) -> None:
        """Waits for the work queued on the context (kernels may still read the weights), then
        unmaps each piece (a mapping is unmapped whole, as it was mapped)."""
        self.synchronize()
        for off, n in pieces:
            self.check(self.lib.cuMemUnmap(ptr + off, n), "cuMemUnmap")


_driver: Optional[CudaDriver] = None
_driver_lock = threading.Lock()


def cuda_driver() -> CudaDriver:
    global _driver
    with _driver_lock:
        if _driver is None:
            try:
                _driver = CudaDriver()
            except OSError as e:
                raise WorkerError(P.DEVICE_UNAVAILABLE, f"cannot load the CUDA driver (libcuda.so.1): {e}") from None
        return _driver


class _CudaRange:
    """``__cuda_array_interface__`` over [ptr, ptr+size) as bytes: torch builds a tensor on it
    without copying and keeps this object alive while the tensor lives."""

    def __init__(self, ptr: int, size: int):
        self.__cuda_array_interface__ = {
            "version": 3, "shape": (size,), "typestr": "|u1", "data": (ptr, False), "strides": None, "stream": None,
        }


# ---- tensors over a mapping ----


def pick_backend(handle: str) -> str:
    """torch for CUDA; for host memory torch when installed, else numpy, else memoryviews."""
    if handle == "cudaVmm" or has_module("torch"):
        return "torch"
    return "numpy" if has_module("numpy") else "bytes"


def _torch_views(base: Any, tensors: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Typed views of `base` (uint8); a dtype torch has no type for (F4, F6_*, or one this
    torch lacks) is given as its raw bytes, a 1-D uint8 tensor of `nbytes`."""
    torch = import_torch()
    out = {}
    for t in tensors:
        raw = base[t["offset"]: t["offset"] + t["nbytes"]]
        dtype = torch_dtype(torch, t["dtype"])
        out[t["name"]] = raw if dtype is None else raw.view(dtype).reshape(t["shape"])
    return out


def _host_views(mm: mmap.mmap, tensors: List[Dict[str, Any]], backend: str) -> Dict[str, Any]:
    if backend == "torch":
        return _torch_views(import_torch().frombuffer(mm, dtype=import_torch().uint8), tensors)
    if backend == "numpy":
        import numpy as np  # noqa: PLC0415

        return {t["name"]: _numpy_view(np, mm, t) for t in tensors}
    whole = memoryview(mm)
    return {t["name"]: whole[t["offset"]: t["offset"] + t["nbytes"]] for t in tensors}


def _numpy_view(np: Any, mm: mmap.mmap, t: Dict[str, Any]) -> Any:
    """A numpy view of one tensor; a dtype numpy has no type of its width for (F4, F6_*) is
    given as its raw bytes (1-D uint8)."""
    dtype = NUMPY_DTYPES.get(t["dtype"])
    if dtype is None:
        return np.frombuffer(mm, dtype="u1", count=t["nbytes"], offset=t["offset"])
    return np.frombuffer(mm, dtype=dtype, count=math.prod(t["shape"]), offset=t["offset"]).reshape(t["shape"])


def _map_shm(fd: int, size: int) -> mmap.mmap:
    try:
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


# ---- Weights ----


class Weights(Mapping[str, Any]):
    """One model's weights mapped from the daemon: ``{name: tensor}``, read-only as a mapping (the
    tensors themselves are writable and shared with every other holder).

    ``model_id``, ``name``, ``device`` and ``shared`` come from the grant (``grant`` is the latest
    one). ``peer`` (the client) carries ``resumeWeights`` and ``weightsUsed``; without it, use()
    cannot bring back parked weights.
    """

    def __init__(self, grant: Dict[str, Any], fds: Union[int, Sequence[int]], peer: Any = None, backend: str = "auto"):
        fds = [fds] if isinstance(fds, int) else list(fds)
        try:
            P.check_data("WeightsGrant", grant)
            check_layout(grant)
            pieces = grant_pieces(grant)
            _check_fd_count(grant, fds, pieces)
        except P.ProtocolError:
            close_fds(fds)
            raise
        self.grant = grant
        self.backend = pick_backend(grant["handle"]) if backend == "auto" else backend
        self.resume_timeout_s = RESUME_TIMEOUT_S
        self._peer = peer
        self._tensors: Dict[str, Any] = {}
        self._shm: Optional[mmap.mmap] = None
        self._range: Optional[tuple] = None  # (ptr, size, ordinal) of the CUDA reservation
        self._pieces: List[Tuple[int, int]] = []  # (offset, bytes) of each mapped piece
        self._modules: "weakref.WeakKeyDictionary[Any, bool]" = weakref.WeakKeyDictionary()  # module → strict
        self._cond = threading.Condition()
        self._uses = 0
        self._mapped = False
        self._unmapping = False  # wait_unused() succeeded or is waiting: use() entries wait
        self._resuming = False
        self._released = False
        self._last_used = float("-inf")
        self._map_new(grant, fds, pieces)

    # -- attributes and the mapping --

    @property
    def model_id(self) -> str:
        return self.grant["modelId"]

    @property
    def name(self) -> str:
        return self.grant["name"]

    @property
    def device(self) -> str:
        return self.grant["deviceId"]

    @property
    def shared(self) -> bool:
        return self.grant["shared"]

    @property
    def mapped(self) -> bool:
        return self._mapped

    def __getitem__(self, name: str) -> Any:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._tensors))

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        state = "released" if self._released else "mapped" if self._mapped else "parked"
        return f"<Weights {self.model_id} {self.name!r} on {self.device}, {len(self)} tensors, {state}>"

    def bind(self, module: Any, strict: bool = True) -> Any:
        """Assigns these tensors to `module` (``load_state_dict(self, strict, assign=True)``) now
        and again whenever a remap rebuilds them at another address. Returns `module`."""
        module.load_state_dict(self, strict=strict, assign=True)
        with self._cond:
            self._modules[module] = strict
        return module

    # -- use() --

    @contextlib.contextmanager
    def use(self) -> Iterator["Weights"]:
        """Marks code that touches the tensors: the daemon does not unmap them meanwhile. Entering
        while parked resumes them (waits at most ``resume_timeout_s``; TimeoutError after)."""
        self._enter()
        try:
            yield self
        finally:
            self._exit()

    def _enter(self) -> None:
        deadline = time.monotonic() + self.resume_timeout_s
        while True:
            with self._cond:
                if self._released:
                    raise WorkerError(P.MODEL_NOT_FOUND, f"weights {self.model_id} were released")
                if self._mapped and not self._unmapping:
                    self._uses += 1
                    return
                resume = not self._mapped and not self._unmapping and not self._resuming
                if resume:
                    self._resuming = True
                elif not self._cond.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                    raise TimeoutError(f"weights {self.model_id} were not remapped within {self.resume_timeout_s:g} s")
            if resume:
                self._resume(deadline)

    def _resume(self, deadline: float) -> None:
        """Asks the daemon to remap; its remapWeights arrives before its reply."""
        try:
            if self._peer is None:
                raise WorkerError(P.NOT_SUPPORTED, f"weights {self.model_id} are parked and no client can resume them")
            self._peer.call("resumeWeights", {"modelId": self.model_id}, max(0.001, deadline - time.monotonic()))
            with self._cond:
                if not self._cond.wait_for(lambda: self._mapped or self._released, max(0.0, deadline - time.monotonic())):
                    raise TimeoutError(f"the daemon resumed {self.model_id} but no remap came")
        finally:
            with self._cond:
                self._resuming = False
                self._cond.notify_all()

    def _exit(self) -> None:
        with self._cond:
            self._uses -= 1
            if self._uses == 0:
                self._cond.notify_all()
            now = time.monotonic()
            tell = self._peer is not None and now - self._last_used >= USED_EVERY_S
            if tell:
                self._last_used = now
        if tell:
            try:
                self._peer.notify("weightsUsed", {"modelId": self.model_id})
            except (OSError, ValueError):
                pass  # the connection is gone: the daemon counts this holder as lost anyway

    def wait_unused(self, timeout_s: float) -> bool:
        """For an unmap: stops new use() entries and waits until none is open. True → the caller
        must now call unmap() (new entries wait until the remap); False → a use() stayed open past
        `timeout_s` and nothing changed."""
        with self._cond:
            self._unmapping = True
            if self._cond.wait_for(lambda: self._uses == 0, timeout_s):
                return True
            self._unmapping = False
            self._cond.notify_all()
            return False

    # -- mapping and unmapping --

    def settle(self) -> None:
        """Waits for the device work queued on this process's context (a kernel launched inside
        a use() that has ended may still write the weights): after it the memory's content is
        final. Host memory: nothing to wait for."""
        with self._cond:
            if self._mapped and self._range is not None:
                cuda_driver().use_device(self._range[2])
                cuda_driver().synchronize()

    def unmap(self, final: bool = False) -> None:
        """Unmaps the memory. CUDA: the address range stays reserved (a remap on the same device
        comes back there) unless `final`. Host: the tensors are dropped and the mapping closed.
        `final` (the model is unloaded or released) also forgets the tensors."""
        with self._cond:
            try:
                if self._mapped:
                    self._unmap_memory()
                if final:
                    self._free_range()
                    self._tensors = {}
                    self._released = True
            finally:
                self._unmapping = False
                self._cond.notify_all()

    def remap(self, grant: Dict[str, Any], fds: Union[int, Sequence[int]]) -> bool:
        """Maps the memory of `grant` (a remapWeights, one descriptor per piece) after an unmap.
        Returns True when it came back at the old address (every existing tensor is valid again),
        False when the tensors were rebuilt (and bound modules re-assigned)."""
        fds = [fds] if isinstance(fds, int) else list(fds)
        try:
            P.check_data("WeightsGrant", grant)
            check_layout(grant)
            pieces = grant_pieces(grant)
            _check_fd_count(grant, fds, pieces)
            with self._cond:
                if self._released or self._mapped:
                    state = "released" if self._released else "still mapped (no unmap came first)"
                    raise WorkerError(P.NOT_SUPPORTED, f"cannot remap weights {self.model_id}: {state}")
        except (P.ProtocolError, WorkerError):
            close_fds(fds)
            raise
        with self._cond:
            same = self._same_range(grant)
            if same:
                ptr, size, ordinal = self._range
                cuda_driver().use_device(ordinal)
                cuda_driver().map_pieces(fds, ptr, pieces, ordinal)
                self._pieces = pieces
                rebuilt = grant["tensors"] != self.grant["tensors"]
                if rebuilt:
                    self._tensors = _torch_views(self._cuda_base(), grant["tensors"])
                self.grant, self._mapped = grant, True
            else:
                self._free_range()
                self._map_new(grant, fds, pieces)
                rebuilt = True
            if rebuilt:  # before a use() waiting for the remap runs on the new tensors (the lock is an RLock)
                self._rebind()
            self._cond.notify_all()
        return same

    def _same_range(self, grant: Dict[str, Any]) -> bool:
        return (
            self._range is not None
            and grant["handle"] == "cudaVmm"
            and cuda_ordinal(grant["deviceId"]) == self._range[2]
            and grant["allocationBytes"] == self._range[1]
        )

    def _map_new(self, grant: Dict[str, Any], fds: List[int], pieces: List[Tuple[int, int]]) -> None:
        """Maps the pieces at a new place and builds the tensors over them (closes `fds`)."""
        size = grant["allocationBytes"]
        if grant["handle"] == "shm":
            self._shm = _map_shm(fds[0], size)
            self._tensors = _host_views(self._shm, grant["tensors"], self.backend)
        else:
            self._map_new_cuda(grant, fds, pieces, size)
        self.grant, self._mapped = grant, True

    def _map_new_cuda(self, grant: Dict[str, Any], fds: List[int], pieces: List[Tuple[int, int]], size: int) -> None:
        try:
            ordinal = cuda_ordinal(grant["deviceId"])
            import_torch().cuda.init()  # torch and these calls share the device's primary context
            cuda = cuda_driver()
            cuda.use_device(ordinal)
            ptr = cuda.reserve(size)
        except BaseException:
            close_fds(fds)
            raise
        try:
            cuda.map_pieces(fds, ptr, pieces, ordinal)
        except BaseException:
            cuda.free(ptr, size)
            raise
        self._range, self._pieces = (ptr, size, ordinal), pieces
        self._tensors = _torch_views(self._cuda_base(), grant["tensors"])

    def _cuda_base(self) -> Any:
        ptr, size, ordinal = self._range
        return import_torch().as_tensor(_CudaRange(ptr, size), device=f"cuda:{ordinal}")

    def _unmap_memory(self) -> None:
        if self._range is not None:
            ptr, _, ordinal = self._range
            cuda_driver().use_device(ordinal)
            cuda_driver().unmap(ptr, self._pieces)
        else:
            self._close_shm()
        self._mapped = False

    def _close_shm(self) -> None:
        """Drops the tensors and the mapping; it is unmapped with its last reference. A torch
        tensor or numpy array the application still holds keeps the mapping alive (and valid)
        until it is dropped; memoryviews are released at once. The mmap is never closed
        explicitly: torch.frombuffer keeps a reference to it but no buffer export, so a close
        would succeed under live tensors and leave them dangling."""
        views, self._tensors = self._tensors, {}
        for v in views.values():
            if isinstance(v, memoryview):
                with contextlib.suppress(BufferError):
                    v.release()
        self._shm = None

    def _free_range(self) -> None:
        if self._range is not None:
            ptr, size, ordinal = self._range
            self._range = None
            cuda_driver().use_device(ordinal)
            cuda_driver().free(ptr, size)

    def _rebind(self) -> None:
        with self._cond:
            modules = list(self._modules.items())
        for module, strict in modules:
            module.load_state_dict(self, strict=strict, assign=True)
