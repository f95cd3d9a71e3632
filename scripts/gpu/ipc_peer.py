#!/usr/bin/env python3
"""A second process that maps device memory memwarden exported (CUDA IPC) and proves sharing.

    ipc_peer.py IPC_HANDLE_HEX OFFSET SIZE ORDINAL

Prints the hex of the first 16 bytes it reads at OFFSET, then writes b"HELLO" at OFFSET+100
(the daemon reads it back). Uses cupy; torch is not needed.
"""
import sys

import cupy
import numpy


def main() -> int:
    handle_hex, offset, size, ordinal = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    with cupy.cuda.Device(ordinal):
        base = cupy.cuda.runtime.ipcOpenMemHandle(bytes.fromhex(handle_hex))
        try:
            mem = cupy.cuda.UnownedMemory(base + offset, size, owner=None, device_id=ordinal)
            arr = cupy.ndarray((size,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(mem, 0))
            sys.stdout.write(arr[:16].get().tobytes().hex())
            arr[100:105] = cupy.asarray(numpy.frombuffer(b"HELLO", dtype=numpy.uint8))
            cupy.cuda.runtime.deviceSynchronize()
        finally:
            cupy.cuda.runtime.ipcCloseMemHandle(base)
    return 0


if __name__ == "__main__":
    sys.exit(main())
