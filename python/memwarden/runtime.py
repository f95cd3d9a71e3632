"""What this Python process has and holds: the frameworks installed (reported in the hello),
torch imported only when wanted, the CUDA devices torch sees, the process's resident memory and
returning its free heap to the OS. Shared by the worker, the client and held weights.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
from typing import Any, Dict, List, Optional


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def module_version(name: str) -> Optional[str]:
    if not has_module(name):
        return None
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "unknown"


def frameworks() -> Dict[str, Optional[str]]:
    """The hello's ``frameworks``: the Python version and those of the optional frameworks."""
    return {
        "python": platform.python_version(),
        "numpy": module_version("numpy"),
        "safetensors": module_version("safetensors"),
        "torch": module_version("torch"),
    }


def import_torch() -> Any:
    """torch, imported only when a torch model or tensor is asked for (importing it takes seconds)."""
    import torch  # noqa: PLC0415

    return torch


def cuda_devices() -> List[str]:
    if not has_module("torch"):
        return []
    try:
        torch = import_torch()
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:
        return []


def rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def malloc_trim() -> None:
    """Returns free heap pages to the OS (glibc); small tensors live in the heap, not in mmaps."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
