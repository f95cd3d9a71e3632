#!/usr/bin/env bash
# Issue 23's GPU checks, after the architecture step moved held weights' device memory behind
# the backend (Backend::dedicated: CUDA VMM), exports into backend-neutral handles, the pressure
# signals apart from Backend, and the platform seam under memwarden-sys:
# - memwarden-backends: CUDA dedicated memory (load through the staging pipeline, fd export,
#   park into pinned chunks, restore);
# - memwarden-testkit: the conformance suite on every CUDA GPU;
# - tests/gpu: every CUDA test (gpu::, gpu_weights::, gpu_models::), plus the torch holders of
#   held weights through the socket.
#   TESTS="gpu conformance backends" scripts/device-bundle
#   device run, carry ["device-run"], command "bash device-run/jobs/architecture.sh"
set -uo pipefail
cd "$(dirname "$0")/.."
rm -rf bin && tar -xJf bin.tar.xz  # always the carried binaries, never a warm machine's old ones
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export MEMWARDEN_SCRIPTS=$PWD/scripts RUST_BACKTRACE=1 MEMWARDEN_PY=$PWD/python PYTHONPATH=$PWD/python
rc=0
{
  echo "== machine"; nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader; nproc
  echo "== CUDA dedicated memory for held weights (memwarden-backends)"
  bin/test-memwarden_backends-lib cuda::hw_tests --test-threads=1 --nocapture || rc=1
  echo "== the conformance suite on CUDA (memwarden-testkit)"
  bin/test-memwarden_testkit-lib --test-threads=1 cuda || rc=1
  echo "== held weights through the API (tests/gpu/gpu_weights.rs)"
  bin/test-gpu-test gpu_weights:: --test-threads=1 --nocapture || rc=1
  echo "== torch processes mapping held weights through the socket (scripts/gpu/weights_check.py)"
  d=$(mktemp -d); sock=$d/mw.sock
  printf 'listen = "127.0.0.1:5078"\n[workers]\nenabled = false\nsocket = "%s"\n[weights]\npark_pool_bytes = 1073741824\n' "$sock" > $d/config.toml
  bin/memwarden serve --config $d/config.toml > $d/daemon.log 2>&1 &
  daemon=$!
  for i in $(seq 50); do [ -S $sock ] && break; sleep 0.2; done
  python3 scripts/gpu/weights_check.py http://127.0.0.1:5078 $sock $d || rc=1
  kill $daemon; wait $daemon 2>/dev/null
  echo "== status, pools, transfers, exports, defragmentation and pressure on cuda:0 (tests/gpu/gpu.rs)"
  # (gpu::multi_gpu_peer_copy_verifies needs two GPUs: cuda.sh multi runs it on the 2-GPU kind.)
  bin/test-gpu-test gpu:: --test-threads=1 --skip multi_gpu || rc=1
  echo "== the optimizer with torch workers (tests/gpu/gpu_models.rs)"
  bin/test-gpu-test gpu_models:: --test-threads=1 || rc=1
  echo "== rc $rc"
  exit $rc
} 2>&1 | tee "$OUT/architecture.txt"
exit "${PIPESTATUS[0]}"
