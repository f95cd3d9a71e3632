"""CUDA VMM weights (handle ``cudaVmm``) on a real GPU. Skipped unless MEMWARDEN_GPU_TESTS=1; with it
set, a missing torch or CUDA is a failure, not a skip.

The test process plays the daemon: it creates a VMM allocation exportable as a POSIX file
descriptor (cuMemCreate, cuMemExportToShareableHandle) and grants it, so no daemon is needed."""

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor

import pytest

from memwarden import protocol as P
from memwarden import weights as W

pytestmark = pytest.mark.skipif(os.environ.get("MEMWARDEN_GPU_TESTS") != "1", reason="set MEMWARDEN_GPU_TESTS=1 on a GPU machine")

CU_MEM_ALLOCATION_TYPE_PINNED = 1


class CUmemAllocationProp(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int), ("requestedHandleTypes", ctypes.c_int), ("location", W.CUmemLocation),
        ("win32HandleMetaData", ctypes.c_void_p), ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte), ("usage", ctypes.c_ushort), ("reserved", ctypes.c_ubyte * 4),
    ]


@pytest.fixture(scope="module")
def torch():
    import torch  # an ImportError fails the test: the GPU job must have torch

    assert torch.cuda.is_available(), "MEMWARDEN_GPU_TESTS=1 but torch sees no CUDA device"
    torch.cuda.init()
    return torch


class Allocation:
    """What the daemon holds: physical memory on cuda:0, exported as a new descriptor per holder."""

    def __init__(self, pages=1):
        self.cuda = W.cuda_driver()
        lib = self.cuda.lib
        lib.cuMemCreate.argtypes = [ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t, ctypes.POINTER(CUmemAllocationProp), ctypes.c_uint64]
        lib.cuMemExportToShareableHandle.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64]
        lib.cuMemGetAllocationGranularity.argtypes = [ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(CUmemAllocationProp), ctypes.c_int]
        prop = CUmemAllocationProp(CU_MEM_ALLOCATION_TYPE_PINNED, W.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
                                   W.CUmemLocation(W.CU_MEM_LOCATION_TYPE_DEVICE, 0))
        gran = ctypes.c_size_t()
        self.cuda.use_device(0)
        self.cuda.check(lib.cuMemGetAllocationGranularity(ctypes.byref(gran), ctypes.byref(prop), 0), "granularity")
        self.size = gran.value * pages
        self.handle = ctypes.c_uint64()
        self.cuda.check(lib.cuMemCreate(ctypes.byref(self.handle), self.size, ctypes.byref(prop), 0), "cuMemCreate")

    def export(self):
        fd = ctypes.c_int(-1)
        self.cuda.check(self.cuda.lib.cuMemExportToShareableHandle(
            ctypes.byref(fd), self.handle, W.CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0), "cuMemExportToShareableHandle")
        return fd.value

    def release(self):
        self.cuda.check(self.cuda.lib.cuMemRelease(self.handle), "cuMemRelease")


def grant(size, **kw):
    g = {
        "modelId": "w-gpu", "name": "tiny", "deviceId": "cuda:0", "handle": "cudaVmm", "allocationBytes": size,
        "dataBytes": 1040, "hash": "abc", "shared": False, "access": "readwrite",
        "tensors": [
            {"name": "w", "dtype": "BF16", "shape": [4, 4], "offset": 0, "nbytes": 32},
            {"name": "b", "dtype": "F32", "shape": [3], "offset": 512, "nbytes": 12},
            {"name": "steps", "dtype": "I64", "shape": [], "offset": 1024, "nbytes": 8},
        ],
    }
    g.update(kw)
    return g


def tiny_module(torch):
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.empty(4, 4, dtype=torch.bfloat16, device="meta"))
            self.b = torch.nn.Parameter(torch.empty(3, device="meta"))
            self.register_buffer("steps", torch.empty((), dtype=torch.int64, device="meta"))

        def forward(self, x):
            return (x @ self.w.float()).sum() + self.b.sum()

    return Tiny()


def test_vmm_weights_are_shared_parked_and_come_back_at_the_same_address(torch):
    alloc = Allocation()
    first = W.Weights(grant(alloc.size), alloc.export())
    second = W.Weights(grant(alloc.size, shared=True), alloc.export())
    try:
        w, b = first["w"], first["b"]
        assert w.device == torch.device("cuda:0") and w.dtype == torch.bfloat16 and w.shape == (4, 4)
        assert first["steps"].shape == () and first["steps"].dtype == torch.int64
        w.fill_(1.5)
        b.copy_(torch.tensor([1.0, 2.0, 3.0]))
        first["steps"].fill_(7)
        # The second holder maps the same physical memory at its own address.
        assert second["b"].data_ptr() != b.data_ptr()
        assert second["b"].tolist() == [1.0, 2.0, 3.0] and second["w"].float().sum().item() == 24.0

        module = first.bind(tiny_module(torch))
        assert module.w.data_ptr() == w.data_ptr() and int(module.steps) == 7
        before = module(torch.ones(1, 4, device="cuda:0")).item()

        assert first.wait_unused(1.0)
        first.unmap()
        assert not first.mapped and len(first) == 3  # tensors kept; their addresses stay reserved
        assert first.remap(grant(alloc.size), alloc.export()) is True
        assert first["b"] is b and b.data_ptr() == module.b.data_ptr()
        assert module(torch.ones(1, 4, device="cuda:0")).item() == before  # the same tensors, valid again
    finally:
        first.unmap(final=True)
        second.unmap(final=True)
        alloc.release()


def test_a_remap_of_another_size_rebuilds_tensors_and_rebinds_modules(torch):
    small, large = Allocation(1), Allocation(2)
    weights = W.Weights(grant(small.size), small.export())
    try:
        module = weights.bind(tiny_module(torch))
        old = weights["b"]
        assert weights.wait_unused(1.0)
        weights.unmap()
        assert weights.remap(grant(large.size), large.export()) is False
        # New tensors over a new reservation (the driver may hand out the freed addresses again).
        assert weights["b"] is not old and module.b.data_ptr() == weights["b"].data_ptr()
        weights["b"].fill_(2.0)
        assert module.b.sum().item() == 6.0
    finally:
        weights.unmap(final=True)
        small.release()
        large.release()


def test_a_client_parks_and_resumes_vmm_weights_through_the_protocol(torch):
    from conftest import attached_pair

    alloc = Allocation()
    client, daemon = attached_pair()
    try:
        with ThreadPoolExecutor(2) as pool:
            fut = pool.submit(client.load_weights, "/models/tiny.safetensors", device="cuda:0")
            fd = alloc.export()
            daemon.answer("loadWeights", grant(alloc.size), fds=[fd])
            os.close(fd)
            weights = fut.result(timeout=30)
            weights["b"].fill_(4.0)
            ptr = weights["b"].data_ptr()
            assert daemon.call("unmapWeights", {"modelId": "w-gpu", "timeoutMs": 1000}) == {
                "requestId": "d1", "success": True, "data": {"unmapped": True}, "error": None}

            def use():
                with weights.use():
                    return weights["b"].sum().item(), weights["b"].data_ptr()

            used = pool.submit(use)
            resume = daemon.read("request")
            assert resume.action == "resumeWeights"
            fd = alloc.export()
            remap = daemon.call("remapWeights", grant(alloc.size), fds=[fd])
            os.close(fd)
            assert remap["data"] == {"sameAddress": True}, remap
            daemon.send(P.ok(resume.request_id, {"modelId": "w-gpu", "state": "resident"}))
            assert used.result(timeout=30) == (12.0, ptr)
            assert daemon.call("unmapWeights", {"modelId": "w-gpu", "timeoutMs": 1000, "final": True})["success"]
    finally:
        client.close()
        daemon.close()
        alloc.release()
