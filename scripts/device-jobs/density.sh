#!/usr/bin/env bash
# Issue 25's GPU checks: more models than the GPU holds, with the default config.
# - memwarden-backends: the CUDA switch (both directions overlapped, every byte checked) beside
#   each direction alone, 8 GiB;
# - tests/gpu: held weights through the API (park/resume timings, the watchdog) and every CUDA
#   test that touches weights;
# - a daemon with the default config: a park right after the load, then the density benchmark
#   (scripts/bench-density: 8 models of 1.5x the card, uniform and Zipf(1.1), one and two
#   client processes), and the baselines (../shared/tools/gpu_peers.py) in the same job.
#   TESTS="gpu backends" scripts/device-bundle
#   device run, carry ["device-run"], command "bash device-run/jobs/density.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1 MEMWARDEN_PY=$PWD/python PYTHONPATH=$PWD/python
# SECTIONS: switch weights (every gpu_weights test) | watchdog (its two watchdog tests only)
# park holders density baseline.
SECTIONS=${SECTIONS:-"switch weights park holders density baseline"}
rc=0
api() { curl -s -X "$1" -H 'Content-Type: application/json' ${3:+-d "$3"} "http://127.0.0.1:5078$2"; }
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  free -g | head -2; ulimit -l
  if [[ $SECTIONS == *switch* ]]; then
    echo "== the CUDA switch and CUDA dedicated memory (memwarden-backends)"
    bin/test-memwarden_backends-lib cuda::hw_tests --test-threads=1 --nocapture || rc=1
  fi
  if [[ $SECTIONS == *weights* ]]; then
    echo "== held weights through the API (tests/gpu/gpu_weights.rs)"
    bin/test-gpu-test gpu_weights:: --test-threads=1 --nocapture || rc=1
  elif [[ $SECTIONS == *watchdog* ]]; then
    echo "== the watchdog parks an idle held model for an outside allocation: configured pool, default config"
    bin/test-gpu-test gpu_weights::the_watchdog gpu_weights::with_the_default_config_the_watchdog \
      --test-threads=1 --nocapture || rc=1
  fi
  d=$(mktemp -d); sock=$d/mw.sock
  # The default config, but for the socket, the port and no workers (the clients hold models).
  printf 'listen = "127.0.0.1:5078"\n[workers]\nenabled = false\nsocket = "%s"\n' "$sock" > $d/config.toml
  bin/memwarden serve --config $d/config.toml > $d/daemon.log 2>&1 &
  daemon=$!
  for i in $(seq 50); do [ -S $sock ] && break; sleep 0.2; done
  if [[ $SECTIONS == *park* ]]; then
    echo "== a park right after the daemon starts and loads, default config (8 GiB)"
    python3 - "$d" <<'EOF' || rc=1
import json, os, struct, sys, time, urllib.request
d = sys.argv[1]
def api(method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:5078" + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["data"]
path = os.path.join(d, "park8.safetensors")
size = 8 << 30
h = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    f.truncate(8 + len(h) + size)
t = time.perf_counter()
m = api("POST", "/api/memory/models/load", {"path": path, "deviceId": "cuda:0"})
print(f"load {(time.perf_counter() - t) * 1e3:.0f} ms")
ok = True
for i, wait_s in enumerate([0, 0, 2, 0]):
    time.sleep(wait_s)
    p = api("POST", f"/api/memory/models/{m['modelId']}/park")
    phases = {x["phase"]: round(x["ms"], 1) for x in p["phasesMs"]}
    print(f"park {i} (after {wait_s} s): total {p['totalMs']:.0f} ms, copy {p['rate']['ms']:.0f} ms "
          f"({p['rate']['gbPerS']} GB/s), phases {phases}")
    ok &= p["totalMs"] <= 200
    r = api("POST", f"/api/memory/models/{m['modelId']}/resume")
    print(f"resume {i}: total {r['totalMs']:.0f} ms ({r['rate']['gbPerS']} GB/s)")
api("DELETE", f"/api/memory/models/{m['modelId']}")
os.unlink(path)
print("park <= 200 ms each time:", ok)
sys.exit(0 if ok else 1)
EOF
  fi
  if [[ $SECTIONS == *holders* ]]; then
    echo "== unmapHolders with 1, 4 and 8 client processes mapping one model (1 GiB), none in use()"
    python3 - "$d" "$sock" <<'EOF' || rc=1
import json, os, struct, subprocess, sys, time, urllib.request
d, sock = sys.argv[1], sys.argv[2]
def api(method, path, body=None):
    req = urllib.request.Request("http://127.0.0.1:5078" + path, method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req) as r:
        return json.loads(r.read())["data"]
path = os.path.join(d, "holders.safetensors")
size = 1 << 30
h = json.dumps({"w": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}}).encode()
with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    f.truncate(8 + len(h) + size)
# Each holder logs when its unmap handler began and ended, and what the driver calls took
# (CLOCK_REALTIME, comparable across processes), so a slow unmapHolders says where it went.
holder = """
import sys, time, memwarden.client as mc, memwarden.weights as mw
c = mc.connect(sys.argv[1], name=sys.argv[3])
log = open(sys.argv[4], "a", buffering=1)
orig_handler, orig_unmap = mc.Client._unmap_weights, mw.CudaDriver.unmap
def handler(self, data):
    t0 = time.time_ns(); r = orig_handler(self, data); log.write(f"handler {t0} {time.time_ns()}\\n"); return r
def unmap(self, ptr, pieces):
    t0 = time.time_ns(); self.check(self.lib.cuCtxSynchronize(), "cuCtxSynchronize"); t1 = time.time_ns()
    for off, n in pieces:
        self.check(self.lib.cuMemUnmap(ptr + off, n), "cuMemUnmap")
    log.write(f"driver {t0} {t1} {time.time_ns()}\\n")
mc.Client._unmap_weights, mw.CudaDriver.unmap = handler, unmap
w = c.load_weights(sys.argv[2], device="cuda:0")
print("ready", flush=True)
time.sleep(600)
"""
def spans(logs, since_ns):
    # per holder: (handler start, sync ms, unmap ms, handler end) of the last unmap, relative to since_ns
    out = []
    for lp in logs:
        lines = [l.split() for l in open(lp) if l.strip()]
        h = [l for l in lines if l[0] == "handler" and int(l[1]) >= since_ns]
        dr = [l for l in lines if l[0] == "driver" and int(l[1]) >= since_ns]
        if h and dr:
            a, b = int(h[0][1]), int(h[0][2]); d0, d1, d2 = map(int, dr[0][1:])
            out.append(f"start+{(a - since_ns) / 1e6:.1f} sync {(d1 - d0) / 1e6:.2f} unmap {(d2 - d1) / 1e6:.2f} end+{(b - since_ns) / 1e6:.1f}")
    return out
ok = True
for n in (1, 4, 8):
    logs = [os.path.join(d, f"h{n}-{i}.log") for i in range(n)]
    procs = [subprocess.Popen([sys.executable, "-c", holder, sock, path, f"h{n}-{i}", logs[i]], stdout=subprocess.PIPE, text=True)
             for i in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    m = next(w for w in api("GET", "/api/memory/models")["weights"] if w["path"] == path)
    times = []
    for _ in range(3):
        since = time.time_ns()
        p = api("POST", f"/api/memory/models/{m['modelId']}/park")
        times.append(next(x["ms"] for x in p["phasesMs"] if x["phase"] == "unmapHolders"))
        rest = {x["phase"]: round(x["ms"], 1) for x in p["phasesMs"] if x["phase"] != "unmapHolders"}
        print(f"  park {p['totalMs']:.1f} ms: unmapHolders (quiet) {times[-1]:.1f}, then {rest} (awaitUnmaps: what the"
              " unmaps added after the copy)")
        print("  holders:", "; ".join(spans(logs, since)))
        r = api("POST", f"/api/memory/models/{m['modelId']}/resume")
        remap = next(x["ms"] for x in r["phasesMs"] if x["phase"] == "remapHolders")
    print(f"{n} holder(s): unmapHolders {[round(t, 1) for t in times]} ms, last remapHolders {remap:.1f} ms")
    ok &= min(times) <= 5
    for p in procs:
        p.kill()
    time.sleep(0.5)
    api("DELETE", f"/api/memory/models/{m['modelId']}")
os.unlink(path)
print("unmapHolders <= 5 ms (best of 3) for 1-8 holders:", ok)
EOF
  fi
  if [[ $SECTIONS == *density* ]]; then
    echo "== density: 8 models, 1.5x the card, uniform and Zipf(1.1), 1 and 2 clients (scripts/bench-density)"
    python3 scripts/bench-density --url http://127.0.0.1:5078 --socket $sock --dir $d/models \
      --models 8 --factor 1.5 --requests ${REQUESTS:-60} --clients ${CLIENTS:-1,2} --json "$OUT/density.json" || rc=1
    api GET /metrics | grep -i "held\|weights" | head -20
  fi
  kill $daemon; wait $daemon 2>/dev/null
  grep -iE "switch|park pool|make room|refus|error" $d/daemon.log | tail -40
  cp $d/daemon.log "$OUT/daemon.log"
  if [[ $SECTIONS == *baseline* ]] && [ -f tools/gpu_peers.py ]; then
    echo "== baselines (../shared/tools/gpu_peers.py), same job"
    python3 tools/gpu_peers.py || true
  fi
  echo "== rc $rc"
  exit $rc
} 2>&1 | tee "$OUT/density.txt"
exit "${PIPESTATUS[0]}"
