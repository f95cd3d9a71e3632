"""Every dtype the safetensors format defines (as the daemon's `safetensors` crate does) is
known here, sized right, checked in a grant, and given a torch/numpy type where one exists."""

import mmap
import types

import pytest
from conftest import has_numpy

from memwarden import dtypes as D
from memwarden import protocol as P
from memwarden import weights as W

# The Rust `safetensors` 0.6 crate's `Dtype` variants (Cargo.lock pins it): the daemon accepts
# each of these and names each in a grant's tensor table.
RUST_DTYPES = [
    "BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0",
    "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64",
]


def test_every_dtype_the_daemon_accepts_is_known_and_sized():
    assert sorted(D.DTYPE_BITS) == sorted(RUST_DTYPES)
    assert D.tensor_nbytes("F4", [2, 3]) == 3
    assert D.tensor_nbytes("F6_E3M2", [4]) == 3
    assert D.tensor_nbytes("BF16", [5]) == 10
    assert D.tensor_nbytes("F8_E8M0", []) == 1
    assert "F4" not in D.DTYPE_BYTES and D.DTYPE_BYTES["F8_E8M0"] == 1


def test_torch_names_are_torch_types_where_torch_has_one():
    assert D.TORCH_DTYPES["F8_E4M3"] == "float8_e4m3fn"
    assert D.TORCH_DTYPES["F8_E5M2"] == "float8_e5m2"
    assert D.TORCH_DTYPES["F8_E8M0"] == "float8_e8m0fnu"
    assert D.TORCH_DTYPES["BF16"] == "bfloat16"
    assert D.TORCH_DTYPES["U64"] == "uint64"
    old_torch = types.SimpleNamespace(float32="f32")  # a torch without uint16 or float8
    assert D.torch_dtype(old_torch, "F32") == "f32"
    assert D.torch_dtype(old_torch, "U16") is None
    assert D.torch_dtype(old_torch, "F4") is None


def grant(tensors):
    return {"allocationBytes": 4096, "tensors": tensors}


def test_a_grant_of_every_dtype_passes_the_layout_check_and_a_bad_size_does_not():
    tensors, at = [], 0
    for name in RUST_DTYPES:
        shape = [8]
        nbytes = D.tensor_nbytes(name, shape)
        tensors.append({"name": name, "dtype": name, "shape": shape, "offset": at, "nbytes": nbytes})
        at += 64
    W.check_layout(grant(tensors))
    assert all(P._tensor_entry(t) for t in tensors)
    with pytest.raises(P.ProtocolError, match="do not fit"):
        W.check_layout(grant([{"name": "x", "dtype": "F4", "shape": [8], "offset": 0, "nbytes": 8}]))
    with pytest.raises(P.ProtocolError, match="unknown dtype 'Q4'"):
        W.check_layout(grant([{"name": "x", "dtype": "Q4", "shape": [8], "offset": 0, "nbytes": 4}]))


@pytest.mark.skipif(not has_numpy(), reason="numpy not installed")
def test_numpy_views_keep_types_numpy_has_and_raw_bytes_of_the_others():
    mm = mmap.mmap(-1, 4096)
    mm[0:8] = bytes(range(8))
    views = W._host_views(mm, [
        {"name": "u16", "dtype": "U16", "shape": [2, 2], "offset": 0, "nbytes": 8},
        {"name": "bf", "dtype": "BF16", "shape": [4], "offset": 0, "nbytes": 8},
        {"name": "f4", "dtype": "F4", "shape": [4, 4], "offset": 0, "nbytes": 8},
    ], "numpy")
    assert views["u16"].dtype.str == "<u2" and views["u16"].shape == (2, 2)
    assert views["bf"].dtype.str == "<u2"
    assert views["f4"].dtype.str == "|u1" and views["f4"].shape == (8,)
    assert views["f4"].tobytes() == bytes(range(8))
    del views
    mm.close()
