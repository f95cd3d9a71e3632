"""The safetensors dtypes memwarden knows, and what each becomes in torch and numpy.

Keys are the safetensors names (``F32``, ``BF16``, ``F8_E4M3``, …), the same in the protocol's
tensor tables (docs/PROTOCOL.md).
"""

from __future__ import annotations

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

# The name of the ``torch`` attribute (``getattr(torch, TORCH_DTYPES[dtype])``).
TORCH_DTYPES = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "U16": "uint16", "U32": "uint32", "U64": "uint64",
}

# A numpy dtype string.
NUMPY_DTYPES = {
    "F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8",
    # numpy has no bfloat16 / float8: their bytes are kept as unsigned integers of that width.
    "BF16": "<u2", "F8_E4M3": "u1", "F8_E5M2": "u1",
}

# The dtypes numpy cannot represent (kept as unsigned integers of their width above).
NUMPY_LACKS = frozenset({"BF16", "F8_E4M3", "F8_E5M2"})
