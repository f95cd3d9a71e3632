"""A standard-library reader and writer of `.safetensors` files.

The format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N,
N bytes of JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``,
then the tensor bytes, offsets relative to the end of the header. Written by hand because the
worker's core must run without numpy or the `safetensors` package; with them installed, the
worker uses them instead (see ``memwarden.models``).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Tuple

from .dtypes import DTYPE_BYTES

MAX_HEADER_BYTES = 100 << 20


class SafetensorsError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    dtype: str
    shape: Tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class Header:
    tensors: List[TensorInfo]
    metadata: Dict[str, str]
    data_start: int  # file offset of the first tensor byte
    data_bytes: int  # bytes of the data section the tensors cover

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def read_header(path: str) -> Header:
    """Reads and checks the header: dtypes known, sizes consistent with shapes, offsets inside
    the file and not overlapping."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise SafetensorsError(f"{path}: shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} is impossible for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise SafetensorsError(f"{path}: header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    tensors = []
    for name, t in header.items():
        try:
            dtype, shape, (begin, end) = t["dtype"], tuple(t["shape"]), t["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} lacks dtype/shape/data_offsets") from None
        if dtype not in DTYPE_BYTES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unknown dtype {dtype}")
        count = 1
        for d in shape:
            count *= d
        if end - begin != count * DTYPE_BYTES[dtype] or begin < 0:
            raise SafetensorsError(f"{path}: tensor {name!r}: offsets {begin}..{end} do not fit {dtype}{list(shape)}")
        if data_start + end > size:
            raise SafetensorsError(f"{path}: tensor {name!r} ends past the end of the file")
        tensors.append(TensorInfo(name, dtype, shape, begin, end))
    tensors.sort(key=lambda t: t.begin)
    for a, b in zip(tensors, tensors[1:]):
        if b.begin < a.end:
            raise SafetensorsError(f"{path}: tensors {a.name!r} and {b.name!r} overlap")
    data_bytes = tensors[-1].end if tensors else 0
    return Header(tensors, metadata, data_start, data_bytes)


def read_data(path: str, header: Header) -> mmap.mmap:
    """Reads the data section into fresh anonymous memory (committed, counted in RSS, returned
    to the OS on close()). Tensors are views into it at their offsets."""
    buf = mmap.mmap(-1, max(header.data_bytes, 1))
    with open(path, "rb") as f:
        f.seek(header.data_start)
        view = memoryview(buf)
        done = 0
        try:
            while done < header.data_bytes:
                got = f.readinto(view[done : header.data_bytes])
                if not got:
                    raise SafetensorsError(f"{path}: file ended while reading tensors")
                done += got
        finally:
            view.release()
    return buf


def write(path: str, tensors: Mapping[str, Tuple[str, Tuple[int, ...], bytes]], metadata: Optional[Dict[str, str]] = None) -> int:
    """Writes ``{name: (dtype, shape, raw bytes)}``; returns the tensor bytes written."""
    header: Dict[str, object] = {}
    offset = 0
    for name, (dtype, shape, data) in tensors.items():
        count = 1
        for d in shape:
            count *= d
        if len(data) != count * DTYPE_BYTES[dtype]:
            raise SafetensorsError(f"tensor {name!r}: {len(data)} bytes do not fit {dtype}{list(shape)}")
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
    if metadata:
        header["__metadata__"] = metadata
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, (_, _, data) in tensors.items():
            f.write(data)
    return offset
