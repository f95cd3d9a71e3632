"""The rebalance recommendation and the model move on two GPUs of one kind
(scripts/device-jobs/rebalance.sh): an outside process fills cuda:0 to 45 %, a real model
(gpt2-large, built from its config) is loaded on cuda:0 through the daemon; the recommendations
must name moving it to cuda:1, and applying the action must move its bytes there (NVML).
Prints one JSON report; exits 1 on a mismatch.

    python3 rebalance_check.py BASE_URL SCRIPTS_DIR WORK_DIR
"""
import json
import os
import subprocess
import sys
import time
import urllib.request

import pynvml

BASE, SCRIPTS, WORK = sys.argv[1], sys.argv[2], sys.argv[3]
MIB = 1 << 20
failures = []
report = {}


def call(method, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(BASE + path, data=data, method=method, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def check(name, ok, detail):
    if not ok:
        failures.append(f"{name}: {detail}")


pynvml.nvmlInit()
gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(2)]


def used():
    return [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in gpus]


os.makedirs(WORK, exist_ok=True)
manifest = json.loads(subprocess.run([sys.executable, f"{SCRIPTS}/gpu/make_torch_models.py", WORK, "large"],
                                     check=True, capture_output=True, text=True).stdout)
model = [m for m in manifest if m["name"] == "gpt2-large"][0]
report["model"] = {"name": model["name"], "bytes": model["bytes"]}
hog = subprocess.Popen([sys.executable, f"{SCRIPTS}/gpu/gpu_hog.py", "0.45", "0"], stdin=subprocess.PIPE,
                       stdout=subprocess.PIPE, text=True)
report["hog"] = json.loads(hog.stdout.readline())
for _ in range(300):
    code, m = call("GET", "/api/memory/models")
    if code == 200 and any(w["state"] == "ready" for w in m["data"]["coordinationStatus"]["workers"]):
        break
    time.sleep(0.1)
code, loaded = call("POST", "/api/memory/models/load", {"path": model["path"], "name": "gpt2-large", "deviceId": "cuda:0"})
check("load", code == 200, loaded)
model_id = loaded["data"]["modelId"]
time.sleep(0.5)
code, rec = call("GET", "/api/memory/optimization")
recs = [r for r in rec["data"]["recommendations"] if r["type"] == "rebalanceModels"]
report["recommendations"] = [(r["type"], r["deviceId"], r["estimatedSavingsBytes"], r["evidence"]) for r in rec["data"]["recommendations"]]
check("rebalance recommended", len(recs) == 1, rec["data"])
if recs:
    r = recs[0]
    check("action", r["action"]["path"] == f"/api/memory/models/{model_id}/move" and r["action"]["body"] == {"targetDeviceId": "cuda:1"}, r["action"])
    before = used()
    t0 = time.perf_counter()
    code, moved = call(r["action"]["method"], r["action"]["path"], r["action"]["body"])
    report["move_seconds"] = round(time.perf_counter() - t0, 3)
    check("move", code == 200, moved)
    time.sleep(0.5)
    after = used()
    report["nvml_used_before_mib"] = [b // MIB for b in before]
    report["nvml_used_after_mib"] = [a // MIB for a in after]
    grew, dropped = after[1] - before[1], before[0] - after[0]
    report["cuda1_grew_mib"], report["cuda0_dropped_mib"] = grew // MIB, dropped // MIB
    check("cuda:1 holds the model", grew >= 0.9 * model["bytes"], (grew, model["bytes"]))
    check("cuda:0 gave it back", dropped >= 0.9 * model["bytes"], (dropped, model["bytes"]))
    if code == 200:
        new = moved["data"]["model"]
        report["moved"] = {"from": moved["data"]["previousModelId"], "to": new["modelId"], "device": new["deviceId"], "sizeBytes": new["sizeBytes"]}
        check("listing", new["deviceId"] == "cuda:1", new)
    code, rec = call("GET", "/api/memory/optimization")
    report["after"] = [(r["type"], r["deviceId"]) for r in rec["data"]["recommendations"]]
    check("silent after the move", not any(r["type"] == "rebalanceModels" for r in rec["data"]["recommendations"]), rec["data"])
hog.stdin.write("\n\n")
hog.stdin.flush()
hog.wait(timeout=60)
report["failures"] = failures
print(json.dumps(report, indent=1))
sys.exit(1 if failures else 0)
