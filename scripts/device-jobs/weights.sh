#!/usr/bin/env bash
# Model weights held by memwarden on the GPU machine: the 8 GiB load/park/resume test through
# the API, torch processes mapping the weights (scripts/gpu/weights_check.py), the Python GPU
# tests, and the raw baselines in the same job.
#   bash device-run/jobs/weights.sh
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1 MEMWARDEN_PY=$PWD/python
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  echo "== baseline (tools/gpu_baseline.cu)"
  nvcc -O2 -o /tmp/gpu_baseline tools/gpu_baseline.cu -lcuda -lnvidia-ml && /tmp/gpu_baseline | grep -Ei "pinned|pageable|H2D|D2H"
  echo "== page cache reads (dd, one thread, 8 GiB file written first)"
  dd if=/dev/urandom of=/tmp/pc.bin bs=64M count=128 status=none; dd if=/tmp/pc.bin of=/dev/null bs=64M 2>&1 | tail -1; rm -f /tmp/pc.bin
  echo "== 8 GiB through the API (tests/gpu/gpu_weights.rs)"
  PYTHONPATH=$PWD/python bin/test-gpu-test gpu_weights:: --test-threads=1 --nocapture
  echo "== torch processes (scripts/gpu/weights_check.py)"
  d=$(mktemp -d); sock=$d/mw.sock
  printf 'listen = "127.0.0.1:5077"\n[workers]\nenabled = false\nsocket = "%s"\n[weights]\npark_pool_bytes = 1073741824\n' "$sock" > $d/config.toml
  bin/memwarden serve --config $d/config.toml > $d/daemon.log 2>&1 &
  daemon=$!
  for i in $(seq 50); do [ -S $sock ] && break; sleep 0.2; done
  python3 scripts/gpu/weights_check.py http://127.0.0.1:5077 $sock $d
  echo "== cold file: plain sequential read vs a load (page cache dropped before each)"
  python3 - "$d" <<'PY'
import json, os, subprocess, sys, time, urllib.request
d = sys.argv[1]; path = os.path.join(d, "cold.safetensors")
sys.path.insert(0, os.environ["MEMWARDEN_PY"]); from memwarden import safetensors_io as st
chunk = os.urandom(64 << 20)
st.write(path, {f"t{i}": ("U8", (len(chunk),), chunk) for i in range(64)}, {"format": "pt"})  # 4 GiB
def drop():
    os.sync(); open("/proc/sys/vm/drop_caches", "w").write("3\n")
try:
    drop()
except OSError as e:
    print("cannot drop the page cache:", e); sys.exit(0)
t = time.perf_counter(); out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M"], capture_output=True, text=True)
print("cold dd:", out.stderr.strip().splitlines()[-1])
drop()
req = urllib.request.Request("http://127.0.0.1:5077/api/memory/models/load", method="POST",
                             data=json.dumps({"path": path, "deviceId": "cuda:0", "keepAliveMs": 0}).encode(),
                             headers={"Content-Type": "application/json"})
t = time.perf_counter(); m = json.loads(urllib.request.urlopen(req).read())["data"]
print(f"cold load → cuda:0: {m['load']['gbPerS']} GB/s copy, request {(time.perf_counter() - t) * 1e3:.0f} ms, {m['sizeBytes']} bytes")
PY
  kill $daemon; wait $daemon; tail -20 $d/daemon.log
  echo "== Python GPU tests (python/tests/test_weights_gpu.py)"
  MEMWARDEN_GPU_TESTS=1 PYTHONPATH=$PWD/python:$PWD/pylib python3 -m pytest -q python/tests/test_weights_gpu.py 2>&1 | tail -15 ||
    echo "(pytest missing or failed)"
} 2>&1 | tee "$OUT/weights.txt"
