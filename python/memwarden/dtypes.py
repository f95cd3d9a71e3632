"""The safetensors dtypes memwarden knows, and what each becomes in torch and numpy.

Keys are the safetensors names (``F32``, ``BF16``, ``F8_E4M3``, …), the same in the protocol's
tensor tables (docs/PROTOCOL.md): every dtype the format defines (the Rust `safetensors` crate
0.6: the sub-byte ``F4``, ``F6_E2M3`` and ``F6_E3M2`` included).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

# Bits per element of every dtype the safetensors format defines.
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16,
    "I32": 32, "U32": 32, "F32": 32,
    "I64": 64, "U64": 64, "F64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}

# Bytes per element of the dtypes whose elements are whole bytes (the worker's own reader and
# writer handle these).
DTYPE_BYTES = {name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0}

# The name of the ``torch`` attribute (``getattr(torch, TORCH_DTYPES[dtype])``): where torch
# has the type. ``F4`` and ``F6_*`` have none (torch's ``float4_e2m1fn_x2`` packs two elements
# per byte, another shape): they are given as their raw bytes, as is any dtype this torch lacks.
TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "U16": "uint16", "U32": "uint32", "U64": "uint64",
}

# A numpy dtype string.
NUMPY_DTYPES = {
    "F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8",
    # numpy has no bfloat16 / float8: their bytes are kept as unsigned integers of that width.
    "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1", "F8_E8M0": "u1",
}

# The dtypes numpy cannot represent (kept as unsigned integers of their width above, or, for
# the sub-byte ones, as their raw bytes).
NUMPY_LACKS = frozenset({"BF16", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2"})


def tensor_nbytes(dtype: str, shape: Sequence[int]) -> int:
    """The bytes a tensor of ``dtype`` and ``shape`` takes (KeyError for an unknown dtype)."""
    count = 1
    for d in shape:
        count *= d
    return (count * DTYPE_BITS[dtype] + 7) // 8


def torch_dtype(torch: Any, dtype: str) -> Optional[Any]:
    """torch's type for ``dtype``, or None where torch (or this version of it) has none."""
    name = TORCH_DTYPES.get(dtype)
    return getattr(torch, name, None) if name else None
