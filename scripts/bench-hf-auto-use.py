#!/usr/bin/env python3
"""What memwarden.hf's auto_use costs per forward, on CPU (no daemon needed).

    scripts/bench-hf-auto-use.py [--calls 200000]

Real ``Weights`` over a memfd (the shape of the daemon's cpu grant, no peer: no ``weightsUsed``
notice, which goes out at most once a second anyway) and a tiny torch module whose forward does
almost nothing, so the difference is the wrapper: ``AutoUse.enter/exit`` around the outermost
call (a thread-local depth, ``weights.use()``'s lock and counter). Prints µs per call for the
bare module call, the wrapped one, a nested (inner) wrapped call, and ``with weights.use()``
alone, as one JSON line. Needs torch.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))


def weights():
    from memwarden.weights import Weights

    size = 4096
    fd = os.memfd_create("bench-auto-use")
    os.ftruncate(fd, size)
    os.pwrite(fd, struct.pack("<4f", 1, 2, 3, 4), 0)
    grant = {
        "modelId": "w-bench", "name": "bench", "deviceId": "cpu", "handle": "shm", "allocationBytes": size,
        "dataBytes": 16, "hash": "x", "shared": False, "access": "readwrite",
        "tensors": [{"name": "weight", "dtype": "F32", "shape": [2, 2], "offset": 0, "nbytes": 16}],
    }
    return Weights(grant, fd)


def per_call_us(fn, calls: int) -> float:
    for _ in range(min(calls, 1000)):
        fn()
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, time.perf_counter() - t)
    return best / calls * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()

    import torch

    from memwarden import hf

    class Tiny(torch.nn.Module):
        def forward(self, x):
            return x

    w = weights()
    bare, wrapped = Tiny(), Tiny()
    auto = hf.install_auto_use(wrapped, w)
    x = torch.zeros(1)

    def nested():
        with auto.held():
            for _ in range(10):
                wrapped(x)

    res = {
        "torch": torch.__version__,
        "module_call_us": per_call_us(lambda: bare(x), args.calls),
        "auto_use_call_us": per_call_us(lambda: wrapped(x), args.calls),
        "nested_call_us": per_call_us(nested, args.calls // 10) / 10,
    }

    def use_only():
        with w.use():
            pass

    res["weights_use_us"] = per_call_us(use_only, args.calls)
    res["auto_use_overhead_us"] = res["auto_use_call_us"] - res["module_call_us"]
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
