"""An outside process that fills cuda:0 with torch allocations until its utilization reaches
argv[1] (0-1), prints {"filled": ...}, then on a line from stdin tries one more allocation of
argv[2] bytes and prints whether it succeeded. The GPU optimizer test drives it."""
import json
import sys

import torch

target, extra = float(sys.argv[1]), int(sys.argv[2])
torch.cuda.init()
free, total = torch.cuda.mem_get_info(0)
# A fixed amount, computed once: memory the daemon frees meanwhile is not refilled.
fill = int(free - (1 - target) * total)
chunks = []
while fill > 0:
    n = min(1 << 30, fill)
    chunks.append(torch.empty(n, dtype=torch.uint8, device="cuda:0"))
    fill -= n
free, total = torch.cuda.mem_get_info(0)
print(json.dumps({"filled": True, "freeBytes": free, "totalBytes": total, "heldBytes": sum(c.numel() for c in chunks)}), flush=True)
sys.stdin.readline()
try:
    x = torch.empty(extra, dtype=torch.uint8, device="cuda:0")
    ok = True
except torch.OutOfMemoryError:
    ok = False
print(json.dumps({"extraAllocated": ok, "freeBytes": torch.cuda.mem_get_info(0)[0]}), flush=True)
sys.stdin.readline()
