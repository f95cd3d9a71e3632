"""Analytics and /metrics against a running daemon on a GPU machine (scripts/device-jobs/analytics.sh).

A scripted GPU workload (owned device allocations, frees, a pinned host to device copy), then:
the exposition must parse with prometheus_client and agree with /api/memory/status and NVML;
the analytics must count what the workload did. Prints one JSON report; exits 1 on a mismatch.
"""
import json
import sys
import time
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

BASE = sys.argv[1]
MIB = 1 << 20
failures = []


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            raw = r.read().decode()
    except urllib.error.HTTPError as e:
        raw = e.read().decode()
    return json.loads(raw) if path != "/metrics" else raw


def check(name, ok, detail):
    if not ok:
        failures.append(f"{name}: {detail}")


gpu = "cuda:0"
ids = [call("POST", f"/api/memory/allocations/allocate/{gpu}", {"sizeBytes": 256 * MIB, "owner": "gpu-a", "purpose": "kv"})["data"]["allocationId"] for _ in range(8)]
for i in ids[::2]:
    call("DELETE", f"/api/memory/allocations/{i}")
src = call("POST", "/api/memory/allocations/allocate/cpu", {"sizeBytes": 256 * MIB, "memoryType": "pinned", "owner": "loader"})["data"]["allocationId"]
t = call("POST", "/api/memory/copy", {"sourceAllocationId": src, "destinationAllocationId": ids[1]})
check("copy", t["success"], t)
time.sleep(1.5)

text = call("GET", "/metrics")
samples = {}
for fam in text_string_to_metric_families(text):
    for s in fam.samples:
        samples[(s.name, tuple(sorted(s.labels.items())))] = s.value


def metric(name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


status = call("GET", f"/api/memory/status/{gpu}")["data"]
import pynvml  # noqa: E402

pynvml.nvmlInit()
h = pynvml.nvmlDeviceGetHandleByIndex(0)
nvml = pynvml.nvmlDeviceGetMemoryInfo(h)
check("total vs status", metric("memwarden_device_total_bytes", device=gpu) == status["totalMemory"], (metric("memwarden_device_total_bytes", device=gpu), status["totalMemory"]))
check("total vs NVML", metric("memwarden_device_total_bytes", device=gpu) == nvml.total, (metric("memwarden_device_total_bytes", device=gpu), nvml.total))
used = metric("memwarden_device_used_bytes", device=gpu)
check("used vs NVML", abs(used - nvml.used) < 64 * MIB, (used, nvml.used))
check("allocations_total", metric("memwarden_allocations_total", device=gpu) == 8, metric("memwarden_allocations_total", device=gpu))
check("frees_total", metric("memwarden_frees_total", device=gpu) == 4, metric("memwarden_frees_total", device=gpu))
check("transfer out cpu", metric("memwarden_transfer_bytes_total", device="cpu", direction="out") == 256 * MIB, metric("memwarden_transfer_bytes_total", device="cpu", direction="out"))
check("transfer in gpu", metric("memwarden_transfer_bytes_total", device=gpu, direction="in") == 256 * MIB, metric("memwarden_transfer_bytes_total", device=gpu, direction="in"))
dev_alloc = metric("memwarden_pool_allocated_bytes", device=gpu, memory_type="device")
pool = [p for p in status["pools"] if p["memoryType"] == "device"][0]
check("pool allocated", dev_alloc == pool["allocatedBytes"] == 4 * 256 * MIB, (dev_alloc, pool["allocatedBytes"]))

a = call("GET", "/api/memory/analytics?window=5m")["data"]
d = [x for x in a["devices"] if x["deviceId"] == gpu][0]
check("analytics allocations", d["activity"]["allocations"] == 8 and d["activity"]["frees"] == 4, d["activity"])
check("analytics peak", d["peakAllocated"]["valueBytes"] == 8 * 256 * MIB, d["peakAllocated"])
check("analytics transfers", d["transfers"]["inBytes"] == 256 * MIB, d["transfers"])
check("top owner", a["topOwners"][0]["name"] == "gpu-a" and a["topOwners"][0]["liveBytes"] == 4 * 256 * MIB, a["topOwners"][:2])
rec = call("GET", "/api/memory/optimization")["data"]
scrape_ms = []
for _ in range(20):
    t0 = time.perf_counter()
    call("GET", "/metrics")
    scrape_ms.append((time.perf_counter() - t0) * 1000)
scrape_ms.sort()
report = {
    "gpu": pynvml.nvmlDeviceGetName(h),
    "metrics_families": len(list(text_string_to_metric_families(text))),
    "metrics_samples": len(samples),
    "gpu_total": metric("memwarden_device_total_bytes", device=gpu),
    "gpu_used_metrics": used,
    "gpu_used_nvml": nvml.used,
    "gpu_activity": d["activity"],
    "gpu_transfers": d["transfers"],
    "gpu_samples": d["samples"],
    "recommendations": [(r["type"], r["deviceId"], r["estimatedSavingsBytes"]) for r in rec["recommendations"]],
    "scrape_ms_p50": scrape_ms[len(scrape_ms) // 2],
    "scrape_ms_max": scrape_ms[-1],
    "failures": failures,
}
print(json.dumps(report, indent=1))
sys.exit(1 if failures else 0)
