"""A process that maps memwarden-held weights on cpu and reports what it sees (used by
crates/memwarden/tests/models/weights_clients.rs): connects to SOCKET, load_weights(PATH, "cpu"),
prints one JSON line {modelId, shared, digest (sha256 of every tensor's bytes, by name), pssShmem
(bytes of shared memory this process is charged for, from /proc/self/smaps_rollup)}, then waits
until its stdin closes.

  python3 weights_holder.py SOCKET PATH NAME
"""
import hashlib
import json
import os
import sys

# The memwarden package: $MEMWARDEN_PY (the GPU machine's device-run/python), else the
# repository's python/ (this file is in crates/memwarden/tests/models/helpers/).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("MEMWARDEN_PY") or os.path.join(HERE, "..", "..", "..", "..", "..", "python"))
import memwarden.client  # noqa: E402


def raw(t):
    if type(t).__module__.startswith("torch"):
        import torch  # noqa: PLC0415

        return t.reshape(-1).view(torch.uint8).numpy().tobytes()
    if hasattr(t, "tobytes"):
        return t.tobytes()
    return bytes(t)


def pss_shmem():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss_Shmem:"):
                return int(line.split()[1]) * 1024
    return None


def main():
    sock, path, name = sys.argv[1:4]
    client = memwarden.client.connect(sock, name=name)
    w = client.load_weights(path, device="cpu")
    h = hashlib.sha256()
    total = 0
    for key in sorted(w):
        b = raw(w[key])
        total += len(b)
        h.update(b)
    print(json.dumps({"modelId": w.model_id, "shared": w.shared, "digest": h.hexdigest(), "bytes": total,
                      "pssShmem": pss_shmem()}), flush=True)
    sys.stdin.read()
    client.close()


if __name__ == "__main__":
    main()
