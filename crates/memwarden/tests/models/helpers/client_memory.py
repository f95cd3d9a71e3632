"""An attached client that allocates memory over its connection, driven line by line (used by
crates/memwarden/tests/models/client_memory.rs, and by scripts/device-jobs/contract.sh on the GPU
machine): connects to SOCKET as NAME, then for each JSON line on stdin prints one JSON line:

  {"op": "allocate", ...keyword arguments of Client.allocate}  -> the allocation, or {"error", "message"}
  {"op": "free", "id": ID}                                     -> {allocationId, freedBytes}, or the error
  {"op": "close"}                                              -> {"closed": true} (the connection closes)

It exits when its stdin closes.

  python3 client_memory.py SOCKET NAME
"""
import json
import os
import sys

# The memwarden package: $MEMWARDEN_PY (the GPU machine's device-run/python), else the
# repository's python/ (this file is in crates/memwarden/tests/models/helpers/).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("MEMWARDEN_PY") or os.path.join(HERE, "..", "..", "..", "..", "..", "python"))
import memwarden.client  # noqa: E402


def main():
    client = memwarden.client.connect(sys.argv[1], name=sys.argv[2])
    print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        try:
            if op == "allocate":
                out = client.allocate(**cmd)
            elif op == "free":
                out = client.free(cmd["id"])
            elif op == "close":
                client.close()
                out = {"closed": True}
            else:
                out = {"error": "UNKNOWN_OP", "message": op}
        except memwarden.client.DaemonError as e:
            out = {"error": e.code, "message": str(e)}
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
