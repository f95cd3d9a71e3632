#!/usr/bin/env bash
# Issue 22's GPU checks: a worker mapping held weights on cuda:0 is not charged for them
# (unattributedBytes >= 0), the watchdog's park rung, defragmentation on cuda:0 (a pass carries
# out its plan), and the optimizer with torch workers.
#   TESTS=gpu scripts/device-bundle   (one binary: gpu, gpu_models and gpu_weights are its modules)
#   device run, carry ["device-run"], command "bash device-run/jobs/regressions.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1 MEMWARDEN_PY=$PWD/python PYTHONPATH=$PWD/python
rc=0
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  echo "== held weights through the API: 8 GiB load/park/resume, a worker mapping them (not charged"
  echo "   for them), kill -9 and re-attach, the watchdog's park rung (tests/gpu/gpu_weights.rs)"
  bin/test-gpu-test gpu_weights:: --test-threads=1 --nocapture || rc=1
  echo "== torch processes mapping held weights through the socket (loadWeights; scripts/gpu/weights_check.py)"
  d=$(mktemp -d); sock=$d/mw.sock
  printf 'listen = "127.0.0.1:5078"\n[workers]\nenabled = false\nsocket = "%s"\n[weights]\npark_pool_bytes = 1073741824\n' "$sock" > $d/config.toml
  bin/memwarden serve --config $d/config.toml > $d/daemon.log 2>&1 &
  daemon=$!
  for i in $(seq 50); do [ -S $sock ] && break; sleep 0.2; done
  python3 scripts/gpu/weights_check.py http://127.0.0.1:5078 $sock $d || rc=1
  kill $daemon; wait $daemon 2>/dev/null
  echo "== defragmentation on cuda:0 (tests/gpu/gpu.rs)"
  bin/test-gpu-test --test-threads=1 --nocapture gpu::gpu_defrag || rc=1
  echo "== the optimizer with torch workers (tests/gpu/gpu_models.rs)"
  bin/test-gpu-test gpu_models:: --test-threads=1 --nocapture || rc=1
  echo "== rc $rc"
  exit $rc
} 2>&1 | tee "$OUT/regressions.txt"
exit "${PIPESTATUS[0]}"
