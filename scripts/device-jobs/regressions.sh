#!/usr/bin/env bash
# Issue 22's GPU checks: a worker mapping held weights on cuda:0 is not charged for them
# (unattributedBytes >= 0), the watchdog's park rung, defragmentation on cuda:0 (a pass carries
# out its plan), and the optimizer with torch workers.
#   TESTS="gpu_weights gpu gpu_models" scripts/device-bundle
#   device run, carry ["device-run"], command "bash device-run/jobs/regressions.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1 MEMWARDEN_PY=$PWD/python PYTHONPATH=$PWD/python
rc=0
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  echo "== a worker mapping held weights (tests/gpu_weights.rs, 2 GiB)"
  MEMWARDEN_WEIGHTS_GIB=2 bin/test-gpu_weights-test --test-threads=1 --nocapture a_killed_worker || rc=1
  echo "== the watchdog parks held weights (tests/gpu_weights.rs)"
  bin/test-gpu_weights-test --test-threads=1 --nocapture the_watchdog || rc=1
  echo "== defragmentation on cuda:0 (tests/gpu.rs)"
  bin/test-gpu-test --test-threads=1 --nocapture defrag || rc=1
  echo "== the optimizer with torch workers (tests/gpu_models.rs)"
  bin/test-gpu_models-test --test-threads=1 --nocapture || rc=1
  echo "== rc $rc"
  exit $rc
} 2>&1 | tee "$OUT/regressions.txt"
exit "${PIPESTATUS[0]}"
